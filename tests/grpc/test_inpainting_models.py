"""Dedicated inpainting models (a UNet of 9 input channels), from single files and diffusers folders.

A tiny seeded SD1.x inpainting pipeline is converted to one checkpoint by the project's converter, uploaded
through gRPC and served: inpainting as diffusers' ``StableDiffusionInpaintPipeline`` does it (the mask and the
masked image's latents beside the latents), img2img and txt2img with everything repainted, as A1111 does.
"""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from tests.grpc.test_image_to_image import ROUNDING, _box_mask, _noise_image, _pixels, _png
from tests.models.tiny_pipelines import build, single_file

SIZE = (96, 64)
INIT, MASK = _noise_image(*SIZE), _box_mask(*SIZE, box=(20, 10, 70, 50))
REQUEST = dict(prompt="a cat", negative_prompt="dog", steps=6, seed=3, sampler="Euler")


@pytest.fixture(scope="module")
def inpainting_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("inpainting")
    folder = build("sd1", root / "tiny-sd1-inpainting", inpainting=True)
    return folder, single_file(folder, root / "tiny-sd1-inpainting.safetensors")


@pytest.fixture
def inpainting_server(make_server, inpainting_files):
    server = make_server(own_store=True, max_upload_bytes=1 << 30, max_loaded_models=3)
    shutil.copytree(inpainting_files[0], server.service.store.root / "folders/tiny-sd1-inpainting")
    return server


def _diffusers_inpaint(folder, strength: float) -> np.ndarray:
    import diffusers
    import torch

    from dts_util.models.loader import inspect_model
    from dts_util.pipeline.samplers import find_sampler, make_scheduler

    pipe = diffusers.StableDiffusionInpaintPipeline.from_pretrained(folder, safety_checker=None,
                                                                    requires_safety_checker=False)
    pipe.scheduler = make_scheduler(find_sampler("Euler"), inspect_model("m", folder).scheduler_config)
    pipe.set_progress_bar_config(disable=True)
    image = pipe(prompt=REQUEST["prompt"], negative_prompt=REQUEST["negative_prompt"], image=INIT, mask_image=MASK,
                 width=SIZE[0], height=SIZE[1], strength=strength, num_inference_steps=REQUEST["steps"],
                 guidance_scale=7.0, generator=[torch.Generator("cpu").manual_seed(REQUEST["seed"])]).images[0]
    return np.asarray(image, dtype=np.int16)


@pytest.mark.parametrize("strength", [0.6, 1.0])
def test_an_uploaded_inpainting_checkpoint_serves_as_diffusers_inpaints(inpainting_server, inpainting_files,
                                                                        strength) -> None:
    name = "checkpoints/tiny-sd1-inpainting.safetensors"
    fields = dict(**REQUEST, denoising_strength=strength, init_image=_png(INIT), mask=_png(MASK),
                  skip_mask_overlay=True)
    with inpainting_server.client(timeout=300) as client:
        client.upload(inpainting_files[1], name)
        assert name in client.echo().models
        from_file = client.generate(model=name, **fields)
        from_folder = client.generate(model="folders/tiny-sd1-inpainting", **fields)
    assert np.array_equal(_pixels(from_file.images[0]), _pixels(from_folder.images[0]))
    expected = _diffusers_inpaint(inpainting_files[0], strength)
    assert np.abs(_pixels(from_folder.images[0]) - expected).max() <= ROUNDING
    info = json.loads(from_file.info)
    assert info["mode"] == "inpaint" and info["model_file"] == "single file"


def test_an_inpainting_model_also_does_txt2img_and_img2img(inpainting_server) -> None:
    model = "folders/tiny-sd1-inpainting"
    with inpainting_server.client(timeout=300) as client:
        txt2img = client.generate(model=model, **REQUEST, width=SIZE[0], height=SIZE[1])
        img2img = client.generate(model=model, **REQUEST, init_image=_png(INIT))
        inpainted = client.generate(model=model, **REQUEST, init_image=_png(INIT), mask=_png(MASK))
    assert Image.open(io.BytesIO(txt2img.images[0])).size == SIZE
    assert json.loads(txt2img.info)["backends"]["vae_encoder"] == "eager"  # the grey image it is conditioned on
    assert json.loads(img2img.info)["mode"] == "img2img"
    kept = _pixels(inpainted.images[0])
    outside = np.ones((SIZE[1], SIZE[0]), dtype=bool)
    outside[10:50, 20:70] = False
    assert np.array_equal(kept[outside], np.asarray(INIT, dtype=np.int16)[outside])


@pytest.fixture(scope="module")
def sdxl_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("sdxl")
    return build("sdxl", root / "tiny-sdxl"), build("sdxl", root / "tiny-sdxl-inpainting", inpainting=True)


def _diffusers_sdxl(folder, kind: str, strength: float, **extra) -> np.ndarray:
    import diffusers
    import torch

    from dts_util.models.loader import inspect_model
    from dts_util.pipeline.samplers import find_sampler, make_scheduler

    cls = {"img2img": diffusers.StableDiffusionXLImg2ImgPipeline,
           "inpaint": diffusers.StableDiffusionXLInpaintPipeline}[kind]
    pipe = cls.from_pretrained(folder)
    pipe.scheduler = make_scheduler(find_sampler("Euler"), inspect_model("m", folder).scheduler_config)
    pipe.set_progress_bar_config(disable=True)
    image = pipe(prompt=REQUEST["prompt"], negative_prompt=REQUEST["negative_prompt"], image=INIT, strength=strength,
                 num_inference_steps=REQUEST["steps"], guidance_scale=7.0,
                 generator=[torch.Generator("cpu").manual_seed(REQUEST["seed"])], **extra).images[0]
    return np.asarray(image, dtype=np.int16)


def test_sdxl_img2img_and_inpainting_match_diffusers(make_server, sdxl_folders) -> None:
    server = make_server(own_store=True, max_loaded_models=3)
    root = server.service.store.root
    for folder in sdxl_folders:
        shutil.copytree(folder, root / folder.name)
    with server.client(timeout=300) as client:
        img2img = client.generate(model="tiny-sdxl", **REQUEST, denoising_strength=0.6, init_image=_png(INIT))
        inpainted = client.generate(model="tiny-sdxl-inpainting", **REQUEST, denoising_strength=0.6,
                                    init_image=_png(INIT), mask=_png(MASK), skip_mask_overlay=True)
    expected = _diffusers_sdxl(sdxl_folders[0], "img2img", 0.6)
    assert np.abs(_pixels(img2img.images[0]) - expected).max() <= ROUNDING
    expected = _diffusers_sdxl(sdxl_folders[1], "inpaint", 0.6, mask_image=MASK, width=SIZE[0], height=SIZE[1])
    assert np.abs(_pixels(inpainted.images[0]) - expected).max() <= ROUNDING
