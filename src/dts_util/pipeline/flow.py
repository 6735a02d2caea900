"""What every flow-matching family shares (FLUX.1, FLUX.2 [klein], Z-Image): sigmas, shift, noising and samplers.

A flow-matching model predicts the velocity from noise to image; its scheduler walks sigmas from 1 towards 0,
shifted (by a fixed ``shift`` or by ``mu``, which grows with the image's token count). diffusers' flow pipelines
all set ``linspace(1, 1/steps)`` sigmas, start image to image at ``int(steps - steps x strength)``, noise by
linear interpolation and encode the one input image once for the whole batch; ``FlowMatchingPipeline`` does
the same, and each family's pipeline adds its prompt encoding and denoiser call.
"""

from __future__ import annotations

import inspect
from dataclasses import replace
from typing import Any, Mapping

import numpy as np
import torch

from dts_util.client_text import quote
from dts_util.errors import FeatureUnavailable
from dts_util.pipeline.generation import DenoisingPipeline
from dts_util.pipeline.params import ResolvedRequest
from dts_util.pipeline.samplers import Sampler

DEFAULT_SAMPLER = "Euler"
# Sampler -> its flow-matching counterpart in diffusers, keyed by the SD scheduler the name builds.
_FLOW_SIGMAS = {"use_flow_sigmas": True, "prediction_type": "flow_prediction"}
FLOW_COUNTERPARTS: Mapping[str, tuple[str, dict[str, Any]]] = {
    "EulerDiscreteScheduler": ("FlowMatchEulerDiscreteScheduler", {}),
    "DDIMScheduler": ("FlowMatchEulerDiscreteScheduler", {}),  # deterministic DDIM on a flow ODE is Euler
    "EulerAncestralDiscreteScheduler": ("FlowMatchEulerDiscreteScheduler", {"stochastic_sampling": True}),
    "DPMSolverMultistepScheduler": ("DPMSolverMultistepScheduler", _FLOW_SIGMAS),
    "UniPCMultistepScheduler": ("UniPCMultistepScheduler", _FLOW_SIGMAS),
    "HeunDiscreteScheduler": ("FlowMatchHeunDiscreteScheduler", {}),
    "LCMScheduler": ("FlowMatchLCMScheduler", {}),
}


def flow_sampler(model_name: str, family_label: str, sampler: Sampler) -> Sampler:
    """The flow-matching counterpart of ``sampler``, or FeatureUnavailable naming the samplers that have one."""
    counterpart = FLOW_COUNTERPARTS.get(sampler.scheduler)
    if counterpart is None or sampler.config.get("algorithm_type", "").startswith("sde"):
        from dts_util.pipeline.samplers import SAMPLERS

        names = [s.name for s in SAMPLERS if s.scheduler in FLOW_COUNTERPARTS
                 and not s.config.get("algorithm_type", "").startswith("sde")]
        raise FeatureUnavailable(f"sampler {quote(sampler.name)} has no flow-matching counterpart for "
                                 f"{family_label} model {quote(model_name)}; use one of: {', '.join(names)}")
    scheduler, config = counterpart
    # Karras sigmas, AYS and the app's fixed schedules are SD timestep schedules: a flow model samples its own
    # shifted sigmas.
    return replace(sampler, scheduler=scheduler, config=dict(config), schedule="")


class FlowMatchingPipeline(DenoisingPipeline):
    """diffusers' flow-matching pipelines' shared semantics; subclasses encode prompts and call the denoiser."""

    def image_tokens(self, width: int, height: int) -> int:
        """Tokens the transformer sees for an image of this size (2x2 latent patches)."""
        return (height // self.vae_scale // 2) * (width // self.vae_scale // 2)

    def mu(self, config: Mapping[str, Any], req: ResolvedRequest, width: int, height: int) -> float:
        """The resolution-dependent shift: diffusers' ``calculate_shift``, linear in the image's token count."""
        return image_shift(config, self.image_tokens(width, height))

    def make_scheduler(self, req: ResolvedRequest, width: int, height: int) -> Any:
        from dts_util.pipeline.samplers import scheduler_class

        config = dict(self.model.info.scheduler_config)
        overrides = dict(req.sampler.config)
        if req.shift:  # a fixed shift replaces the resolution-dependent one
            overrides.update(shift=req.shift, flow_shift=req.shift, use_dynamic_shifting=False)
        elif "use_flow_sigmas" in overrides:
            overrides["flow_shift"] = config.get("shift", 1.0)
        scheduler = scheduler_class(req.sampler.scheduler).from_config(config, **overrides)
        dynamic = bool(scheduler.config.get("use_dynamic_shifting", False))
        set_flow_timesteps(scheduler, req.steps, self.mu(config, req, width, height) if dynamic else None,
                           self.device)
        return scheduler

    def first_step(self, steps: int, strength: float) -> int:
        """diffusers' flow ``get_timesteps``: ``int(steps - steps x strength)``, at least one step left."""
        begin = int(max(steps - min(steps * strength, steps), 0))
        return min(begin, steps - 1)

    def image_latents(self, moments: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
        """One sample of the input image's latents, from the first image's generator, for the whole batch: diffusers'
        flow pipelines encode the one input image once."""
        return self._sample_latents(moments, generators[:1]).repeat(len(generators), 1, 1, 1)

    def noise_to(self, scheduler: Any, latents: torch.Tensor, noise: torch.Tensor,
                 timestep: torch.Tensor) -> torch.Tensor:
        """The flow-matching interpolation ``sigma x noise + (1 - sigma) x latents`` at ``timestep``'s sigma."""
        if hasattr(scheduler, "scale_noise"):
            return scheduler.scale_noise(latents, timestep, noise)
        index = int((scheduler.timesteps.to(timestep.device) - timestep.flatten()[0]).abs().argmin())
        sigma = scheduler.sigmas[index].to(latents.device, latents.dtype)
        return sigma * noise + (1.0 - sigma) * latents


def image_shift(config: Mapping[str, Any], tokens: int) -> float:
    """diffusers' ``calculate_shift``: ``mu`` grows linearly with the number of image tokens."""
    base_len, max_len = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    base_shift, max_shift = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
    slope = (max_shift - base_shift) / (max_len - base_len)
    return tokens * slope + (base_shift - slope * base_len)


def set_flow_timesteps(scheduler: Any, steps: int, mu: float | None, device: Any) -> None:
    """diffusers' flow ``retrieve_timesteps``: sigmas ``linspace(1, 1/steps)`` where the scheduler takes them,
    else (schedulers with flow sigmas of their own) the step count; ``mu`` where it shifts by resolution."""
    parameters = inspect.signature(scheduler.set_timesteps).parameters
    kwargs: dict[str, Any] = {}
    if "mu" in parameters and mu is not None:
        kwargs["mu"] = mu
    if "sigmas" in parameters and not scheduler.config.get("use_flow_sigmas", False):
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), device=device, **kwargs)
    else:
        scheduler.set_timesteps(steps, device=device, **kwargs)
