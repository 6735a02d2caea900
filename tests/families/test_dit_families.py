"""Z-Image (Turbo and Base) and FLUX.2 [klein] (4B/9B, distilled and base) served end to end on tiny seeded models.

The references are diffusers' ``ZImagePipeline``, ``ZImageImg2ImgPipeline``, ``ZImageInpaintPipeline`` and
``Flux2KleinPipeline`` on the same weights, fp32 on the CPU; images match within 1 level (the PNG rounding). The
models are uploaded file by file and read from ComfyUI's split files, as users have them.
"""

from __future__ import annotations

import io
import json
import shutil
from dataclasses import replace
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import ServerThread, fresh_store
from tests.tools import load_tool

WIDTH, HEIGHT = 96, 64
PROMPT = "a red cat on a blue house"
ROUNDING = 1
INIT = Image.fromarray(np.random.default_rng(3).integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8))
MASK = Image.new("L", (WIDTH, HEIGHT))
MASK.paste(255, (20, 10, 70, 50))


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def _pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


def _assert_close(images: list[bytes], expected: list) -> None:
    assert len(images) == len(expected)
    for image, reference in zip(images, expected):
        assert np.abs(_pixels(image) - np.asarray(reference, dtype=np.int16)).max() <= ROUNDING


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """Tiny Z-Image Turbo and Base, klein 4B (distilled) and 9B (base), and Z-Image Turbo as ComfyUI's files."""
    tool = load_tool("make_tiny_dit")
    root = tmp_path_factory.mktemp("dit")
    models = {"zimage": tool.build("zimage", root / "zimage-turbo"),
              "zimage_base": tool.build("zimage", root / "zimage-base", base=True),
              "klein": tool.build("klein", root / "klein-4b"),
              "klein_9b_base": tool.build("klein", root / "klein-9b-base", base=True, size="9b")}
    comfy = root / "comfy"
    split = tool.zimage_comfy_files(models["zimage"], comfy / "split")
    for folder in ("diffusion_models", "text_encoders", "vae"):
        (comfy / folder).mkdir()
    shutil.move(split["transformer"], comfy / "diffusion_models" / split["transformer"].name)
    shutil.move(comfy / "split" / "qwen_tokenizer", comfy / "diffusion_models" / "qwen_tokenizer")
    shutil.move(split["text_encoder"], comfy / "text_encoders" / split["text_encoder"].name)
    shutil.move(split["vae"], comfy / "vae" / "ae.safetensors")
    shutil.rmtree(comfy / "split")
    models["comfy"] = comfy
    # klein as ComfyUI keeps it: models/diffusion_models, models/text_encoders, models/vae.
    klein = root / "klein-comfy"
    split = tool.klein_comfy_files(models["klein"], klein / "split")
    for part, folder in (("transformer", "diffusion_models"), ("text_encoder", "text_encoders"), ("vae", "vae")):
        (klein / folder).mkdir()
        shutil.move(split[part], klein / folder / split[part].name)
    shutil.move(klein / "split" / "qwen_tokenizer", klein / "diffusion_models" / "qwen_tokenizer")
    shutil.rmtree(klein / "split")
    models["klein_comfy"] = klein
    return models


@pytest.fixture(scope="module")
def dit_server(base_config, model_store, tiny, tmp_path_factory):
    root = fresh_store(model_store, tmp_path_factory.mktemp("dit-store"))
    for key in ("zimage", "zimage_base", "klein", "klein_9b_base"):
        shutil.copytree(tiny[key], root / "dit" / tiny[key].name)
    shutil.copytree(tiny["comfy"], root / "comfy")
    shutil.copytree(tiny["klein_comfy"], root / "klein-comfy")
    with ServerThread(replace(base_config, model_dir=root)) as running:
        yield running


@pytest.fixture(scope="module")
def dit_client(dit_server):
    with dit_server.client(timeout=300) as client:
        yield client


def _zimage_reference(folder: Path, kind: str = "txt2img", seed: int = 7, **extra) -> list:
    from diffusers import ZImageImg2ImgPipeline, ZImageInpaintPipeline, ZImagePipeline

    cls = {"txt2img": ZImagePipeline, "img2img": ZImageImg2ImgPipeline, "inpaint": ZImageInpaintPipeline}[kind]
    pipe = cls.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    arguments = dict(prompt=PROMPT, height=HEIGHT, width=WIDTH, generator=torch.Generator("cpu").manual_seed(seed))
    return pipe(**{**arguments, **extra}).images


def _klein_reference(folder: Path, seed: int = 7, inpaint: bool = False, **extra) -> list:
    from diffusers import Flux2KleinInpaintPipeline, Flux2KleinPipeline

    cls = Flux2KleinInpaintPipeline if inpaint else Flux2KleinPipeline
    pipe = cls.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    arguments = dict(prompt=PROMPT, height=HEIGHT, width=WIDTH, generator=torch.Generator("cpu").manual_seed(seed))
    return pipe(**{**arguments, **extra}).images


def test_uploaded_folders_are_listed_with_their_family_defaults_and_match_diffusers(make_server, tiny) -> None:
    server = make_server(own_store=True, max_upload_bytes=64 * 1024 * 1024)
    with server.client(timeout=300) as client:
        for key in ("zimage", "klein"):
            for file in sorted(p for p in tiny[key].rglob("*") if p.is_file()):
                client.upload(file, f"uploaded/{tiny[key].name}/{file.relative_to(tiny[key])}")
        summaries = {s.name: s for s in client.echo().model_summaries}
        zimage, klein = summaries["uploaded/zimage-turbo"], summaries["uploaded/klein-4b"]
        # Turbo and distilled klein: few steps, no CFG.
        assert (zimage.family, zimage.default_steps, zimage.default_cfg_scale, zimage.size_multiple) == \
            ("zimage", 9, 1.0, 16)
        assert (klein.family, klein.default_steps, klein.default_cfg_scale) == ("flux2_4b", 4, 1.0)
        z_reply = client.generate(model="uploaded/zimage-turbo", prompt=PROMPT, width=WIDTH, height=HEIGHT, steps=3,
                                  seed=7)
        k_reply = client.generate(model="uploaded/klein-4b", prompt=PROMPT, width=WIDTH, height=HEIGHT, steps=3,
                                  seed=7)
    assert json.loads(z_reply.info)["backends"]["transformer"] == "eager"
    _assert_close(list(z_reply.images), _zimage_reference(tiny["zimage"], num_inference_steps=3, guidance_scale=0.0))
    _assert_close(list(k_reply.images), _klein_reference(tiny["klein"], num_inference_steps=3))


def test_zimage_base_guidance_is_cfg_scale_minus_one_in_diffusers_terms(dit_client, tiny) -> None:
    summary = next(s for s in dit_client.echo().model_summaries if s.name == "dit/zimage-base")
    assert (summary.default_steps, summary.default_cfg_scale) == (28, 5.0)
    reply = dit_client.generate(model="dit/zimage-base", prompt=PROMPT, negative_prompt="green", width=WIDTH,
                                height=HEIGHT, steps=3, seed=4, cfg_scale=3.0, batch_size=2)
    expected = _zimage_reference(tiny["zimage_base"], seed=4, negative_prompt="green", num_inference_steps=3,
                                 guidance_scale=2.0, num_images_per_prompt=2,
                                 generator=[torch.Generator("cpu").manual_seed(s) for s in (4, 5)])
    _assert_close(list(reply.images), expected)


@pytest.mark.parametrize("kind, strength, steps", [("img2img", 0.7, 6), ("inpaint", 0.8, 5), ("inpaint", 1.0, 3)])
def test_zimage_img2img_and_inpainting_match_diffusers(dit_client, tiny, kind, strength, steps) -> None:
    extra = {"mask": _png(MASK), "skip_mask_overlay": True} if kind == "inpaint" else {}
    reply = dit_client.generate(model="dit/zimage-turbo", prompt=PROMPT, steps=steps, seed=5, init_image=_png(INIT),
                                denoising_strength=strength, **extra)
    references = {"mask_image": MASK} if kind == "inpaint" else {}
    _assert_close(list(reply.images), _zimage_reference(tiny["zimage"], kind, seed=5, image=INIT, strength=strength,
                                                        num_inference_steps=steps, guidance_scale=0.0, **references))


@pytest.mark.parametrize("folder, name, family", [
    ("dit/zimage-turbo", "comfy/diffusion_models/z_image_turbo_bf16.safetensors", "zimage"),
    ("dit/klein-4b", "klein-comfy/diffusion_models/flux-2-klein-4b.safetensors", "flux2_4b")])
def test_comfyui_s_split_files_give_the_folder_s_pixels(dit_client, folder, name, family) -> None:
    request = dict(prompt=PROMPT, width=WIDTH, height=HEIGHT, steps=3, seed=9)
    from_folder = dit_client.generate(model=folder, **request).images[0]
    listed = {s.name: s.family for s in dit_client.echo().model_summaries}
    assert listed[name] == family
    assert not any("qwen_3" in model or "vae" in model or "ae.safetensors" in model for model in listed)
    reply = dit_client.generate(model=name, **request)
    assert np.abs(_pixels(reply.images[0]) - _pixels(from_folder)).max() <= ROUNDING
    assert json.loads(reply.info)["model_file"] == "single file"


def test_klein_reference_image_inpainting_and_base_cfg_match_diffusers(dit_client, tiny) -> None:
    # An image alone is a reference to edit (Flux2KleinPipeline's image); with a mask it is inpainting.
    reply = dit_client.generate(model="dit/klein-4b", prompt=PROMPT, steps=3, seed=3, init_image=_png(INIT))
    _assert_close(list(reply.images), _klein_reference(tiny["klein"], seed=3, image=INIT, num_inference_steps=3))
    reply = dit_client.generate(model="dit/klein-4b", prompt=PROMPT, steps=5, seed=3, init_image=_png(INIT),
                                mask=_png(MASK), skip_mask_overlay=True)
    assert json.loads(reply.info)["denoising_steps"] == 4  # diffusers' default strength 0.8
    _assert_close(list(reply.images), _klein_reference(tiny["klein"], seed=3, inpaint=True, image=INIT,
                                                       mask_image=MASK, num_inference_steps=5))
    summary = next(s for s in dit_client.echo().model_summaries if s.name == "dit/klein-9b-base")
    assert (summary.family, summary.default_steps, summary.default_cfg_scale) == ("flux2_9b", 50, 4.0)
    reply = dit_client.generate(model="dit/klein-9b-base", prompt=PROMPT, width=WIDTH, height=HEIGHT, steps=2, seed=8,
                                cfg_scale=3.0)
    _assert_close(list(reply.images), _klein_reference(tiny["klein_9b_base"], seed=8, num_inference_steps=2,
                                                       guidance_scale=3.0))


def test_the_app_protocol_names_them_with_the_app_s_versions(dit_server) -> None:
    # The specifications the app protocol's Echo lists (a model without a version is not offered to the app).
    described = {m.name: m.app_spec for m in dit_server.service.describe_models()}
    assert described["dit/zimage-turbo"]["version"] == "z_image"
    assert described["dit/klein-4b"]["version"] == "flux2_4b"
    assert described["dit/klein-9b-base"]["version"] == "flux2_9b"
    assert described["comfy/diffusion_models/z_image_turbo_bf16.safetensors"]["version"] == "z_image"


def test_bad_inputs_get_clear_errors_and_the_server_keeps_serving(dit_server, dit_client, tiny) -> None:
    root = dit_server.config.model_dir
    shutil.copytree(tiny["comfy"] / "diffusion_models", root / "lonely")  # no text encoder, no VAE
    shutil.copytree(tiny["comfy"], root / "notok")
    shutil.rmtree(root / "notok" / "diffusion_models" / "qwen_tokenizer")
    cases = [
        (dict(model="dit/zimage-turbo", width=72), grpc.StatusCode.INVALID_ARGUMENT, "multiple of 16"),
        (dict(model="dit/klein-4b", sampler="DPM++ 2M SDE Karras"), grpc.StatusCode.FAILED_PRECONDITION,
         "no flow-matching counterpart"),
        (dict(model="dit/klein-4b", width=0, height=40), grpc.StatusCode.INVALID_ARGUMENT, "height"),
        (dict(model="lonely/z_image_turbo_bf16.safetensors"), grpc.StatusCode.FAILED_PRECONDITION,
         "no Qwen3-4B text encoder (qwen_3_4b.safetensors); FLUX VAE"),
        (dict(model="notok/diffusion_models/z_image_turbo_bf16.safetensors"), grpc.StatusCode.FAILED_PRECONDITION,
         "Qwen's tokenizer"),
    ]
    for fields, code, words in cases:
        with pytest.raises(grpc.RpcError) as caught:
            dit_client.generate(**{"prompt": PROMPT, "steps": 1, "width": 64, "height": 64, **fields})
        error = caught.value
        assert error.code() == code and words in error.details(), (fields, error.details())
        assert "/tmp" not in error.details() and "Traceback" not in error.details()
    assert dit_client.generate(model="dit/zimage-turbo", prompt=PROMPT, width=64, height=64, steps=1).images


def test_engines_serve_both_families_and_match_eager(base_config, dit_server, tiny, tmp_path) -> None:
    from dts_util.engines.builder import build, plan
    from dts_util.engines.manager import EngineManager
    from dts_util.models.loader import load_model

    root = dit_server.config.model_dir
    engine_dir = tmp_path / "engines"
    # klein at a depth of 1 + 2 blocks: exporting 4B's 25 blocks takes a minute here, and adds nothing.
    load_tool("make_tiny_dit").build("klein", root / "dit" / "klein-shallow", size="shallow")
    for name in ("dit/klein-shallow", "dit/zimage-turbo"):
        model = load_model(name, root / name, "cpu")
        jobs = plan(model, engine_dir, [(64, 64)], [1], backend_name="onnxruntime")
        assert {job.component.name for job in jobs} == {"transformer", "vae_decoder", "vae_encoder"}
        if name == "dit/zimage-turbo":  # captions pad to 32 tokens: prompt chunk 1 builds 32 and 64
            assert sorted(job.shape.text_length for job in jobs if job.component.name == "transformer") == [32, 64]
            jobs = [job for job in jobs if job.component.name != "transformer" or job.shape.text_length == 32]
        for job in jobs:
            result = build(job, model, engine_dir)
            assert result.status == "built", result.error

    config = replace(base_config, model_dir=root, engine_dir=engine_dir)
    requests = [dict(model="dit/klein-shallow", prompt=PROMPT, seed=3, steps=3, width=64, height=64),
                dict(model="dit/zimage-turbo", prompt=PROMPT, seed=3, steps=3, width=64, height=64),
                # CFG: the negative prompt pads to the same 32 tokens, the positive one too
                dict(model="dit/zimage-turbo", prompt="a cat", negative_prompt="blue", seed=3, steps=2, width=64,
                     height=64, cfg_scale=2.5)]
    with ServerThread(config, EngineManager(engine_dir)) as running, running.client(timeout=300) as client:
        on_engines = [client.generate(**request) for request in requests]
        longer = client.generate(**{**requests[1], "prompt": PROMPT * 4})
    with dit_server.client(timeout=300) as eager:
        references = [eager.generate(**request) for request in requests]
    for reply, reference in zip(on_engines, references):
        backends = json.loads(reply.info)["backends"]
        assert backends["transformer"] == "onnxruntime" and backends["vae_decoder"] == "onnxruntime", backends
        diff = np.abs(_pixels(reply.images[0]) - _pixels(reference.images[0]))
        assert diff.max() <= 3 and diff.mean() <= 0.05
    assert json.loads(longer.info)["backends"]["transformer"].startswith("eager (no engine for 64x64 b1 t")


@pytest.mark.parametrize("key, model, targets", [("zimage", "dit/zimage-turbo", ("attention.to_k", "attention.to_v")),
                                                 ("klein", "dit/klein-4b", ("attn.to_v", "attn.to_add_out"))])
def test_loras_in_the_diffusers_layout_match_diffusers(dit_server, dit_client, tiny, key, model, targets) -> None:
    from diffusers import Flux2KleinPipeline, ZImagePipeline
    from safetensors.torch import save_file

    cls = ZImagePipeline if key == "zimage" else Flux2KleinPipeline
    pipe = cls.from_pretrained(tiny[key], local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    generator, tensors = torch.Generator().manual_seed(3), {}
    for name, module in pipe.transformer.named_modules():
        if name.endswith(targets):  # a PEFT-layout LoRA on the attention projections
            tensors[f"transformer.{name}.lora_A.weight"] = torch.randn(4, module.in_features, generator=generator) / 2
            tensors[f"transformer.{name}.lora_B.weight"] = torch.randn(module.out_features, 4, generator=generator) / 2
    path = dit_server.config.model_dir / "loras" / f"{key}-style.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    # The tag first and touching the prompt: the text left is exactly PROMPT (Qwen reads spaces as tokens).
    reply = dit_client.generate(model=model, prompt=f"<lora:{key}-style:0.8>{PROMPT}", width=WIDTH, height=HEIGHT,
                                steps=3, seed=6)
    plain = dit_client.generate(model=model, prompt=PROMPT, width=WIDTH, height=HEIGHT, steps=3, seed=6)
    pipe.load_lora_weights(str(path), adapter_name="style")
    pipe.set_adapters(["style"], adapter_weights=[0.8])
    extra = {"guidance_scale": 0.0} if key == "zimage" else {}
    expected = pipe(prompt=PROMPT, height=HEIGHT, width=WIDTH, num_inference_steps=3,
                    generator=torch.Generator("cpu").manual_seed(6), **extra).images
    _assert_close(list(reply.images), expected)
    assert np.abs(_pixels(reply.images[0]) - _pixels(plain.images[0])).max() > 2, "the LoRA changed nothing"
