"""FLUX.1 served end to end on a tiny seeded model: the pixels diffusers' FLUX pipelines make, from a diffusers folder
uploaded file by file, from ComfyUI's single files and from an all-in-one checkpoint; defaults, samplers, true CFG,
LoRA, previews, and bad inputs that get a clear status while the server keeps serving.

The references are diffusers' ``FluxPipeline``, ``FluxImg2ImgPipeline`` and ``FluxInpaintPipeline`` on the same
weights, fp32 on the CPU with CPU generators; images match within 1 level (the PNG rounding).
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


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def _pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


INIT = Image.fromarray(np.random.default_rng(3).integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8))
MASK = Image.new("L", (WIDTH, HEIGHT))
MASK.paste(255, (20, 10, 70, 50))


@pytest.fixture(scope="module")
def flux_files(tiny_flux: Path, tmp_path_factory) -> dict[str, Path]:
    """The tiny model as ComfyUI users keep it: split single files (transformer in models/unet/, encoders in
    models/clip/, the VAE in models/vae/) and one all-in-one checkpoint."""
    root = tmp_path_factory.mktemp("comfy")
    comfy = load_tool("make_tiny_flux")
    split = comfy.comfy_files(tiny_flux, root / "split")
    (root / "unet").mkdir()
    (root / "clip").mkdir()
    (root / "vae").mkdir()
    shutil.move(split["transformer"], root / "unet" / "flux1-dev.safetensors")
    shutil.move(root / "split" / "tokenizer_2", root / "unet" / "tokenizer_2")
    for part in ("text_encoder", "text_encoder_2"):
        shutil.move(split[part], root / "clip" / split[part].name)
    shutil.move(split["vae"], root / "vae" / "ae.safetensors")
    all_in_one = comfy.comfy_files(tiny_flux, root / "aio", all_in_one=True)
    return {"comfy": root, "all_in_one": all_in_one["transformer"]}


@pytest.fixture(scope="module")
def flux_server(base_config, model_store, tiny_flux, flux_files, tmp_path_factory):
    root = fresh_store(model_store, tmp_path_factory.mktemp("flux-store"))
    shutil.copytree(tiny_flux, root / "flux" / "tiny-dev")
    for folder in ("unet", "clip", "vae"):
        shutil.copytree(flux_files["comfy"] / folder, root / "comfy" / folder)
    shutil.copytree(flux_files["all_in_one"].parent, root / "aio")
    with ServerThread(replace(base_config, model_dir=root)) as running:
        yield running


@pytest.fixture(scope="module")
def flux_client(flux_server):
    with flux_server.client(timeout=300) as client:
        yield client


@pytest.fixture(scope="module")
def reference(tiny_flux):
    """diffusers' FLUX pipelines on the tiny model's weights."""
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(tiny_flux, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _diffusers(pipe, kind: str = "txt2img", seeds: tuple[int, ...] = (7,), **extra) -> list[np.ndarray]:
    from diffusers import FluxImg2ImgPipeline, FluxInpaintPipeline

    if kind != "txt2img":
        pipe = {"img2img": FluxImg2ImgPipeline, "inpaint": FluxInpaintPipeline}[kind].from_pipe(pipe)
        pipe.set_progress_bar_config(disable=True)
    arguments = dict(prompt=PROMPT, height=HEIGHT, width=WIDTH, guidance_scale=3.5,
                     generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
                     num_images_per_prompt=len(seeds))
    images = pipe(**{**arguments, **extra}).images
    return [np.asarray(image, dtype=np.int16) for image in images]


def _assert_close(images: list[bytes], expected: list[np.ndarray]) -> None:
    assert len(images) == len(expected)
    for image, reference in zip(images, expected):
        assert np.abs(_pixels(image) - reference).max() <= ROUNDING


def test_a_folder_uploaded_file_by_file_is_listed_and_matches_flux_pipeline(make_server, tiny_flux, reference) -> None:
    server = make_server(own_store=True, max_upload_bytes=64 * 1024 * 1024)
    with server.client(timeout=300) as client:
        for file in sorted(p for p in tiny_flux.rglob("*") if p.is_file()):
            client.upload(file, f"uploaded/tiny-flux/{file.relative_to(tiny_flux)}")
        echo = client.echo()
        summary = next(s for s in echo.model_summaries if s.name == "uploaded/tiny-flux")
        assert (summary.family, summary.default_steps, summary.default_cfg_scale, summary.size_multiple,
                summary.native_size, summary.default_sampler) == ("flux1", 28, 3.5, 16, 1024, "Euler")
        reply = client.generate(model="uploaded/tiny-flux", prompt=PROMPT, width=WIDTH, height=HEIGHT, steps=4,
                                seed=7)
    info = json.loads(reply.info)
    assert info["cfg_scale"] == 3.5 and info["scheduler"] == "FlowMatchEulerDiscreteScheduler"
    assert info["backends"]["transformer"] == "eager" and info["text_length"] == 512
    _assert_close(list(reply.images), _diffusers(reference, num_inference_steps=4))


def test_batches_and_true_cfg_match_flux_pipeline(flux_client, reference) -> None:
    reply = flux_client.generate(model="flux/tiny-dev", prompt=PROMPT, width=WIDTH, height=HEIGHT, steps=3, seed=11,
                                 batch_size=2)
    _assert_close(list(reply.images), _diffusers(reference, seeds=(11, 12), num_inference_steps=3))
    reply = flux_client.generate(model="flux/tiny-dev", prompt=PROMPT, negative_prompt="green", width=WIDTH,
                                 height=HEIGHT, steps=3, seed=4, true_cfg_scale=2.5)
    assert json.loads(reply.info)["guidance"] is True
    _assert_close(list(reply.images), _diffusers(reference, seeds=(4,), num_inference_steps=3,
                                                 negative_prompt="green", true_cfg_scale=2.5))


@pytest.mark.parametrize("kind, strength, steps", [("img2img", 0.7, 10), ("img2img", 0.6, 28), ("inpaint", 0.8, 6),
                                                   ("inpaint", 1.0, 4)])
def test_img2img_and_inpainting_match_flux_pipelines(flux_client, reference, kind, strength, steps) -> None:
    extra = {"mask": _png(MASK), "skip_mask_overlay": True} if kind == "inpaint" else {}
    reply = flux_client.generate(model="flux/tiny-dev", prompt=PROMPT, steps=steps, seed=5, init_image=_png(INIT),
                                 denoising_strength=strength, **extra)
    info = json.loads(reply.info)
    # diffusers' FLUX rule: int(steps - steps x strength) steps are skipped (28 x 0.6: 17 run, not SD's 16)
    assert info["denoising_steps"] == steps - int(steps - steps * strength)
    references = {"mask_image": MASK} if kind == "inpaint" else {}
    _assert_close(list(reply.images), _diffusers(reference, kind, seeds=(5,), image=INIT, strength=strength,
                                                 num_inference_steps=steps, **references))


def test_single_files_as_comfyui_keeps_them_give_the_folder_s_pixels(flux_client) -> None:
    # The all-in-one file holds the text encoders at fp16, as ComfyUI saves them; the rest is bit for bit.
    request = dict(prompt=PROMPT, width=WIDTH, height=HEIGHT, steps=3, seed=9)
    folder = flux_client.generate(model="flux/tiny-dev", **request).images[0]
    listed = {s.name: s.family for s in flux_client.echo().model_summaries}
    assert listed["comfy/unet/flux1-dev.safetensors"] == "flux1"
    assert listed["aio/flux1-dev-all-in-one.safetensors"] == "flux1"
    assert not any("clip_l" in name or "ae.safetensors" in name or "t5xxl" in name for name in listed)
    for name in ("comfy/unet/flux1-dev.safetensors", "aio/flux1-dev-all-in-one.safetensors"):
        reply = flux_client.generate(model=name, **request)
        assert np.abs(_pixels(reply.images[0]) - _pixels(folder)).max() <= ROUNDING, name
        assert json.loads(reply.info)["model_file"] == "single file"


def test_flow_samplers_match_their_diffusers_counterparts(flux_client, reference) -> None:
    from diffusers import DPMSolverMultistepScheduler

    reply = flux_client.generate(model="flux/tiny-dev", prompt=PROMPT, width=WIDTH, height=HEIGHT, steps=5, seed=2,
                                 sampler="DPM++ 2M")
    pipe = reference.__class__.from_pipe(reference)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(reference.scheduler.config, use_flow_sigmas=True,
                                                             prediction_type="flow_prediction", flow_shift=3.0)
    pipe.set_progress_bar_config(disable=True)
    _assert_close(list(reply.images), _diffusers(pipe, seeds=(2,), num_inference_steps=5))
    for sampler in ("UniPC AYS", "Euler A Trailing", "DDIM Trailing", "Heun", "LCM"):
        assert flux_client.generate(model="flux/tiny-dev", prompt=PROMPT, width=WIDTH, height=HEIGHT, steps=2, seed=2,
                                    sampler=sampler).images


def test_previews_come_from_the_16_channel_latents(flux_client) -> None:
    previews = []
    images, info = flux_client.generate_stream(lambda event, png: previews.append(png) if png else None,
                                               model="flux/tiny-dev", prompt=PROMPT, width=WIDTH, height=HEIGHT,
                                               steps=2, seed=1, preview_every=1)
    assert len(images) == 1 and len(previews) == 2
    assert Image.open(io.BytesIO(previews[0])).size == (WIDTH // 8, HEIGHT // 8)


def test_bad_inputs_get_clear_errors_and_the_server_keeps_serving(flux_server, flux_client, flux_files,
                                                                 model_store) -> None:
    root = flux_server.config.model_dir
    source = flux_files["comfy"] / "unet"
    shutil.copytree(source, root / "lonely" / "unet")  # the transformer and T5's tokenizer, no encoders, no VAE
    shutil.copytree(flux_files["comfy"], root / "broken")
    data = (source / "flux1-dev.safetensors").read_bytes()
    (root / "broken" / "unet" / "flux1-dev.safetensors").write_bytes(data[:len(data) // 2])  # header intact
    from tests.models.tiny_lora import write_kohya_lora
    from dts_util.models.loader import load_model

    builtin = load_model("b", model_store.root / "builtin-tiny-sd", "cpu")
    write_kohya_lora(root / "loras" / "sd-style.safetensors", builtin.unet(), builtin.prompt_encoders().text_encoders)
    cases = [
        (dict(model="flux/tiny-dev", width=72, height=64), grpc.StatusCode.INVALID_ARGUMENT, "multiple of 16"),
        (dict(model="flux/tiny-dev", sampler="DPM++ 2M SDE Karras"), grpc.StatusCode.FAILED_PRECONDITION,
         "no flow-matching counterpart"),
        (dict(model="flux/tiny-dev", sampler="PLMS"), grpc.StatusCode.FAILED_PRECONDITION, "Euler"),
        (dict(model="lonely/unet/flux1-dev.safetensors"), grpc.StatusCode.FAILED_PRECONDITION,
         "no CLIP-L text encoder (clip_l.safetensors); T5-XXL"),
        (dict(model="broken/unet/flux1-dev.safetensors"), grpc.StatusCode.FAILED_PRECONDITION, "broken/unet/flux1-dev"),
        (dict(model="flux/tiny-dev", prompt="<lora:sd-style:1>"), grpc.StatusCode.FAILED_PRECONDITION, "LoRA"),
        (dict(model="flux/tiny-dev", shift=-1), grpc.StatusCode.INVALID_ARGUMENT, "shift"),
    ]
    for fields, code, words in cases:
        with pytest.raises(grpc.RpcError) as caught:
            flux_client.generate(**{"prompt": PROMPT, "steps": 1, "width": 64, "height": 64, **fields})
        error = caught.value
        assert error.code() == code and words in error.details(), (fields, error.details())
        assert "/tmp" not in error.details() and "Traceback" not in error.details()
    assert flux_client.generate(model="flux/tiny-dev", prompt=PROMPT, width=64, height=64, steps=1).images


def test_flux_loras_in_diffusers_and_kohya_layouts_match_diffusers(flux_server, flux_client, reference,
                                                                    tiny_flux) -> None:
    root = flux_server.config.model_dir
    diffusers_lora = _write_diffusers_lora(root / "loras" / "flux-style.safetensors", reference.transformer)
    kohya_lora = _write_kohya_lora(root / "loras" / "flux-kohya.safetensors", reference.transformer)
    for path in (diffusers_lora, kohya_lora):
        reply = flux_client.generate(model="flux/tiny-dev", prompt=f"{PROMPT} <lora:{path.stem}:0.8>", width=WIDTH,
                                     height=HEIGHT, steps=3, seed=6)
        pipe = reference.__class__.from_pretrained(tiny_flux, local_files_only=True)
        pipe.set_progress_bar_config(disable=True)
        pipe.load_lora_weights(str(path), adapter_name="style")
        pipe.set_adapters(["style"], adapter_weights=[0.8])
        expected = _diffusers(pipe, seeds=(6,), num_inference_steps=3)
        _assert_close(list(reply.images), expected)
        plain = _diffusers(reference, seeds=(6,), num_inference_steps=3)
        assert np.abs(_pixels(reply.images[0]) - plain[0]).max() > 2, "the LoRA changed nothing"


def _lora_pair(generator: torch.Generator, rows: int, columns: int, rank: int = 4) -> tuple[torch.Tensor, ...]:
    return (torch.randn(rank, columns, generator=generator) * 0.5, torch.randn(rows, rank, generator=generator) * 0.5)


def _write_diffusers_lora(path: Path, transformer) -> Path:
    """A PEFT-layout FLUX LoRA (``transformer.<module>.lora_A/B.weight``) on every attention projection."""
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(3)
    tensors = {}
    for name, module in transformer.named_modules():
        if name.endswith(("attn.to_q", "attn.to_k", "attn.to_v")):
            down, up = _lora_pair(generator, module.out_features, module.in_features)
            tensors[f"transformer.{name}.lora_A.weight"], tensors[f"transformer.{name}.lora_B.weight"] = down, up
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return path


def _write_kohya_lora(path: Path, transformer) -> Path:
    """A kohya (sd-scripts) FLUX LoRA on the double blocks' fused qkv and the single blocks' linear1, with alphas."""
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(4)
    inner = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    tensors = {}
    for i in range(transformer.config.num_layers):
        down, up = _lora_pair(generator, 3 * inner, inner)
        key = f"lora_unet_double_blocks_{i}_img_attn_qkv"
        tensors.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(4.0)})
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return path


def test_the_app_protocol_lists_flux1_and_maps_its_flux_settings(flux_server, reference) -> None:
    from dts_util.grpc.proto import draw_things_app_pb2 as app_pb
    from tests.grpc.drawthings_app.app_client import configuration, generate, result_pixels, stub

    channel, app = stub(flux_server.target)
    with channel:
        specs = json.loads(app.Echo(app_pb.EchoRequest(), timeout=60).override.models)
        spec = next(s for s in specs if s["name"] == "flux/tiny-dev")
        assert (spec["file"], spec["version"], spec["guidance_embed"], spec["default_scale"]) == \
            ("flux_tiny-dev.ckpt", "flux1", True, 16)
        # The app's FLUX defaults: guidance embed 3.5 with "speed up" on (no CFG), resolution-dependent shift.
        # DDIM Trailing (16) is flow Euler on a flow model; seed mode 1 is torch.randn on the CPU.
        base = dict(model="flux_tiny-dev.ckpt", start_width=2, start_height=1, steps=3, seed=8, sampler=16,
                    guidance_scale=4.5, seed_mode=1)
        _, images = generate(app, prompt=PROMPT, configuration=configuration(**base))
        expected = _diffusers(reference, seeds=(8,), num_inference_steps=3, width=128, height=64)
        assert np.abs(result_pixels(images[0]) - expected[0]).max() <= 2  # the app's fp16 transport
        # Speed-up off: the app's guidance is true CFG with the negative prompt, beside the guidance embedding.
        _, images = generate(app, prompt=PROMPT, negativePrompt="green", configuration=configuration(
            **base, speed_up_with_guidance_embed=False, guidance_embed=4.0))
        expected = _diffusers(reference, seeds=(8,), num_inference_steps=3, width=128, height=64, guidance_scale=4.0,
                              negative_prompt="green", true_cfg_scale=4.5)
        assert np.abs(result_pixels(images[0]) - expected[0]).max() <= 2


def test_schnell_is_told_apart_by_its_config_and_matches_flux_pipeline(make_server, tmp_path) -> None:
    from diffusers import FluxPipeline

    folder = load_tool("make_tiny_flux").build(tmp_path / "tiny-schnell", schnell=True)
    server = make_server(own_store=True)
    shutil.copytree(folder, server.config.model_dir / "flux" / "tiny-schnell")
    with server.client(timeout=300) as client:
        summary = next(s for s in client.echo().model_summaries if s.name == "flux/tiny-schnell")
        assert (summary.family, summary.default_steps) == ("flux1", 4)  # step-distilled: few steps, no guidance
        reply = client.generate(model="flux/tiny-schnell", prompt=PROMPT, width=WIDTH, height=HEIGHT, seed=3)
    assert json.loads(reply.info)["steps"] == 4
    pipe = FluxPipeline.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    _assert_close(list(reply.images), _diffusers(pipe, seeds=(3,), num_inference_steps=4))
