"""The hot components as named-input callables, so the loop never knows who runs them.

The denoising loop calls the denoiser (SD's ``unet(sample=..., timestep=..., encoder_hidden_states=...)``,
FLUX's ``transformer(hidden_states=..., ...)``), ``vae_decoder(latent=...)`` and, for img2img and
inpainting, ``vae_encoder(image=...)``,
and gets a torch tensor back. Eager PyTorch modules
and compiled engines (``engines/runtime.py``) both fit this shape; each says which
backend it is and, when it is a fallback, why.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from dts_util.boundary import Shape


class Component(Protocol):
    backend: str  # "eager", "onnxruntime", "tensorrt", ...
    reason: str  # why this backend was chosen ("" when an engine matched)

    def __call__(self, **inputs: torch.Tensor) -> torch.Tensor: ...


class ComponentProvider(Protocol):
    """Hands the pipeline a runner for each component at each shape (per request, per pass)."""

    def denoiser(self, shape: Shape) -> Component: ...

    def vae_decoder(self, shape: Shape) -> Component: ...

    def vae_encoder(self, shape: Shape) -> Component: ...


class EagerUNet:
    """A diffusers UNet2DConditionModel behind the named-input interface."""

    backend = "eager"

    def __init__(self, module: Any, reason: str = "") -> None:
        self.module, self.reason = module, reason

    @torch.inference_mode()
    def __call__(self, *, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                 text_embeds: torch.Tensor | None = None, time_ids: torch.Tensor | None = None) -> torch.Tensor:
        added = {"text_embeds": text_embeds, "time_ids": time_ids} if text_embeds is not None else None
        return self.module(sample, timestep, encoder_hidden_states=encoder_hidden_states,
                           added_cond_kwargs=added, return_dict=False)[0]


class EagerVaeDecoder:
    """A diffusers AutoencoderKL's decoder behind the named-input interface."""

    backend = "eager"

    def __init__(self, module: Any, reason: str = "") -> None:
        self.module, self.reason = module, reason

    @torch.inference_mode()
    def __call__(self, *, latent: torch.Tensor) -> torch.Tensor:
        # The VAE may run at a higher precision than the UNet (force_upcast): latents follow it.
        return self.module.decode(latent.to(self.module.dtype), return_dict=False)[0]


class EagerVaeEncoder:
    """A diffusers AutoencoderKL's encoder behind the named-input interface: an image in [-1, 1] to the moments
    (mean and log-variance, stacked on the channel axis) of its latent distribution."""

    backend = "eager"

    def __init__(self, module: Any, reason: str = "") -> None:
        self.module, self.reason = module, reason

    @torch.inference_mode()
    def __call__(self, *, image: torch.Tensor) -> torch.Tensor:
        return self.module.encode(image.to(self.module.dtype), return_dict=False)[0].parameters


def describe_backend(component: Component) -> str:
    """"onnxruntime" or "eager (no engine for 640x512 b2)": how info and logs name a choice."""
    return f"{component.backend} ({component.reason})" if component.reason else component.backend
