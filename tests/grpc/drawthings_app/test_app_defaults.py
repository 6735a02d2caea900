"""The app as its users run it: its default configuration (Defaults.swift) and its recommended SD 1.5 and SDXL
configurations (configs.json, the same as drawthings-py's presets) generate, with diffusers' pixels.

Configurations are written by flatc's code for the app's schema (drawthings-py), the presets read from
drawthings-py's own files; the reference is diffusers' pipeline with the matching scheduler configuration (AYS
timesteps) and the seed mode's starting noise passed in as ``latents``.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.grpc.drawthings_app.app_client import generate, image_tensor, mask_tensor, result_pixels, stub
from tests.grpc.drawthings_app.test_app_protocol import MODEL
from tests.grpc.drawthings_app.test_independent_client import _pack
from tests.models.tiny_pipelines import build

PROMPT = "a lighthouse on a cliff"
ROUNDING = 2  # levels: fp16 transport of the result, then the same float computation rounded
# Defaults.swift's GenerationConfiguration.default, field for field (64-pixel units for sizes).
APP_DEFAULTS = dict(startWidth=8, startHeight=8, seed=1234, steps=20, guidanceScale=4.5, strength=1.0, sampler=18,
                    hiresFixStartWidth=7, hiresFixStartHeight=7, hiresFixStrength=0.7, imageGuidanceScale=1.5,
                    seedMode=2, clipSkip=1, maskBlur=1.5, clipWeight=1.0, aestheticScore=6.0,
                    negativeAestheticScore=2.5, refinerStart=0.85, fpsId=5, motionBucketId=127, condAug=0.02,
                    startFrameCfg=1.0, numFrames=14, maskBlurOutset=0, sharpness=0.0)


@pytest.fixture(scope="module")
def flatc_config():
    from tests.grpc.drawthings_app.test_independent_client import flatc_config as fixture

    return fixture.__wrapped__()


def _preset(name: str) -> dict:
    spec = importlib.util.find_spec("drawthings_py")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("drawthings-py is not installed (tools/setup.sh installs it)")
    path = Path(next(iter(spec.submodule_search_locations))) / "resources/configs" / f"{name}.json"
    return json.loads(path.read_text())["configuration"]


def _from_json(preset: dict) -> dict:
    """A JSON configuration (pixels for width/height, as configs.json writes it) as flatc's field names."""
    fields = {key: value for key, value in preset.items() if key not in ("width", "height", "loras", "controls")}
    fields.update(startWidth=preset["width"] // 64, startHeight=preset["height"] // 64)
    return fields


def _configuration(flatc_config, **fields) -> bytes:
    known = {key: value for key, value in fields.items() if hasattr(flatc_config.GenerationConfigurationT(), key)}
    return _pack(flatc_config, **known)


def _diffusers(pipe_class, folder: Path, *, seed: int, steps: int, guidance: float, size: int, family: str,
               **extra) -> np.ndarray:
    import torch

    from dts_util.models.loader import inspect_model
    from dts_util.pipeline.noise import initial_noise
    from dts_util.pipeline.samplers import find_sampler, make_scheduler, sampler_timesteps

    pipe = pipe_class.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    config = inspect_model("m", folder).scheduler_config
    sampler = find_sampler(extra.pop("sampler"))
    pipe.scheduler = make_scheduler(sampler, config)
    latent = size // 8
    noise = initial_noise(extra.pop("seed_mode"), seed, (4, latent, latent), torch.Generator().manual_seed(seed))
    image = pipe(prompt=PROMPT, width=size, height=size, guidance_scale=guidance, latents=noise,
                 timesteps=sampler_timesteps(sampler, steps, family, config),
                 generator=torch.Generator().manual_seed(seed), **extra).images[0]
    return np.asarray(image, dtype=np.int16)


def test_the_app_default_configuration_generates_txt2img_img2img_and_inpainting(flatc_config, server,
                                                                                model_store) -> None:
    import diffusers

    data = _configuration(flatc_config, **{**APP_DEFAULTS, "startWidth": 2, "startHeight": 2, "steps": 6,
                                           "model": MODEL})
    channel, app_stub = stub(server.target)
    init = Image.fromarray(np.random.default_rng(1).integers(0, 256, (128, 128, 3), dtype=np.uint8))
    mask = Image.new("L", (128, 128))
    mask.paste(255, (32, 32, 96, 96))
    with channel:
        _, (txt2img,) = generate(app_stub, prompt=PROMPT, configuration=data)
        img2img_data = _configuration(flatc_config, **{**APP_DEFAULTS, "startWidth": 2, "startHeight": 2, "steps": 6,
                                                       "strength": 0.7, "model": MODEL})
        _, (img2img,) = generate(app_stub, prompt=PROMPT, configuration=img2img_data, image=image_tensor(init))
        _, (inpainted,) = generate(app_stub, prompt=PROMPT, configuration=img2img_data, image=image_tensor(init),
                                   mask=mask_tensor(mask))
    expected = _diffusers(diffusers.StableDiffusionPipeline, model_store.root / "builtin-tiny-sd", seed=1234, steps=6,
                          guidance=4.5, size=128, family="sd1", sampler="UniPC AYS", seed_mode="scale_alike",
                          negative_prompt="")
    assert np.abs(result_pixels(txt2img) - expected).max() <= ROUNDING
    assert not np.array_equal(result_pixels(img2img), result_pixels(txt2img))
    kept = result_pixels(inpainted)
    original = np.asarray(init, dtype=np.int16)
    # outside the blurred edge (1.5 px sigma) the input is kept exactly, up to the fp16 transport
    assert np.abs(kept[:16] - original[:16]).max() <= 1


def test_drawthings_py_stable_diffusion_preset_matches_diffusers(flatc_config, server, model_store) -> None:
    import diffusers

    preset = _preset("stable_diffusion")
    assert preset["sampler"] == 12 and preset["seedMode"] == 2  # DPM++ 2M AYS, Scale Alike
    fields = {**_from_json(preset), "startWidth": 2, "startHeight": 2, "steps": 5, "seed": 99, "model": MODEL}
    channel, app_stub = stub(server.target)
    with channel:
        _, (image,) = generate(app_stub, prompt=PROMPT, configuration=_configuration(flatc_config, **fields))
    expected = _diffusers(diffusers.StableDiffusionPipeline, model_store.root / "builtin-tiny-sd", seed=99, steps=5,
                          guidance=preset["guidanceScale"], size=128, family="sd1", sampler="DPM++ 2M AYS",
                          seed_mode="scale_alike", negative_prompt="")
    assert np.abs(result_pixels(image) - expected).max() <= ROUNDING


@pytest.fixture(scope="module")
def sdxl_folder(tmp_path_factory) -> Path:
    return build("sdxl", tmp_path_factory.mktemp("sdxl") / "tiny-sdxl")


def test_the_recommended_sdxl_configuration_matches_diffusers_xl(flatc_config, make_server, sdxl_folder) -> None:
    """Zero negative prompt, negative original size 512x512, original and target 1024, DPM++ 2M AYS, clip skip 2."""
    import diffusers

    preset = _preset("sdxl")
    assert preset["zeroNegativePrompt"] and preset["negativeOriginalImageWidth"] == 512
    server = make_server(own_store=True)
    shutil.copytree(sdxl_folder, server.service.store.root / sdxl_folder.name)
    fields = {**_from_json(preset), "startWidth": 2, "startHeight": 2, "steps": 4, "seed": 3, "clipSkip": 1,
              "model": "tiny-sdxl.ckpt"}
    channel, app_stub = stub(server.target)
    init = Image.fromarray(np.random.default_rng(2).integers(0, 256, (128, 128, 3), dtype=np.uint8))
    mask = Image.new("L", (128, 128))
    mask.paste(255, (40, 40, 88, 88))
    with channel:
        _, (image,) = generate(app_stub, prompt=PROMPT, configuration=_configuration(flatc_config, **fields))
        partial = _configuration(flatc_config, **{**fields, "strength": 0.6})
        _, (img2img,) = generate(app_stub, prompt=PROMPT, configuration=partial, image=image_tensor(init))
        _, (inpainted,) = generate(app_stub, prompt=PROMPT, configuration=partial, image=image_tensor(init),
                                   mask=mask_tensor(mask))
    assert result_pixels(img2img).shape == result_pixels(inpainted).shape == (128, 128, 3)
    # preserve original after inpaint (the default): far from the mask's blurred edge the input shows unchanged
    assert np.abs(result_pixels(inpainted)[:16] - np.asarray(init, dtype=np.int16)[:16]).max() <= 1
    expected = _diffusers(diffusers.StableDiffusionXLPipeline, sdxl_folder, seed=3, steps=4,
                          guidance=preset["guidanceScale"], size=128, family="sdxl", sampler="DPM++ 2M AYS",
                          seed_mode="scale_alike", negative_prompt=None, original_size=(1024, 1024),
                          target_size=(1024, 1024), negative_original_size=(512, 512),
                          negative_target_size=(1024, 1024))
    assert np.abs(result_pixels(image) - expected).max() <= ROUNDING


def test_previews_are_the_latents_at_the_apps_cadence(flatc_config, server) -> None:
    """gRPCServerCLI's previewImage: the sampler's latents as an fp16 NHWC tensor, beside a sampling signpost, on odd
    steps in the first half and every step after it."""
    import struct

    data = _configuration(flatc_config, **{**APP_DEFAULTS, "startWidth": 2, "startHeight": 2, "steps": 6,
                                           "model": MODEL})
    channel, app_stub = stub(server.target)
    with channel:
        responses, _ = generate(app_stub, prompt=PROMPT, configuration=data)
    previews = [r for r in responses if r.HasField("previewImage")]
    assert [r.currentSignpost.sampling.step for r in previews] == [2, 4, 5, 6]
    identifier, memory, layout, datatype, _, *dims = struct.unpack_from("<5I12i", previews[-1].previewImage)
    assert (identifier, memory, layout, datatype) == (0, 1, 2, 0x20000) and dims[:4] == [1, 16, 16, 4]
    values = np.frombuffer(previews[-1].previewImage, dtype="<f2", offset=68)
    assert values.size == 16 * 16 * 4 and np.isfinite(values).all()
