"""Every sampler of the Draw Things app, by its app name, against diffusers' pipeline with the matching scheduler
configuration (AYS timesteps, trailing spacing, the app's TCD / LCM / Substep schedules) on the same seed."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from dts_util.pipeline.samplers import APP_SAMPLERS, SAMPLERS, ays_timesteps, find_sampler, sampler_timesteps

SD_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                    steps_offset=1)
REQUEST = dict(prompt="a lighthouse at dusk", negative_prompt="blurry", width=128, height=128, seed=11,
               cfg_scale=4.5)
ROUNDING = 1


@pytest.fixture(scope="module")
def reference_pipeline(model_store):
    import diffusers

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(model_store.root / "builtin-tiny-sd",
                                                            safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.model_scheduler_config = dict(pipe.scheduler.config)  # each test's scheduler is built from the model's
    return pipe


def _diffusers_image(pipe, sampler_name: str, steps: int) -> np.ndarray:
    import torch

    from dts_util.pipeline.samplers import make_scheduler

    sampler = find_sampler(sampler_name)
    pipe.scheduler = make_scheduler(sampler, pipe.model_scheduler_config)
    timesteps = sampler_timesteps(sampler, steps, "sd1", pipe.model_scheduler_config)
    schedule = {"num_inference_steps": steps} if timesteps is None else {"timesteps": timesteps}
    if sampler.scheduler == "TCDScheduler":
        schedule["eta"] = 0.3  # the app's stochastic sampling gamma (the pipeline's own default is 0)
    image = pipe(prompt=REQUEST["prompt"], negative_prompt=REQUEST["negative_prompt"], width=128, height=128,
                 guidance_scale=REQUEST["cfg_scale"], generator=torch.Generator("cpu").manual_seed(REQUEST["seed"]),
                 **schedule).images[0]
    return np.asarray(image, dtype=np.int16)


def test_every_app_sampler_has_a_name() -> None:
    assert len(APP_SAMPLERS) == 20
    for value, app_name in enumerate(APP_SAMPLERS):
        assert find_sampler(app_name).app_name == app_name
    assert find_sampler("uni_pc_ays".replace("_", "")).name == "UniPC AYS"


def test_ays_ten_steps_are_nvidias_table_and_other_counts_interpolate() -> None:
    from diffusers.schedulers import AysSchedules

    assert ays_timesteps("sd1", 10, SD_SCHEDULER) == AysSchedules["StableDiffusionTimesteps"]
    assert ays_timesteps("sdxl", 10, SD_SCHEDULER) == AysSchedules["StableDiffusionXLTimesteps"]
    # log-linear in sigma between the table's points, ends kept (as the app's schedules for these counts)
    assert ays_timesteps("sd1", 4, SD_SCHEDULER) == [999, 645, 343, 24]
    assert ays_timesteps("sd1", 8, SD_SCHEDULER) == [999, 819, 685, 560, 439, 294, 151, 24]
    assert ays_timesteps("sdxl", 8, SD_SCHEDULER) == [999, 814, 651, 464, 292, 157, 67, 13]
    twenty = ays_timesteps("sdxl", 20, SD_SCHEDULER)
    assert twenty[0] == 999 and twenty[-1] == 13 and twenty == sorted(twenty, reverse=True)


def test_app_schedules() -> None:
    def timesteps(name: str, steps: int) -> list[int] | None:
        return sampler_timesteps(find_sampler(name), steps, "sd1", SD_SCHEDULER)

    assert timesteps("EulerASubstep", 3) == [999, 899, 799]
    assert timesteps("EulerASubstep", 12) is None  # from 10 steps on: the scheduler's spacing, as the app
    assert timesteps("TCD", 4) == [999, 749, 500, 250]
    assert timesteps("TCDTrailing", 4) == [999, 799, 599, 399]
    assert timesteps("LCM", 4) == [999, 754, 510, 265]
    assert timesteps("UniPCTrailing", 4) is None and find_sampler("UniPCTrailing").config["timestep_spacing"]


@pytest.mark.parametrize("app_name", APP_SAMPLERS)
def test_app_sampler_matches_diffusers(client, reference_pipeline, app_name: str) -> None:
    steps = 4
    reply = client.generate(**REQUEST, steps=steps, sampler=app_name)
    info = json.loads(reply.info)
    assert info["sampler"] == find_sampler(app_name).name
    ours = np.asarray(Image.open(io.BytesIO(reply.images[0])).convert("RGB"), dtype=np.int16)
    assert np.abs(ours - _diffusers_image(reference_pipeline, app_name, steps)).max() <= ROUNDING


@pytest.mark.parametrize("sampler", [s for s in SAMPLERS if s.schedule], ids=lambda s: s.name)
@pytest.mark.parametrize("steps", [1, 7, 25])
def test_scheduled_samplers_set_every_step_count(sampler, steps: int) -> None:
    from dts_util.pipeline.samplers import make_scheduler, set_schedule

    scheduler = make_scheduler(sampler, SD_SCHEDULER)
    set_schedule(scheduler, sampler, steps, "sd1", "cpu")
    assert len(scheduler.timesteps) == steps * getattr(scheduler, "order", 1)
