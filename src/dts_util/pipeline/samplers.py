"""Sampler names -> diffusers schedulers and their timestep schedules.

Clients send A1111 names ("Euler a", "DPM++ 2M Karras"), Draw Things display names
("UniPC AYS", "Euler A Trailing") or the Draw Things app's ``SamplerType`` names
("UniPCAYS", "DPMPP2MAYS"); all map, case-insensitively, onto a diffusers scheduler
class plus config overrides, created with ``from_config`` from the model's own
scheduler config so betas and offsets stay the model's.

A sampler's *schedule* says which timesteps it visits:

- the scheduler's own spacing (``timestep_spacing`` from the model, ``trailing`` for the
  Trailing variants, Karras sigmas for the Karras ones);
- ``ays``: NVIDIA's Align Your Steps timesteps for the model family (diffusers'
  ``AysSchedules``); other step counts are interpolated log-linearly in sigma, as the
  app does (interpolate the 10 log-sigmas, map each sigma back to a timestep, round);
- ``substep``: the app's fixed 100-timestep strides (999, 899, ...) for 1..9 steps;
- ``tcd`` / ``tcd_trailing`` / ``lcm``: the app's TCD and LCM timesteps.

Every schedule reaches diffusers through ``set_timesteps(timesteps=...)``; schedulers whose
``set_timesteps`` has no such argument (UniPC, Euler ancestral) get it from a small mixin
that computes sigmas from the timesteps exactly as their own spacing branch does.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Callable

from dts_util.client_text import quote
from dts_util.errors import InvalidRequest

if TYPE_CHECKING:  # numpy and diffusers load with the model: the protocols resolve sampler names without them
    import numpy as np

DEFAULT_SAMPLER = "DPM++ 2M Karras"
TRAIN_TIMESTEPS = 1000
# The app's manual schedule of its Substep samplers; from 10 steps on they fall back to the scheduler's spacing.
MAX_SUBSTEP_STEPS = 9


@dataclass(frozen=True)
class Sampler:
    """One sampler: its display name, the app's ``SamplerType`` name, aliases and the scheduler it builds."""

    name: str
    scheduler: str
    config: dict[str, Any] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()
    app_name: str = ""  # the Draw Things app's SamplerType case ("" = not one of the app's samplers)
    schedule: str = ""  # "" (the scheduler's own spacing), "ays", "substep", "tcd", "tcd_trailing" or "lcm"


KARRAS = {"use_karras_sigmas": True}
TRAILING = {"timestep_spacing": "trailing"}
SDE = {"algorithm_type": "sde-dpmsolver++"}
# The app's SamplerType, in its order (its values are the positions in this tuple).
APP_SAMPLERS = ("DPMPP2MKarras", "EulerA", "DDIM", "PLMS", "DPMPPSDEKarras", "UniPC", "LCM", "EulerASubstep",
                "DPMPPSDESubstep", "TCD", "EulerATrailing", "DPMPPSDETrailing", "DPMPP2MAYS", "EulerAAYS",
                "DPMPPSDEAYS", "DPMPP2MTrailing", "DDIMTrailing", "UniPCTrailing", "UniPCAYS", "TCDTrailing")
SAMPLERS: tuple[Sampler, ...] = (
    Sampler("DPM++ 2M Karras", "DPMSolverMultistepScheduler", KARRAS, app_name="DPMPP2MKarras"),
    Sampler("DPM++ 2M", "DPMSolverMultistepScheduler"),
    Sampler("DPM++ 2M Trailing", "DPMSolverMultistepScheduler", TRAILING, app_name="DPMPP2MTrailing"),
    Sampler("DPM++ 2M AYS", "DPMSolverMultistepScheduler", app_name="DPMPP2MAYS", schedule="ays"),
    Sampler("DPM++ 2M SDE Karras", "DPMSolverMultistepScheduler", {**SDE, **KARRAS},
            aliases=("DPM++ SDE Karras",), app_name="DPMPPSDEKarras"),
    Sampler("DPM++ 2M SDE", "DPMSolverMultistepScheduler", SDE, aliases=("DPM++ SDE",)),
    Sampler("DPM++ SDE Trailing", "DPMSolverMultistepScheduler", {**SDE, **TRAILING}, app_name="DPMPPSDETrailing"),
    Sampler("DPM++ SDE AYS", "DPMSolverMultistepScheduler", SDE, app_name="DPMPPSDEAYS", schedule="ays"),
    Sampler("DPM++ SDE Substep", "DPMSolverMultistepScheduler", SDE, app_name="DPMPPSDESubstep", schedule="substep"),
    Sampler("Euler a", "EulerAncestralDiscreteScheduler", aliases=("Euler Ancestral",), app_name="EulerA"),
    Sampler("Euler A Trailing", "EulerAncestralDiscreteScheduler", TRAILING, app_name="EulerATrailing"),
    Sampler("Euler A AYS", "EulerAncestralDiscreteScheduler", app_name="EulerAAYS", schedule="ays"),
    Sampler("Euler A Substep", "EulerAncestralDiscreteScheduler", app_name="EulerASubstep", schedule="substep"),
    Sampler("Euler", "EulerDiscreteScheduler"),
    Sampler("Euler Karras", "EulerDiscreteScheduler", KARRAS),
    Sampler("Heun", "HeunDiscreteScheduler"),
    Sampler("DPM2", "KDPM2DiscreteScheduler"),
    Sampler("DPM2 a", "KDPM2AncestralDiscreteScheduler"),
    Sampler("DDIM", "DDIMScheduler", app_name="DDIM"),
    Sampler("DDIM Trailing", "DDIMScheduler", TRAILING, app_name="DDIMTrailing"),
    Sampler("PLMS", "PNDMScheduler", {"skip_prk_steps": True}, aliases=("PNDM",), app_name="PLMS"),
    Sampler("DDPM", "DDPMScheduler"),
    Sampler("UniPC", "UniPCMultistepScheduler", app_name="UniPC"),
    Sampler("UniPC Trailing", "UniPCMultistepScheduler", TRAILING, app_name="UniPCTrailing"),
    Sampler("UniPC AYS", "UniPCMultistepScheduler", app_name="UniPCAYS", schedule="ays"),
    Sampler("LCM", "LCMScheduler", app_name="LCM", schedule="lcm"),
    Sampler("TCD", "TCDScheduler", app_name="TCD", schedule="tcd"),
    Sampler("TCD Trailing", "TCDScheduler", app_name="TCDTrailing", schedule="tcd_trailing"),
)
_BY_KEY = {key.casefold(): s for s in SAMPLERS for key in (s.name, *s.aliases, s.app_name) if key}


def sampler_names() -> list[str]:
    return [s.name for s in SAMPLERS]


def find_sampler(name: str) -> Sampler:
    """The sampler for ``name`` (case-insensitive; "" gives the default), or InvalidRequest."""
    key = (name or DEFAULT_SAMPLER).strip().casefold()
    if key not in _BY_KEY:
        raise InvalidRequest(f"unknown sampler {quote(name)}; valid samplers are: {', '.join(sampler_names())}")
    return _BY_KEY[key]


def app_sampler(value: int) -> Sampler | None:
    """The sampler of the app's ``SamplerType`` value, or None for a value this server does not know."""
    if not 0 <= value < len(APP_SAMPLERS):
        return None
    return _BY_KEY[APP_SAMPLERS[value].casefold()]


# -- schedules ---------------------------------------------------------------------------------

# NVIDIA's 10-step AYS timesteps per family (diffusers' AysSchedules); SD 2.x uses SD 1.5's, as the app does.
_AYS_TABLE = {"sd1": "StableDiffusionTimesteps", "sd2": "StableDiffusionTimesteps",
              "sdxl": "StableDiffusionXLTimesteps"}


def _sigmas(alphas_cumprod: Any) -> "np.ndarray":
    """Sigma of every training timestep from the cumulative alphas (a torch tensor), in float64."""
    import numpy as np

    alphas = alphas_cumprod.numpy().astype(np.float64)
    return np.sqrt((1 - alphas) / alphas)


def _train_sigmas(scheduler_config: dict) -> "np.ndarray":
    """Sigma of every training timestep, from the model's own betas (via diffusers' scheduler maths)."""
    from diffusers import DDPMScheduler

    return _sigmas(DDPMScheduler.from_config(dict(scheduler_config)).alphas_cumprod)


def ays_timesteps(family: str, steps: int, scheduler_config: dict) -> list[int]:
    """AYS timesteps for ``steps`` steps: the 10-step table as is, other counts interpolated log-linearly in sigma
    (NVIDIA's recipe, as the app does it), each sigma mapped back to the nearest training timestep."""
    import numpy as np
    from diffusers.schedulers import AysSchedules

    table = AysSchedules[_AYS_TABLE.get(family, "StableDiffusionTimesteps")]
    if steps == len(table):
        return list(table)
    sigmas = _train_sigmas(scheduler_config)
    log_sigmas = np.log(sigmas[np.asarray(table[::-1])])  # ascending
    wanted = np.interp(np.linspace(0, 1, steps), np.linspace(0, 1, len(table)), log_sigmas)
    # sigma -> timestep by interpolating log sigma over the training table, as k-diffusion and the app do
    timesteps = np.interp(wanted, np.log(sigmas), np.arange(len(sigmas)))
    return [int(t) for t in np.floor(timesteps[::-1] + 0.5)]


def _substep_timesteps(steps: int) -> list[int] | None:
    return [999 - 100 * i for i in range(steps)] if steps <= MAX_SUBSTEP_STEPS else None


def _tcd_timesteps(steps: int) -> list[int]:
    """The app builds TCD's schedule for steps + 1 linspace points and runs the first ``steps``."""
    return [int(round((steps - i) / steps * (TRAIN_TIMESTEPS - 1))) for i in range(steps)]


def _tcd_trailing_timesteps(steps: int) -> list[int]:
    return [int(round((steps + 1 - i) / (steps + 1) * TRAIN_TIMESTEPS - 1)) for i in range(steps)]


def _lcm_timesteps(steps: int) -> list[int]:
    """The app's LCM schedule: evenly spaced from 999 down to 20 (4 steps: 999, 754, 510, 265)."""
    return [min(int(round(979 * (steps - j) / steps)) + 20, TRAIN_TIMESTEPS - 1) for j in range(steps)]


_SCHEDULES: dict[str, Callable[[int], list[int] | None]] = {
    "substep": _substep_timesteps, "tcd": _tcd_timesteps, "tcd_trailing": _tcd_trailing_timesteps,
    "lcm": _lcm_timesteps,
}


def sampler_timesteps(sampler: Sampler, steps: int, family: str, scheduler_config: dict) -> list[int] | None:
    """The timesteps ``sampler`` visits in ``steps`` steps, or None for the scheduler's own spacing."""
    if sampler.schedule == "ays":
        return ays_timesteps(family, steps, scheduler_config)
    if sampler.schedule:
        return _SCHEDULES[sampler.schedule](steps)
    return None


class _TimestepsArgument:
    """``set_timesteps(timesteps=[...])`` for schedulers that lack it (UniPC, Euler ancestral): their sigmas are
    interpolated from the training sigmas at the given timesteps, as their own spacing branches do."""

    def set_timesteps(self, num_inference_steps: int | None = None, device: Any = None,
                      timesteps: list[int] | None = None, **kwargs: Any) -> None:
        import numpy as np
        import torch

        if timesteps is None:
            super().set_timesteps(num_inference_steps, device=device, **kwargs)  # type: ignore[misc]
            return
        super().set_timesteps(len(timesteps), device=device, **kwargs)  # type: ignore[misc]
        chosen = np.asarray(timesteps, dtype=np.float64)
        train_sigmas = _sigmas(self.alphas_cumprod)  # type: ignore[attr-defined]
        sigmas = np.append(np.interp(chosen, np.arange(len(train_sigmas)), train_sigmas), 0.0)
        self.sigmas = torch.from_numpy(sigmas.astype(np.float32))
        self.timesteps = torch.from_numpy(chosen).to(device=device, dtype=self.timesteps.dtype)  # type: ignore
        self.num_inference_steps = len(timesteps)


@lru_cache(maxsize=None)
def scheduler_class(name: str, custom_timesteps: bool = False) -> type:
    """The diffusers scheduler class ``name``; with ``custom_timesteps``, given a ``timesteps`` argument where it
    has none."""
    import diffusers

    cls = getattr(diffusers, name)
    if not custom_timesteps or "timesteps" in inspect.signature(cls.set_timesteps).parameters:
        return cls
    return type(f"{name}WithTimesteps", (_TimestepsArgument, cls), {})


def make_scheduler(sampler: Sampler, model_scheduler_config: dict) -> Any:
    """A fresh scheduler (schedulers keep per-run state) built from the model's config."""
    cls = scheduler_class(sampler.scheduler, bool(sampler.schedule))
    # Model configs carry keys for their own scheduler class; from_config ignores the others.
    return cls.from_config(dict(model_scheduler_config), **sampler.config)


def set_schedule(scheduler: Any, sampler: Sampler, steps: int, family: str, device: Any) -> None:
    """``scheduler.set_timesteps`` for ``steps`` steps with ``sampler``'s schedule."""
    timesteps = sampler_timesteps(sampler, steps, family, dict(scheduler.config))
    if timesteps is None:
        scheduler.set_timesteps(steps, device=device)
        return
    # LCM and TCD warn (once per request) that these timesteps are not on their distillation schedule: they are
    # the app's schedule on purpose.
    logging.getLogger(type(scheduler).__module__).setLevel(logging.ERROR)
    scheduler.set_timesteps(device=device, timesteps=timesteps)


def step_accepts_generator(scheduler: Any) -> bool:
    """Ancestral and SDE schedulers draw noise inside ``step``; seeding it keeps runs reproducible."""
    return "generator" in inspect.signature(scheduler.step).parameters
