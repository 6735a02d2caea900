"""FLUX.2 [klein] 4B and 9B: a flow-matching MMDiT over FLUX.2's 32-channel VAE, prompted by Qwen3.

What makes klein differ, all of it here (diffusers' ``Flux2KleinPipeline`` defines it):

- **Variants.** 4B (5 double + 20 single blocks, 3072 wide, Qwen3-4B) and 9B (8 + 24 blocks, 4096 wide,
  Qwen3-8B) are told apart by the transformer's depth; the app knows them as ``flux2_4b`` and ``flux2_9b``.
  The step-distilled releases (4 steps, no CFG) and the base ones (CFG) share configs: ``model_index.json``'s
  ``is_distilled`` says which.
- **Files.** A diffusers folder, or ComfyUI's split files: the transformer in Black Forest Labs' layout
  (``flux-2-klein-4b.safetensors``, renamed by diffusers' own converter), ``qwen_3_4b.safetensors`` (or
  ``qwen_3_8b``) and ``flux2-vae.safetensors`` in its original layout, with the Qwen tokenizer folder beside them;
  a single file is taken as distilled unless ``<file>.dts.json`` says ``{"variant": "base"}``.
- **Latents.** The sampler denoises 2x2 patches of the VAE's latents (128 channels at 1/16 of the image),
  normalised by the VAE's batch-norm statistics; ``decode`` undoes both before the VAE decoder.
- **Prompts.** The prompt goes through the tokenizer's chat template (thinking off), and Qwen3's hidden
  states of layers 9, 18 and 27, concatenated per token, over all 512 padded tokens.
- **An input image is a reference**, not a starting point: diffusers' klein encodes it (the latents' mean,
  patched and normalised) and appends its tokens, at time coordinate 10, to the ones being denoised; the image
  is edited as the prompt says (``denoising_strength`` does not apply). With a mask it is inpainting, as
  ``Flux2KleinInpaintPipeline`` does it: the image is both the start (noised to ``denoising_strength``, 0.8 by
  default) and the reference, and outside the mask (bilinear at the patch grid) its latents are put back
  after every step.
- **Guidance.** The request's cfg_scale is classifier-free guidance (base models; s <= 1 turns it off);
  distilled models run without it, as diffusers does.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

import torch

from dts_util.boundary import Shape
from dts_util.client_text import quote
from dts_util.engines.components import VAE_DECODER, VAE_ENCODER, ComponentDescriptor
from dts_util.errors import ModelLoadError
from dts_util.families.base import FamilyDefaults, FlowMatchingFamily, LoraFormat
from dts_util.families.single_files import (Companions, count_indices, folder_dtype, load_into_meta_module,
                                            read_sidecar, read_tensors, safetensors_dtype, shapes_of, strip_prefix)
from dts_util.families.zimage import encode_chat_prompt
from dts_util.pipeline.flow import DEFAULT_SAMPLER, FlowMatchingPipeline
from dts_util.pipeline.generation import EncodedImage, PromptEmbeddings, StartState, mask_to_tensor
from dts_util.pipeline.params import ResolvedRequest

if TYPE_CHECKING:
    from dts_util.models.loader import LoadedModel, ModelInfo, PromptEncoders
    from dts_util.pipeline.components import Component, ComponentProvider

PIPELINES = frozenset({"Flux2KleinPipeline", "Flux2KleinInpaintPipeline"})
FOLDER_PARTS = ("transformer", "vae", "scheduler", "text_encoder", "tokenizer")
MAX_SEQUENCE_LENGTH = 512
TEXT_LAYERS = (9, 18, 27)  # diffusers' text_encoder_out_layers
DEFAULT_SIZE = 1024
DISTILLED_STEPS, BASE_STEPS, BASE_CFG = 4, 50, 4.0  # diffusers' klein defaults and model cards
INPAINT_STRENGTH = 0.8  # diffusers' Flux2KleinInpaintPipeline default
REFERENCE_TIME = 10  # the time coordinate of the first reference image's tokens
NINE_B_DEPTH = 8  # double blocks: 9B has 8, 4B has 5


class Flux2KleinFamily(FlowMatchingFamily):
    """FLUX.2 [klein] 4B and 9B, distilled and base (``Flux2KleinPipeline`` folders)."""

    name, denoiser, pipelines = "flux2_klein", "transformer", PIPELINES
    display_name = "FLUX.2 [klein]"

    def inspect_folder(self, name: str, path: Path, index: Mapping[str, Any]) -> "ModelInfo":
        from dts_util.models.loader import ModelInfo
        from dts_util.models.store import read_json_file

        for part in FOLDER_PARTS:
            if not (path / part).is_dir():
                raise ModelLoadError(f"FLUX.2 [klein] model {quote(name)} has no {part}/ folder; a diffusers klein "
                                     f"folder holds {', '.join(FOLDER_PARTS)}")
        return ModelInfo(
            name=name, path=path, family=self.name,
            denoiser_config=read_json_file(path / "transformer" / "config.json", f"{name}/transformer/config.json"),
            vae_config=read_json_file(path / "vae" / "config.json", f"{name}/vae/config.json"),
            scheduler_config=read_json_file(path / "scheduler" / "scheduler_config.json",
                                            f"{name}/scheduler/scheduler_config.json"),
            stored_dtype=folder_dtype(path / "transformer"),
            extras={"is_distilled": bool(index.get("is_distilled", False))})

    def recognizes_file(self, keys: Mapping[str, tuple[int, ...]]) -> bool:
        return _transformer_prefix(keys) is not None

    def inspect_file(self, name: str, path: Path, config_cache: Path) -> "ModelInfo":
        from dts_util.models.loader import ModelInfo
        from dts_util.models.store import read_json_file

        keys = shapes_of(path)
        files = COMPANIONS.find(name, path, keys)
        distilled = read_sidecar(name, path).get("variant") != "base"  # the released klein files are distilled
        folder = _config_folder(name, files, distilled, config_cache)
        return ModelInfo(
            name=name, path=path, family=self.name,
            denoiser_config=read_json_file(folder / "transformer" / "config.json", f"{name} (transformer config)"),
            vae_config=read_json_file(folder / "vae" / "config.json", f"{name} (vae config)"),
            scheduler_config=read_json_file(folder / "scheduler" / "scheduler_config.json", f"{name} (scheduler)"),
            config_dir=folder, prediction_source="FLUX.2 flow matching", files=files,
            stored_dtype=safetensors_dtype(path, _transformer_prefix(keys) or ""), extras={"is_distilled": distilled})

    def label(self, info: "ModelInfo") -> str:
        return app_version(info)

    def app_spec(self, info: "ModelInfo") -> dict[str, Any]:
        return {"version": app_version(info), "upcast_attention": False, "high_precision_autoencoder": True,
                "text_encoder": "qwen_3_8b" if app_version(info) == "flux2_9b" else "qwen_3_4b",
                "is_consistency_model": False}

    def native_size(self, info: "ModelInfo") -> int:
        return DEFAULT_SIZE

    def defaults(self, info: "ModelInfo") -> FamilyDefaults:
        distilled = is_distilled(info)
        return FamilyDefaults(DEFAULT_SIZE, DISTILLED_STEPS if distilled else BASE_STEPS,
                              1.0 if distilled else BASE_CFG, DEFAULT_SAMPLER, 2 * info.vae_scale_factor,
                              INPAINT_STRENGTH, flow_matching=True)

    def load_denoiser(self, model: "LoadedModel") -> Any:
        from diffusers import Flux2Transformer2DModel

        if model.info.single_file:
            return _load_transformer_file(model)
        return model.from_pretrained(Flux2Transformer2DModel, "transformer")

    def load_vae(self, model: "LoadedModel") -> Any:
        from diffusers import AutoencoderKLFlux2

        if model.info.single_file:
            return _load_vae_file(model)
        return model.from_pretrained(AutoencoderKLFlux2, "vae", model.vae_dtype)

    def load_prompt_encoders(self, model: "LoadedModel") -> "PromptEncoders":
        from transformers import Qwen3ForCausalLM

        from dts_util.families.zimage import load_qwen_encoders

        return load_qwen_encoders(model, Qwen3ForCausalLM)

    def eager_denoiser(self, module: Any, reason: str = "") -> "Component":
        return EagerFlux2Transformer(module, reason)

    def pipeline(self, model: "LoadedModel", components: "ComponentProvider", should_stop: Callable[[], bool],
                 on_preview: Callable[[int, Any], None] | None) -> Callable:
        return Flux2KleinPipeline(model, components, should_stop, on_preview)

    def components(self) -> Mapping[str, ComponentDescriptor]:
        return {c.name: c for c in (TRANSFORMER, VAE_DECODER, VAE_ENCODER)}

    def lora_format(self, info: "ModelInfo") -> LoraFormat:
        return LoraFormat("Flux2LoraLoaderMixin", "load_lora_into_transformer", ())


def is_distilled(info: "ModelInfo") -> bool:
    return bool(info.extras.get("is_distilled", False))


def app_version(info: "ModelInfo") -> str:
    """``flux2_9b`` for 9B's depth (8 double blocks), else ``flux2_4b``."""
    return "flux2_9b" if int(info.denoiser_config.get("num_layers", 5)) >= NINE_B_DEPTH else "flux2_4b"


# -- the pipeline ------------------------------------------------------------------------------------


class Flux2KleinPipeline(FlowMatchingPipeline):
    """diffusers' ``Flux2KleinPipeline`` semantics, on the loop every family shares."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # The sampler's latents are 2x2 patches of the VAE's, normalised by its batch norm instead of a scale.
        self.latent_channels, self.vae_scale = 4 * self.model.info.latent_channels, 2 * self.vae_scale
        self.scaling, self.shift = 1.0, 0.0
        self.reference: tuple[torch.Tensor, torch.Tensor] | None = None

    samples_masked_image = False  # the inpainting pipeline encodes the image once, by its mean

    def image_tokens(self, width: int, height: int) -> int:
        return (height // self.vae_scale) * (width // self.vae_scale)

    def mu(self, config: Mapping[str, Any], req: ResolvedRequest, width: int, height: int) -> float:
        return empirical_mu(self.image_tokens(width, height), req.steps)

    def encode_prompt(self, req: ResolvedRequest) -> PromptEmbeddings:
        encoders = self.model.prompt_encoders()
        texts = [req.negative_prompt, req.prompt] if req.use_cfg else [req.prompt]
        hidden, counts = [], {}
        for key, text in zip(["negative_prompt", "prompt"][-len(texts):], texts):
            with torch.inference_mode():
                states, counts[key] = encode_chat_prompt(encoders, text, self.device, enable_thinking=False,
                                                         layers=TEXT_LAYERS, keep_padding=True)
            hidden.append(states.to(self.dtype).repeat(req.batch_size, 1, 1))
        return PromptEmbeddings(torch.cat(hidden), token_counts=counts)

    def sample(self, req: ResolvedRequest, embeddings: PromptEmbeddings, seeds: list[int],
               generators: list[torch.Generator], width: int, height: int, strength: float, *,
               image: EncodedImage | None = None, **kwargs: Any) -> torch.Tensor:
        """An input image conditions every step as reference tokens; only inpainting also starts from it."""
        self.reference = self._reference_tokens(image) if image is not None else None
        if image is not None and image.mask is not None:
            return super().sample(req, embeddings, seeds, generators, width, height, strength, image=image, **kwargs)
        return super().sample(req, embeddings, seeds, generators, width, height, 1.0, **kwargs)

    def encode_image(self, init: Any, backends: dict[str, str]) -> EncodedImage:
        """The image's moments; the mask at the patch grid, bilinear over the binarised mask, as klein's inpainting
        pipeline blends with it."""
        encoded = super().encode_image(init, backends)
        if init.mask is not None:
            pixel_mask = mask_to_tensor(init.mask).to(self.device)
            size = (pixel_mask.shape[2] // self.vae_scale, pixel_mask.shape[3] // self.vae_scale)
            encoded.mask = torch.nn.functional.interpolate(pixel_mask, size=size, mode="bilinear").to(self.dtype)
        return encoded

    def image_latents(self, moments: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
        """The image's latents as klein starts inpainting from them: their mean, patched and normalised."""
        mean = moments[:, :self.model.info.latent_channels].to(self.dtype)
        return self._normalise(patchify(mean)).repeat(len(generators), 1, 1, 1)

    def denoiser_shape(self, req: ResolvedRequest, latents: torch.Tensor, embeddings: PromptEmbeddings) -> Shape:
        # In the VAE's latent pixels, as build-engines counts them; the batch stays B (CFG runs a second call).
        return Shape(2 * latents.shape[2], 2 * latents.shape[3], latents.shape[0], embeddings.hidden_states.shape[1])

    def step_inputs(self, req: ResolvedRequest, embeddings: PromptEmbeddings, start: StartState, width: int,
                    height: int) -> dict[str, Any]:
        batch, _, rows, columns = start.latents.shape
        hidden = embeddings.hidden_states
        branches = [hidden[-batch:]] + ([hidden[:batch]] if req.use_cfg else [])
        ids = position_ids(0, rows, columns).expand(batch, -1, -1).to(self.device)
        text_ids = text_position_ids(hidden.shape[1]).expand(batch, -1, -1).to(self.device)
        inputs = {"branches": branches, "img_ids": ids, "txt_ids": text_ids, "reference": None}
        if self.reference is not None:
            tokens, reference_ids = self.reference
            inputs["reference"] = tokens.expand(batch, -1, -1)
            inputs["img_ids"] = torch.cat([ids, reference_ids.expand(batch, -1, -1).to(self.device)], dim=1)
        return inputs

    def denoise(self, denoiser: Any, scheduler: Any, latents: torch.Tensor, t: torch.Tensor,
                inputs: dict[str, Any], req: ResolvedRequest) -> torch.Tensor:
        batch, channels, rows, columns = latents.shape
        tokens = latents.reshape(batch, channels, rows * columns).permute(0, 2, 1)
        if inputs["reference"] is not None:  # diffusers' klein runs reference images eagerly too
            tokens = torch.cat([tokens, inputs["reference"]], dim=1)
            denoiser = self.model.family.eager_denoiser(self.model.denoiser(), "reference image")
        timestep = (t.expand(batch) / 1000).to(latents.dtype)
        predictions = [denoiser(hidden_states=tokens.to(self.dtype), timestep=timestep, encoder_hidden_states=states,
                                img_ids=inputs["img_ids"], txt_ids=inputs["txt_ids"])[:, :rows * columns]
                       for states in inputs["branches"]]
        prediction = predictions[0]
        if req.use_cfg:
            prediction = predictions[1] + req.cfg_scale * (predictions[0] - predictions[1])
        return prediction.permute(0, 2, 1).reshape(batch, channels, rows, columns)

    def _reference_tokens(self, image: EncodedImage) -> tuple[torch.Tensor, torch.Tensor]:
        """The input image as klein's reference: its latents' mean, patched, normalised and flattened to tokens,
        with positions at time ``REFERENCE_TIME``."""
        patches = self.image_latents(image.moments, [None])
        _, channels, rows, columns = patches.shape
        tokens = patches.reshape(1, channels, rows * columns).permute(0, 2, 1)
        return tokens, position_ids(REFERENCE_TIME, rows, columns)

    def _statistics(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The VAE batch norm's mean and standard deviation (kept apart from the VAE, which an engine may replace)."""
        def read() -> tuple[torch.Tensor, torch.Tensor]:
            vae = self.model.vae()
            eps = float(self.model.info.vae_config.get("batch_norm_eps", 1e-4))
            mean = vae.bn.running_mean.detach().clone().float().view(1, -1, 1, 1)
            std = torch.sqrt(vae.bn.running_var.detach().clone().float().view(1, -1, 1, 1) + eps)
            return mean.to(self.device), std.to(self.device)

        return self.model._load("latent_statistics", read)

    def _normalise(self, patches: torch.Tensor) -> torch.Tensor:
        mean, std = self._statistics()
        return ((patches - mean.to(patches.dtype)) / std.to(patches.dtype))

    def decode(self, latents: torch.Tensor, backends: dict[str, str]) -> list:
        mean, std = self._statistics()
        return super().decode(unpatchify(latents * std.to(latents.dtype) + mean.to(latents.dtype)), backends)


def empirical_mu(tokens: int, steps: int) -> float:
    """diffusers' FLUX.2 ``compute_empirical_mu``: a shift fitted to the token count and the step count."""
    a1, b1, a2, b2 = 8.73809524e-05, 1.89833333, 0.00016927, 0.45666666
    if tokens > 4300:
        return float(a2 * tokens + b2)
    at_200, at_10 = a2 * tokens + b2, a1 * tokens + b1
    slope = (at_200 - at_10) / 190.0
    return float(slope * steps + (at_200 - 200.0 * slope))


def patchify(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, 4C, h/2, w/2): each 2x2 patch's values as channels, in diffusers' order."""
    b, c, h, w = latents.shape
    latents = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
    return latents.reshape(b, c * 4, h // 2, w // 2)


def unpatchify(latents: torch.Tensor) -> torch.Tensor:
    b, c, h, w = latents.shape
    latents = latents.reshape(b, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
    return latents.reshape(b, c // 4, h * 2, w * 2)


def position_ids(time: int, rows: int, columns: int) -> torch.Tensor:
    """(1, rows x columns, 4) positions (time, row, column, 0) for FLUX.2's 4-axis RoPE."""
    grid = torch.cartesian_prod(torch.tensor([time]), torch.arange(rows), torch.arange(columns), torch.arange(1))
    return grid.unsqueeze(0)


def text_position_ids(length: int) -> torch.Tensor:
    grid = torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(length))
    return grid.unsqueeze(0)


class EagerFlux2Transformer:
    """A diffusers Flux2Transformer2DModel behind the named-input interface engines share."""

    backend = "eager"

    def __init__(self, module: Any, reason: str = "") -> None:
        self.module, self.reason = module, reason

    @torch.inference_mode()
    def __call__(self, *, hidden_states: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                 img_ids: torch.Tensor, txt_ids: torch.Tensor) -> torch.Tensor:
        return self.module(hidden_states=hidden_states, timestep=timestep, guidance=None,
                           encoder_hidden_states=encoder_hidden_states, img_ids=img_ids, txt_ids=txt_ids,
                           return_dict=False)[0]


# -- the engine component ------------------------------------------------------------------------------


class Flux2TransformerComponent(ComponentDescriptor):
    """klein's transformer on text to image: latent tokens (B, h/2 x w/2, 128) and Qwen3's states to the velocity.
    With a reference image the token count grows with the image, and the transformer runs eagerly."""

    name, output_name, weights = "transformer", "velocity", "transformer"
    static_export = True  # the RoPE tables are built with Python ints, which tracing bakes in

    def build_precision(self, info: "ModelInfo", precision: str) -> str:
        return "bf16" if precision == "fp16" else precision

    def dynamic_axes(self, info: "ModelInfo") -> dict[str, dict[int, str]]:
        return {"hidden_states": {0: "batch", 1: "image_tokens"}, "timestep": {0: "batch"},
                "encoder_hidden_states": {0: "batch", 1: "text_tokens"}, "img_ids": {0: "batch", 1: "image_tokens"},
                "txt_ids": {0: "batch", 1: "text_tokens"}, "velocity": {0: "batch", 1: "image_tokens"}}

    def input_shapes(self, info: "ModelInfo", shape: Shape) -> dict[str, tuple[int, ...]]:
        config = info.denoiser_config
        b, tokens = shape.batch, (shape.latent_height // 2) * (shape.latent_width // 2)
        return {"hidden_states": (b, tokens, int(config["in_channels"])), "timestep": (b,),
                "encoder_hidden_states": (b, shape.text_length, int(config["joint_attention_dim"])),
                "img_ids": (b, tokens, 4), "txt_ids": (b, shape.text_length, 4)}

    def output_shape(self, info: "ModelInfo", shape: Shape) -> tuple[int, ...]:
        config = info.denoiser_config
        tokens = (shape.latent_height // 2) * (shape.latent_width // 2)
        return (shape.batch, tokens, int(config.get("out_channels") or config["in_channels"]))

    def free_dimensions(self, info: "ModelInfo", shape: Shape) -> dict[str, int]:
        return {"batch": shape.batch, "image_tokens": (shape.latent_height // 2) * (shape.latent_width // 2),
                "text_tokens": shape.text_length}

    def text_lengths(self, info: "ModelInfo", prompt_chunks: tuple[int, ...]) -> list[int]:
        return [MAX_SEQUENCE_LENGTH]

    def representative_shape(self, info: "ModelInfo") -> Shape:
        return Shape(16, 16, 1, MAX_SEQUENCE_LENGTH)

    def sample_inputs(self, info: "ModelInfo", shape: Shape, seed: int = 0, device: str = "cpu",
                      dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        generator = torch.Generator("cpu").manual_seed(seed)
        shapes = self.input_shapes(info, shape)
        rows, columns = shape.latent_height // 2, shape.latent_width // 2
        inputs = {"hidden_states": torch.randn(shapes["hidden_states"], generator=generator).to(device, dtype),
                  "timestep": torch.rand(shapes["timestep"], generator=generator).to(device, dtype),
                  "encoder_hidden_states": torch.randn(shapes["encoder_hidden_states"],
                                                       generator=generator).to(device, dtype),
                  # Positions as floats: engines take float inputs; the RoPE reads them as floats either way.
                  "img_ids": position_ids(0, rows, columns).expand(shape.batch, -1, -1).to(device, torch.float32),
                  "txt_ids": text_position_ids(shape.text_length).expand(shape.batch, -1, -1).to(device,
                                                                                               torch.float32)}
        return inputs

    def export_module(self, model: "LoadedModel") -> torch.nn.Module:
        return _TransformerForExport(model.denoiser()).eval()


class _TransformerForExport(torch.nn.Module):
    def __init__(self, transformer: Any) -> None:
        super().__init__()
        self.transformer = transformer

    def forward(self, hidden_states, timestep, encoder_hidden_states, img_ids, txt_ids):
        return self.transformer(hidden_states=hidden_states, timestep=timestep, guidance=None,
                                encoder_hidden_states=encoder_hidden_states, img_ids=img_ids, txt_ids=txt_ids,
                                return_dict=False)[0]


TRANSFORMER = Flux2TransformerComponent()


# -- ComfyUI's split files -------------------------------------------------------------------------------------

TRANSFORMER_PREFIXES = ("model.diffusion_model.", "")


def _transformer_prefix(keys: Mapping[str, Any]) -> str | None:
    """The prefix of a FLUX.2 transformer in Black Forest Labs' layout (shared modulations, no CLIP vector)."""
    for prefix in TRANSFORMER_PREFIXES:
        if f"{prefix}double_stream_modulation_img.lin.weight" in keys and f"{prefix}img_in.weight" in keys:
            return prefix
    return None


def _vae_kind(keys: Mapping[str, tuple[int, ...]], prefix: str = "") -> bool:
    """FLUX.2's VAE in its original layout: 32 latent channels and the latents' batch norm."""
    conv = keys.get(f"{prefix}decoder.conv_in.weight")
    return conv is not None and len(conv) == 4 and conv[1] == 32 and f"{prefix}bn.running_mean" in keys


def _companion_kind(keys: Mapping[str, tuple[int, ...]], prefix: str = "") -> str | None:
    from dts_util.families.zimage import qwen3_prefix

    if qwen3_prefix(strip_prefix(keys, prefix)) is not None:
        return "text_encoder"
    return "vae" if _vae_kind(keys, prefix) else None


COMPANIONS = Companions("FLUX.2 [klein]", {"text_encoder": "Qwen3 text encoder (qwen_3_4b.safetensors for 4B, "
                                                           "qwen_3_8b.safetensors for 9B)",
                                           "vae": "FLUX.2 VAE (flux2-vae.safetensors)"},
                        _companion_kind, {"text_encoder": ("qwen",), "vae": ("flux2", "ae", "vae")})


def transformer_config(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
    """Flux2Transformer2DModel's config from a BFL-layout transformer's shapes; the RoPE splits a head in four
    equal axes and its theta is 2000, as FLUX.2's."""
    inner, in_channels = shapes["img_in.weight"]
    head_dim = shapes["double_blocks.0.img_attn.norm.query_norm.scale"][0]
    return {"_class_name": "Flux2Transformer2DModel", "patch_size": 1, "in_channels": in_channels,
            "out_channels": shapes["final_layer.linear.weight"][0],
            "num_layers": count_indices(shapes, r"double_blocks\.(\d+)\."),
            "num_single_layers": count_indices(shapes, r"single_blocks\.(\d+)\."),
            "attention_head_dim": head_dim, "num_attention_heads": inner // head_dim,
            "joint_attention_dim": shapes["txt_in.weight"][1],
            "timestep_guidance_channels": shapes["time_in.in_layer.weight"][1],
            "mlp_ratio": shapes["double_blocks.0.img_mlp.0.weight"][0] / 2 / inner,
            "axes_dims_rope": [head_dim // 4] * 4, "rope_theta": 2000,
            "guidance_embeds": "guidance_in.in_layer.weight" in shapes}


def vae_config(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
    """AutoencoderKLFlux2's config from its original layout's shapes."""
    levels = count_indices(shapes, r"encoder\.down\.(\d+)\.")
    return {"_class_name": "AutoencoderKLFlux2", "in_channels": shapes["encoder.conv_in.weight"][1],
            "out_channels": shapes["decoder.conv_out.weight"][0],
            "latent_channels": shapes["decoder.conv_in.weight"][1],
            "block_out_channels": [shapes[f"encoder.down.{i}.block.0.conv1.weight"][0] for i in range(levels)],
            "down_block_types": ["DownEncoderBlock2D"] * levels, "up_block_types": ["UpDecoderBlock2D"] * levels,
            "layers_per_block": count_indices(shapes, r"encoder\.down\.0\.block\.(\d+)\."), "norm_num_groups": 32,
            "act_fn": "silu", "sample_size": 1024, "use_quant_conv": "encoder.quant_conv.weight" in shapes,
            "use_post_quant_conv": "decoder.post_quant_conv.weight" in shapes, "batch_norm_eps": 1e-4,
            "patch_size": [2, 2]}


SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0,
             "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256,
             "max_image_seq_len": 4096, "time_shift_type": "exponential"}


def _config_folder(name: str, files: Mapping[str, Path], distilled: bool, cache: Path) -> Path:
    from dts_util.families.zimage import find_qwen_tokenizer, qwen3_config, qwen3_prefix
    from dts_util.models.store import publish_folder

    transformer = shapes_of(files["transformer"])
    encoder = shapes_of(files["text_encoder"])
    configs = {"transformer": transformer_config(strip_prefix(transformer, _transformer_prefix(transformer) or "")),
               "vae": vae_config(shapes_of(files["vae"])),
               "text_encoder": qwen3_config(strip_prefix(encoder, qwen3_prefix(encoder) or ""), "Qwen3ForCausalLM"),
               "scheduler": SCHEDULER}
    tokenizer = find_qwen_tokenizer(name, files["transformer"])
    key = hashlib.sha256(json.dumps([configs, str(tokenizer), distilled], sort_keys=True).encode()).hexdigest()[:16]
    return publish_folder(cache / f"klein-{key}", lambda folder: _fill(folder, configs, tokenizer, distilled))


def _fill(folder: Path, configs: Mapping[str, dict], tokenizer: Path, distilled: bool) -> None:
    import shutil

    for part, config in configs.items():
        (folder / part).mkdir(parents=True)
        name = "scheduler_config.json" if part == "scheduler" else "config.json"
        (folder / part / name).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    shutil.copytree(tokenizer, folder / "tokenizer")
    index = {"_class_name": "Flux2KleinPipeline", "is_distilled": distilled,
             "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
             "text_encoder": ["transformers", "Qwen3ForCausalLM"], "tokenizer": ["transformers", "Qwen2Tokenizer"],
             "transformer": ["diffusers", "Flux2Transformer2DModel"], "vae": ["diffusers", "AutoencoderKLFlux2"]}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


def _load_transformer_file(model: "LoadedModel") -> Any:
    """A BFL-layout transformer, renamed by diffusers' own FLUX.2 converter, filled into a module built on meta."""
    from diffusers import Flux2Transformer2DModel
    from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers

    path = model.info.files["transformer"]
    state = read_tensors(model.name, path, _transformer_prefix(shapes_of(path)) or "", model.dtype)
    state = convert_flux2_transformer_checkpoint_to_diffusers(state)
    return load_into_meta_module(model, Flux2Transformer2DModel, model.info.denoiser_config, state, "transformer",
                                 "FLUX.2 [klein] transformer", path)


def _load_vae_file(model: "LoadedModel") -> Any:
    """FLUX.2's VAE in its original layout: the LDM names diffusers' converter reads (its quant convs sit under
    encoder./decoder.), plus the latents' batch norm."""
    from diffusers import AutoencoderKLFlux2
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    path = model.info.files["vae"]
    dtype = model.vae_dtype
    state = read_tensors(model.name, path, "", dtype)
    for source, target in (("encoder.quant_conv.", "quant_conv."), ("decoder.post_quant_conv.", "post_quant_conv.")):
        for key in [k for k in state if k.startswith(source)]:
            state[target + key[len(source):]] = state.pop(key)
    converted = convert_ldm_vae_checkpoint(state, model.info.vae_config)
    for key in ("bn.running_mean", "bn.running_var"):
        converted[key] = state[key].float()
    converted.setdefault("bn.num_batches_tracked", torch.tensor(0))
    return load_into_meta_module(model, AutoencoderKLFlux2, model.info.vae_config, converted, "vae",
                                 "FLUX.2 VAE", path, dtype=dtype)
