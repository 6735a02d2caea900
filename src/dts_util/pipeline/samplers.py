"""Sampler names -> diffusers schedulers.

Clients send A1111 names ("Euler a", "DPM++ 2M Karras") or Draw Things names
("Euler A", "UniPC Trailing"); both map, case-insensitively, onto a diffusers
scheduler class plus config overrides, created with ``from_config`` from the
model's own scheduler config so betas and offsets stay the model's.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

from dts_util.client_text import quote
from dts_util.errors import InvalidRequest

DEFAULT_SAMPLER = "DPM++ 2M Karras"


@dataclass(frozen=True)
class Sampler:
    """One sampler: its display name, accepted aliases and the scheduler it builds."""

    name: str
    scheduler: str
    config: dict[str, Any] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()


KARRAS = {"use_karras_sigmas": True}
TRAILING = {"timestep_spacing": "trailing"}
SAMPLERS: tuple[Sampler, ...] = (
    Sampler("DPM++ 2M Karras", "DPMSolverMultistepScheduler", KARRAS),
    Sampler("DPM++ 2M", "DPMSolverMultistepScheduler"),
    Sampler("DPM++ 2M Trailing", "DPMSolverMultistepScheduler", TRAILING),
    Sampler("DPM++ 2M SDE Karras", "DPMSolverMultistepScheduler",
            {"algorithm_type": "sde-dpmsolver++", **KARRAS}, aliases=("DPM++ SDE Karras",)),
    Sampler("DPM++ 2M SDE", "DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"},
            aliases=("DPM++ SDE",)),
    Sampler("DPM++ SDE Trailing", "DPMSolverMultistepScheduler",
            {"algorithm_type": "sde-dpmsolver++", **TRAILING}),
    Sampler("Euler a", "EulerAncestralDiscreteScheduler", aliases=("Euler Ancestral",)),
    Sampler("Euler A Trailing", "EulerAncestralDiscreteScheduler", TRAILING),
    Sampler("Euler", "EulerDiscreteScheduler"),
    Sampler("Euler Karras", "EulerDiscreteScheduler", KARRAS),
    Sampler("Heun", "HeunDiscreteScheduler"),
    Sampler("DPM2", "KDPM2DiscreteScheduler"),
    Sampler("DPM2 a", "KDPM2AncestralDiscreteScheduler"),
    Sampler("DDIM", "DDIMScheduler"),
    Sampler("DDIM Trailing", "DDIMScheduler", TRAILING),
    Sampler("PLMS", "PNDMScheduler", {"skip_prk_steps": True}, aliases=("PNDM",)),
    Sampler("DDPM", "DDPMScheduler"),
    Sampler("UniPC", "UniPCMultistepScheduler"),
    Sampler("UniPC Trailing", "UniPCMultistepScheduler", TRAILING),
    Sampler("LCM", "LCMScheduler"),
    Sampler("TCD", "TCDScheduler"),
)
_BY_KEY = {key.casefold(): s for s in SAMPLERS for key in (s.name, *s.aliases)}


def sampler_names() -> list[str]:
    return [s.name for s in SAMPLERS]


def find_sampler(name: str) -> Sampler:
    """The sampler for ``name`` (case-insensitive; "" gives the default), or InvalidRequest."""
    key = (name or DEFAULT_SAMPLER).strip().casefold()
    if key not in _BY_KEY:
        raise InvalidRequest(f"unknown sampler {quote(name)}; valid samplers are: {', '.join(sampler_names())}")
    return _BY_KEY[key]


def make_scheduler(sampler: Sampler, model_scheduler_config: dict) -> Any:
    """A fresh scheduler (schedulers keep per-run state) built from the model's config."""
    import diffusers

    cls = getattr(diffusers, sampler.scheduler)
    # Model configs carry keys for their own scheduler class; from_config ignores the others.
    return cls.from_config(dict(model_scheduler_config), **sampler.config)


def step_accepts_generator(scheduler: Any) -> bool:
    """Ancestral and SDE schedulers draw noise inside ``step``; seeding it keeps runs reproducible."""
    return "generator" in inspect.signature(scheduler.step).parameters
