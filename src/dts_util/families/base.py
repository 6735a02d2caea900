"""What a model family is to the rest of the server: one object that owns everything family-specific.

The loader asks a family whether it recognises a diffusers folder or a single file and how
its components load; the pipeline asks it for the pipeline class that encodes prompts, starts
and steps the sampler; the engine tools ask it for its component descriptors; the protocols ask
it for its label, defaults and the names the Draw Things app uses. Nothing outside a family's
module branches on its name. A new family is one module with one subclass, plus one row in
``families/__init__.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

from dts_util.pipeline.params import FamilyDefaults

if TYPE_CHECKING:
    from dts_util.engines.components import ComponentDescriptor
    from dts_util.models.loader import LoadedModel, ModelInfo, PromptEncoders
    from dts_util.pipeline.components import Component, ComponentProvider
    from dts_util.pipeline.samplers import Sampler


class ModelFamily:
    """One model family (SD 1.x/2.x, SDXL, FLUX.1, ...): subclass it in a module of its own."""

    name: str  # the key in FAMILIES and ``ModelInfo.family``
    denoiser: str  # the denoiser's component and weights name ("unet", "transformer")
    pipelines: frozenset[str] = frozenset()  # diffusers pipeline classes in model_index.json this family serves

    # -- recognising and inspecting files ----------------------------------------------------------

    def recognizes(self, index: Mapping[str, Any]) -> bool:
        """Whether a diffusers folder with this ``model_index.json`` is one of this family's."""
        return index.get("_class_name", "") in self.pipelines

    def recognizes_file(self, keys: Mapping[str, tuple[int, ...]]) -> bool:
        """Whether a single file with these tensor names and shapes is one of this family's."""
        return False

    def inspect_folder(self, name: str, path: Path, index: Mapping[str, Any]) -> "ModelInfo":
        raise NotImplementedError

    def inspect_file(self, name: str, path: Path, config_cache: Path) -> "ModelInfo":
        raise NotImplementedError

    # -- what clients see ---------------------------------------------------------------------------

    def label(self, info: "ModelInfo") -> str:
        """The family as Echo lists it ("sd1", "sdxl", "flux1", ...)."""
        return self.name

    def app_spec(self, info: "ModelInfo") -> dict[str, Any]:
        """The Draw Things app's model specification fields for this model (``version`` at least)."""
        raise NotImplementedError

    def native_size(self, info: "ModelInfo") -> int:
        raise NotImplementedError

    def inpainting(self, info: "ModelInfo") -> bool:
        """A dedicated inpainting model (conditioned on the mask and the masked image)."""
        return False

    def defaults(self, info: "ModelInfo") -> FamilyDefaults:
        raise NotImplementedError

    def check_sampler(self, info: "ModelInfo", sampler: "Sampler") -> "Sampler":
        """The sampler this family runs for ``sampler``, or FeatureUnavailable naming the ones it supports."""
        return sampler

    # -- loading -------------------------------------------------------------------------------------

    def auto_dtype(self, info: "ModelInfo", device: str) -> Any:
        """The weights' dtype for ``--dtype auto``: fp16 on CUDA, fp32 on the CPU."""
        import torch

        return torch.float16 if device.startswith("cuda") else torch.float32

    def load_denoiser(self, model: "LoadedModel") -> Any:
        raise NotImplementedError

    def load_vae(self, model: "LoadedModel") -> Any:
        raise NotImplementedError

    def load_prompt_encoders(self, model: "LoadedModel") -> "PromptEncoders":
        raise NotImplementedError

    def eager_denoiser(self, module: Any, reason: str = "") -> "Component":
        """The eager denoiser module behind the pipeline's named-input interface."""
        raise NotImplementedError

    # -- generation, engines, LoRA -------------------------------------------------------------------

    def pipeline(self, model: "LoadedModel", components: "ComponentProvider", should_stop: Callable[[], bool],
                 on_preview: Callable[[int, Any], None] | None) -> Callable:
        raise NotImplementedError

    def components(self) -> Mapping[str, "ComponentDescriptor"]:
        """Every exportable component by name, the denoiser first."""
        raise NotImplementedError

    def lora_format(self, info: "ModelInfo") -> "LoraFormat":
        raise NotImplementedError

    # Linear latent -> RGB factors (channels x 3) and bias for cheap PNG previews; None: no preview.
    latent_rgb: tuple[tuple[tuple[float, float, float], ...], tuple[float, float, float]] | None = None


class FlowMatchingFamily(ModelFamily):
    """What the flow-matching transformer families (FLUX.1, Z-Image, FLUX.2 [klein]) share as families."""

    display_name: str  # the family in messages ("FLUX", "Z-Image", ...)

    def check_sampler(self, info: "ModelInfo", sampler: "Sampler") -> "Sampler":
        from dts_util.pipeline.flow import flow_sampler

        return flow_sampler(info.name, self.display_name, sampler)

    def auto_dtype(self, info: "ModelInfo", device: str) -> Any:
        """bf16 on CUDA (these transformers overflow fp16); on the CPU the weights' own width, fp8 read as bf16:
        a multi-billion-parameter transformer in fp32 needs four bytes a parameter."""
        import torch

        if device.startswith("cuda") or info.stored_dtype in ("bf16", "fp16", "fp8"):
            return torch.bfloat16
        return torch.float32


@dataclass(frozen=True)
class LoraFormat:
    """How diffusers loads this family's LoRA files: the loader mixin (it reads kohya, A1111 and diffusers
    key layouts), its method for the denoiser, and the text encoder prefixes a LoRA may carry."""

    loader: str  # a diffusers.loaders class name
    denoiser_method: str  # "load_lora_into_unet", "load_lora_into_transformer"
    text_encoder_prefixes: tuple[str, ...]
