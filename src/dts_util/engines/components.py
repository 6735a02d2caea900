"""One descriptor class per exportable component, as NVIDIA's diffusion demo has one per model part.

A descriptor says everything export, build, validation and selection need to know
about its component: input and output names, which axes are dynamic in an ONNX
file, the exact shapes of one engine, seeded sample inputs, the small wrapper
module that gives exporters plain tensors in and one tensor out, and which eager
weights an engine replaces. The names are the keyword names the pipeline calls
components with (``pipeline/components.py``). The next component (ControlNet, say)
is one more subclass.
"""

from __future__ import annotations

from typing import Any

import torch

from dts_util.boundary import TOKENS_PER_CHUNK, Shape
from dts_util.errors import InvalidRequest
from dts_util.models.loader import LoadedModel, ModelInfo


class ComponentDescriptor:
    """Describes one component of any supported model family (a family lists its own in ``components()``)."""

    name: str
    output_name: str
    weights: str  # the LoadedModel part an engine of this component makes unnecessary in memory
    # Runs once per guidance branch (CFG doubles its batch) on text conditioning of varying length.
    guided: bool = False
    # Runs at this batch whatever the request's batch size (None: at the request's batch size).
    fixed_batch: int | None = None
    # The TorchScript exporter cannot keep this component's axes symbolic (FLUX's RoPE reshapes bake their sizes
    # in): it is exported once per engine shape instead of once for all.
    static_export: bool = False

    def input_names(self, info: ModelInfo) -> list[str]:
        return list(self.input_shapes(info, self.representative_shape(info)))

    def output_names(self) -> list[str]:
        return [self.output_name]

    def dynamic_axes(self, info: ModelInfo) -> dict[str, dict[int, str]]:
        """Batch and spatial axes stay symbolic in an ONNX file; engines fix them per shape."""
        raise NotImplementedError

    def text_lengths(self, info: ModelInfo, prompt_chunks: tuple[int, ...]) -> list[int]:
        """The text conditioning lengths to build engines for: 77 per CLIP prompt chunk where the component reads
        text, else the one default length."""
        return [TOKENS_PER_CHUNK * n for n in prompt_chunks] if self.guided else [TOKENS_PER_CHUNK]

    def input_shapes(self, info: ModelInfo, shape: Shape) -> dict[str, tuple[int, ...]]:
        raise NotImplementedError

    def output_shape(self, info: ModelInfo, shape: Shape) -> tuple[int, ...]:
        raise NotImplementedError

    def free_dimensions(self, info: ModelInfo, shape: Shape) -> dict[str, int]:
        """Values of the symbolic axes for one engine (ONNX Runtime's free-dimension overrides)."""
        return {"batch": shape.batch, "height": shape.latent_height, "width": shape.latent_width}

    def build_precision(self, info: ModelInfo, precision: str) -> str:
        """The precision this component's engines are built at when ``precision`` is asked for."""
        return precision

    def export_module(self, model: LoadedModel) -> torch.nn.Module:
        """The component as a module taking this descriptor's named inputs and returning one tensor."""
        raise NotImplementedError

    def representative_shape(self, info: ModelInfo) -> Shape:
        """A small shape for export tracing and validation (dynamic axes make it general)."""
        side = max(8, min(info.native_size // info.vae_scale_factor, 64) // 2)
        return Shape(side, side, 1)

    def sample_inputs(self, info: ModelInfo, shape: Shape, seed: int = 0,
                      device: str = "cpu", dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """Seeded random inputs in realistic ranges (timesteps in [0, 1000), time_ids as sizes)."""
        generator = torch.Generator("cpu").manual_seed(seed)
        inputs = {}
        for name, dims in self.input_shapes(info, shape).items():
            if name == "timestep":
                value = torch.randint(0, 1000, dims, generator=generator).float()
            elif name == "time_ids":
                value = torch.tensor([[info.native_size] * 2 + [0, 0] + [info.native_size] * 2] * dims[0]).float()
            else:
                value = torch.randn(dims, generator=generator)
            inputs[name] = value.to(device, torch.float32 if name == "timestep" else dtype)
        return inputs


class UNetComponent(ComponentDescriptor):
    """The denoising UNet; SDXL's takes pooled text embeddings and size conditioning besides."""

    name, output_name, weights, guided = "unet", "noise_pred", "unet", True

    def dynamic_axes(self, info: ModelInfo) -> dict[str, dict[int, str]]:
        spatial = {0: "batch", 2: "height", 3: "width"}
        axes = {"sample": spatial, "timestep": {0: "batch"}, "encoder_hidden_states": {0: "batch", 1: "sequence"},
                "noise_pred": spatial}
        if _takes_size_conditioning(info):
            axes.update({"text_embeds": {0: "batch"}, "time_ids": {0: "batch"}})
        return axes

    def input_shapes(self, info: ModelInfo, shape: Shape) -> dict[str, tuple[int, ...]]:
        b, h, w = shape.batch, shape.latent_height, shape.latent_width
        # An inpainting UNet's sample is the latents, the mask and the masked image's latents, stacked.
        shapes = {"sample": (b, info.unet_in_channels, h, w), "timestep": (b,),
                  "encoder_hidden_states": (b, shape.text_length, int(info.unet_config["cross_attention_dim"]))}
        if _takes_size_conditioning(info):
            pooled = int(info.unet_config["projection_class_embeddings_input_dim"]) \
                - 6 * int(info.unet_config["addition_time_embed_dim"])
            shapes.update({"text_embeds": (b, pooled), "time_ids": (b, 6)})
        return shapes

    def output_shape(self, info: ModelInfo, shape: Shape) -> tuple[int, ...]:
        return (shape.batch, int(info.unet_config.get("out_channels", 4)), shape.latent_height, shape.latent_width)

    def free_dimensions(self, info: ModelInfo, shape: Shape) -> dict[str, int]:
        return {**super().free_dimensions(info, shape), "sequence": shape.text_length}

    def export_module(self, model: LoadedModel) -> torch.nn.Module:
        return _UNetForExport(model.denoiser(), _takes_size_conditioning(model.info)).eval()

    def representative_shape(self, info: ModelInfo) -> Shape:
        shape = super().representative_shape(info)
        return Shape(shape.latent_height, shape.latent_width, 2)  # a CFG pair


class _VaeComponent(ComponentDescriptor):
    """What the VAE's two halves share: their weights, and the precision they can run at."""

    weights = "vae"

    def build_precision(self, info: ModelInfo, precision: str) -> str:
        """fp32 instead of fp16 where the VAE's config asks for ``force_upcast`` (SDXL's VAE overflows in
        fp16 and decodes NaN, i.e. black images); bf16 keeps fp32's range and stays."""
        return "fp32" if precision == "fp16" and info.vae_config.get("force_upcast", True) else precision


class VaeDecoderComponent(_VaeComponent):
    """The VAE decoder: latents to an RGB image at ``vae_scale_factor`` times their size."""

    name, output_name = "vae_decoder", "image"

    def dynamic_axes(self, info: ModelInfo) -> dict[str, dict[int, str]]:
        return {"latent": {0: "batch", 2: "height", 3: "width"},
                "image": {0: "batch", 2: "image_height", 3: "image_width"}}

    def input_shapes(self, info: ModelInfo, shape: Shape) -> dict[str, tuple[int, ...]]:
        return {"latent": (shape.batch, info.vae_config.get("latent_channels", 4), shape.latent_height,
                           shape.latent_width)}

    def output_shape(self, info: ModelInfo, shape: Shape) -> tuple[int, ...]:
        scale = info.vae_scale_factor
        return (shape.batch, 3, shape.latent_height * scale, shape.latent_width * scale)

    def export_module(self, model: LoadedModel) -> torch.nn.Module:
        return _VaeDecoderForExport(model.vae()).eval()


class VaeEncoderComponent(_VaeComponent):
    """The VAE encoder of img2img and inpainting: an RGB image in [-1, 1] to the moments (mean and log-variance)
    of its latent distribution. Sampling from them stays in the pipeline, with the request's seeded
    generators, so an engine gives the same latents as eager PyTorch. It runs once per request, at batch 1."""

    name, output_name, fixed_batch = "vae_encoder", "moments", 1

    def dynamic_axes(self, info: ModelInfo) -> dict[str, dict[int, str]]:
        return {"image": {0: "batch", 2: "image_height", 3: "image_width"},
                "moments": {0: "batch", 2: "height", 3: "width"}}

    def input_shapes(self, info: ModelInfo, shape: Shape) -> dict[str, tuple[int, ...]]:
        scale = info.vae_scale_factor
        return {"image": (shape.batch, int(info.vae_config.get("in_channels", 3)), shape.latent_height * scale,
                          shape.latent_width * scale)}

    def output_shape(self, info: ModelInfo, shape: Shape) -> tuple[int, ...]:
        return (shape.batch, 2 * info.latent_channels, shape.latent_height, shape.latent_width)

    def free_dimensions(self, info: ModelInfo, shape: Shape) -> dict[str, int]:
        scale = info.vae_scale_factor
        return {**super().free_dimensions(info, shape), "image_height": shape.latent_height * scale,
                "image_width": shape.latent_width * scale}

    def export_module(self, model: LoadedModel) -> torch.nn.Module:
        return _VaeEncoderForExport(model.vae()).eval()


def _takes_size_conditioning(info: ModelInfo) -> bool:
    """SDXL's UNet: pooled text embeddings and size conditioning ("text_time") beside the hidden states."""
    return info.denoiser_config.get("addition_embed_type") == "text_time"


class _UNetForExport(torch.nn.Module):
    def __init__(self, unet: Any, sdxl: bool) -> None:
        super().__init__()
        self.unet, self.sdxl = unet, sdxl

    def forward(self, sample, timestep, encoder_hidden_states, text_embeds=None, time_ids=None):
        added = {"text_embeds": text_embeds, "time_ids": time_ids} if self.sdxl else None
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states,
                         added_cond_kwargs=added, return_dict=False)[0]


class _VaeDecoderForExport(torch.nn.Module):
    def __init__(self, vae: Any) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, latent):
        return self.vae.decode(latent, return_dict=False)[0]


class _VaeEncoderForExport(torch.nn.Module):
    def __init__(self, vae: Any) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, image):
        return self.vae.encode(image, return_dict=False)[0].parameters


UNET, VAE_DECODER, VAE_ENCODER = UNetComponent(), VaeDecoderComponent(), VaeEncoderComponent()
COMPONENTS: dict[str, ComponentDescriptor] = {component.name: component
                                              for component in (UNET, VAE_DECODER, VAE_ENCODER)}


def get_component(name: str, info: ModelInfo | None = None) -> ComponentDescriptor:
    """Component ``name`` of ``info``'s family (of Stable Diffusion's when no model is given)."""
    components = info.model_family.components() if info is not None else COMPONENTS
    if name not in components:
        raise InvalidRequest(f"unknown component {name!r}; choose from {', '.join(components)}")
    return components[name]
