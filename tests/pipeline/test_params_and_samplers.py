"""Parameter defaults and checks, sampler names, infotext."""

from __future__ import annotations

import pytest

from dts_util.errors import InvalidRequest
from dts_util.pipeline.encode import infotext
from dts_util.pipeline.params import GenerationRequest, hr_dimension, resolve
from dts_util.pipeline.samplers import SAMPLERS, find_sampler, make_scheduler, sampler_names

SD_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                    steps_offset=1)


def test_zero_means_default() -> None:
    r = resolve(GenerationRequest(seed=5), "m", 512)
    assert (r.width, r.height, r.steps, r.cfg_scale, r.batch_size, r.batch_count) == (512, 512, 20, 7.0, 1, 1)
    assert r.denoising_strength == 0.7 and r.hr_scale == 2.0 and r.sampler.name == "DPM++ 2M Karras"
    assert r.seeds == [5]


def test_output_size_with_high_res_fix() -> None:
    r = resolve(GenerationRequest(width=512, height=384, enable_hr=True, hr_scale=1.5), "m", 512)
    assert r.output_size == (768, 576)
    assert hr_dimension(100, 1.3) == 128


@pytest.mark.parametrize("sampler", SAMPLERS, ids=lambda s: s.name)
def test_every_sampler_builds_a_scheduler(sampler) -> None:
    scheduler = make_scheduler(sampler, SD_SCHEDULER)
    scheduler.set_timesteps(10)
    assert sampler.scheduler in [cls.__name__ for cls in type(scheduler).__mro__] and len(scheduler.timesteps) >= 10


def test_unknown_sampler_lists_valid_names() -> None:
    with pytest.raises(InvalidRequest) as caught:
        find_sampler("k_lms_magic")
    assert all(name in str(caught.value) for name in sampler_names())


def test_infotext_is_a1111_format() -> None:
    r = resolve(GenerationRequest(prompt="p", negative_prompt="n", seed=3, steps=9, cfg_scale=5.5,
                                  sampler="euler a"), "tiny", 256)
    assert infotext(r, 4) == ("p\nNegative prompt: n\nSteps: 9, Sampler: Euler a, CFG scale: 5.5, Seed: 4, "
                              "Size: 256x256, Model: tiny, Version: dts-util 0.1.0")


@pytest.mark.parametrize("steps,strength", [(4, 0.7), (20, 0.7), (10, 0.5), (7, 0.99), (30, 0.3), (3, 1.0)])
def test_img2img_start_matches_diffusers_get_timesteps(steps: int, strength: float) -> None:
    from diffusers import StableDiffusionImg2ImgPipeline
    from diffusers.schedulers import DDIMScheduler

    from dts_util.pipeline.params import img2img_start_step

    scheduler = DDIMScheduler()
    scheduler.set_timesteps(steps)
    pipe = StableDiffusionImg2ImgPipeline.__new__(StableDiffusionImg2ImgPipeline)
    pipe.scheduler = scheduler
    timesteps, runs = pipe.get_timesteps(steps, strength, "cpu")
    assert steps - img2img_start_step(steps, strength) == runs == len(timesteps)
    assert img2img_start_step(4, 0.7) == 2  # runs 2 steps, not 3


def _result(size: int = 64):
    import numpy as np
    from PIL import Image

    from dts_util.pipeline.generation import GenerationResult

    pixels = (np.random.default_rng(0).random((size, size, 3)) * 255).astype(np.uint8)
    return GenerationResult(images=[Image.fromarray(pixels)], seeds=[7]), pixels


@pytest.mark.parametrize("compression", ["fast", "1", "9"])
def test_png_output_is_lossless_and_carries_parameters(compression: str) -> None:
    import io

    import numpy as np
    from PIL import Image

    from dts_util.pipeline.encode import encode_images

    result, pixels = _result()
    req = resolve(GenerationRequest(prompt="a caf\u00e9 \u2615", seed=7), "m", 256)
    png = Image.open(io.BytesIO(encode_images(req, result, compression)[0]))
    assert np.array_equal(np.asarray(png), pixels)
    assert png.text["parameters"].startswith("a caf\u00e9 \u2615\n") and "Seed: 7" in png.text["parameters"]


@pytest.mark.parametrize("kind", ["webp", "jpeg"])
def test_lossy_formats_carry_parameters_in_exif(kind: str) -> None:
    import io

    from PIL import Image

    from dts_util.pipeline.encode import encode_images

    result, _ = _result()
    req = resolve(GenerationRequest(prompt="a lighthouse", seed=7, output_format=kind.upper(), quality=80), "m", 256)
    image = Image.open(io.BytesIO(encode_images(req, result)[0]))
    assert image.format == kind.upper()
    comment = image.getexif().get_ifd(0x8769)[0x9286]
    assert comment.startswith(b"UNICODE\0") and "Seed: 7" in comment[8:].decode("utf-16-be")


def test_bad_output_format_and_quality() -> None:
    with pytest.raises(InvalidRequest, match="not png, webp or jpeg"):
        resolve(GenerationRequest(output_format="gif"), "m", 256)
    with pytest.raises(InvalidRequest, match="quality is 101"):
        resolve(GenerationRequest(quality=101), "m", 256)
