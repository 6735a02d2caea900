"""What each exportable component looks like from the outside.

One descriptor per component (UNet, VAE decoder): input/output names, which
axes are dynamic in the ONNX file, the exact shapes for one engine, seeded
sample inputs for export and validation, and the small wrapper module that gives
``torch.onnx.export`` plain tensors in and one tensor out. The names are the same
keyword names the pipeline calls components with (``pipeline/components.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from dts_util.models.loader import LoadedModel, ModelInfo
from dts_util.pipeline.components import Shape

COMPONENTS = ("unet", "vae_decoder")


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


@dataclass(frozen=True)
class ComponentSpec:
    """Describes one component of one model family for export, build and selection."""

    name: str

    def input_names(self, info: ModelInfo) -> list[str]:
        if self.name == "vae_decoder":
            return ["latent"]
        names = ["sample", "timestep", "encoder_hidden_states"]
        return names + (["text_embeds", "time_ids"] if info.family == "sdxl" else [])

    def output_names(self) -> list[str]:
        return ["image"] if self.name == "vae_decoder" else ["noise_pred"]

    def dynamic_axes(self, info: ModelInfo) -> dict[str, dict[int, str]]:
        """Batch and spatial axes stay symbolic in the ONNX file; engines fix them per shape."""
        spatial = {0: "batch", 2: "height", 3: "width"}
        if self.name == "vae_decoder":
            return {"latent": spatial, "image": {0: "batch", 2: "image_height", 3: "image_width"}}
        axes = {"sample": spatial, "timestep": {0: "batch"}, "encoder_hidden_states": {0: "batch", 1: "sequence"},
                "noise_pred": spatial}
        if info.family == "sdxl":
            axes.update({"text_embeds": {0: "batch"}, "time_ids": {0: "batch"}})
        return axes

    def input_shapes(self, info: ModelInfo, shape: Shape) -> dict[str, tuple[int, ...]]:
        b, h, w = shape.batch, shape.latent_height, shape.latent_width
        if self.name == "vae_decoder":
            return {"latent": (b, info.vae_config.get("latent_channels", 4), h, w)}
        shapes = {"sample": (b, info.latent_channels, h, w), "timestep": (b,),
                  "encoder_hidden_states": (b, shape.text_length, int(info.unet_config["cross_attention_dim"]))}
        if info.family == "sdxl":
            pooled = int(info.unet_config["projection_class_embeddings_input_dim"]) \
                - 6 * int(info.unet_config["addition_time_embed_dim"])
            shapes.update({"text_embeds": (b, pooled), "time_ids": (b, 6)})
        return shapes

    def output_shapes(self, info: ModelInfo, shape: Shape) -> dict[str, tuple[int, ...]]:
        b, h, w = shape.batch, shape.latent_height, shape.latent_width
        if self.name == "vae_decoder":
            scale = info.vae_scale_factor
            return {"image": (b, 3, h * scale, w * scale)}
        return {"noise_pred": (b, int(info.unet_config.get("out_channels", 4)), h, w)}

    def free_dimensions(self, shape: Shape) -> dict[str, int]:
        """Values of the symbolic axes for one engine (ONNX Runtime's free-dimension overrides)."""
        dims = {"batch": shape.batch, "height": shape.latent_height, "width": shape.latent_width}
        return dims if self.name == "vae_decoder" else {**dims, "sequence": shape.text_length}

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

    def export_module(self, model: LoadedModel) -> torch.nn.Module:
        if self.name == "vae_decoder":
            return _VaeDecoderForExport(model.vae()).eval()
        return _UNetForExport(model.unet(), model.info.family == "sdxl").eval()

    def representative_shape(self, info: ModelInfo) -> Shape:
        """A small shape for export tracing and validation (dynamic axes make it general)."""
        side = max(8, min(int(info.unet_config["sample_size"]), 64) // 2)
        return Shape(side, side, 2 if self.name == "unet" else 1)


def get_spec(component: str) -> ComponentSpec:
    if component not in COMPONENTS:
        from dts_util.errors import InvalidRequest

        raise InvalidRequest(f"unknown component {component!r}; choose from {', '.join(COMPONENTS)}")
    return ComponentSpec(component)
