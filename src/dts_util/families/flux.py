"""FLUX.1 [dev] and [schnell]: a flow-matching MMDiT over a 16-channel VAE, prompted by CLIP-L and T5-XXL.

What makes FLUX differ from SD, all of it here:

- **Files.** A diffusers folder (``FluxPipeline``), or the single files ComfyUI users keep: the
  transformer in Black Forest Labs' key layout (``flux1-dev.safetensors``, bf16 or fp8-e4m3fn),
  ``clip_l.safetensors``, ``t5xxl_fp16.safetensors`` / ``t5xxl_fp8_e4m3fn.safetensors`` and
  ``ae.safetensors``, found beside it (or named in a ``<file>.dts.json`` sidecar), or an all-in-one
  checkpoint holding all four. Configs are built from the tensors' shapes, never fetched.
- **Prompts.** CLIP's pooled output and T5's hidden states (512 tokens), read literally as
  diffusers' ``FluxPipeline`` reads them.
- **Latents** are 16 channels, shifted and scaled by the VAE's ``shift_factor``/``scaling_factor``,
  and packed into 2x2 patches (64 values per token) only for the transformer call, so the loop,
  masks, previews and the high-res fix see ordinary (B, 16, h, w) latents.
- **Guidance.** [dev] is guidance-distilled: the request's cfg_scale is its guidance embedding
  (3.5 when left at 0); true CFG with the negative prompt runs only when ``true_cfg_scale`` > 1.
- **Samplers.** Flow-matching Euler by default; names with a flow-matching counterpart in diffusers
  run as it (DPM++ 2M and UniPC with flow sigmas, Heun, LCM); the sigmas are diffusers'
  (``linspace(1, 1/steps)``, shifted by the resolution-dependent ``mu`` or a fixed shift).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

import torch

from dts_util.boundary import Shape
from dts_util.client_text import quote
from dts_util.engines.components import ComponentDescriptor, VAE_DECODER, VAE_ENCODER
from dts_util.errors import ModelLoadError
from dts_util.families.base import FamilyDefaults, FlowMatchingFamily, LoraFormat
from dts_util.families.single_files import (Companions, count_indices, flux_vae_kind, folder_dtype,
                                            materialize_buffers, read_tensors, safetensors_dtype, shapes_of,
                                            strip_prefix)
from dts_util.pipeline.flow import DEFAULT_SAMPLER, FlowMatchingPipeline
from dts_util.pipeline.generation import PromptEmbeddings, StartState
from dts_util.pipeline.params import ResolvedRequest

if TYPE_CHECKING:
    from dts_util.models.loader import LoadedModel, ModelInfo, PromptEncoders
    from dts_util.pipeline.components import Component, ComponentProvider

PIPELINES = frozenset({"FluxPipeline", "FluxImg2ImgPipeline", "FluxInpaintPipeline"})
FOLDER_PARTS = ("transformer", "vae", "scheduler", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")
MAX_SEQUENCE_LENGTH = 512  # T5 tokens, diffusers' default for FLUX.1
CLIP_LENGTH = 77
DISTILLED_GUIDANCE = 3.5  # diffusers' FluxPipeline default
DEFAULT_SAMPLE_SIZE = 128  # latent pixels per side: diffusers' FLUX default (1024 pixels with FLUX.1's 8x VAE)
DEV_STEPS, SCHNELL_STEPS = 28, 4
IMG2IMG_STRENGTH = 0.6  # diffusers' FluxImg2ImgPipeline and FluxInpaintPipeline default
# FLUX.1's VAE latent statistics (published with the model; they leave no trace in tensor shapes).
VAE_SCALING, VAE_SHIFT = 0.3611, 0.1159
BFL_PREFIXES = ("model.diffusion_model.", "")
# An all-in-one (ComfyUI) checkpoint's component prefixes.
ALL_IN_ONE = {"text_encoder": "text_encoders.clip_l.transformer.", "text_encoder_2": "text_encoders.t5xxl.transformer.",
              "vae": "first_stage_model."}
# Linear latent -> RGB factors of FLUX's 16 latent channels for cheap previews (the community's published fit, as
# ComfyUI uses it).
LATENT_RGB = (((-0.0346, 0.0244, 0.0681), (0.0034, 0.0210, 0.0687), (0.0275, -0.0668, -0.0433),
               (-0.0174, 0.0160, 0.0617), (0.0859, 0.0721, 0.0329), (0.0004, 0.0383, 0.0115),
               (0.0405, 0.0861, 0.0915), (-0.0236, -0.0185, -0.0259), (-0.0245, 0.0250, 0.1180),
               (0.1008, 0.0755, -0.0421), (-0.0515, 0.0201, 0.0011), (0.0428, -0.0012, -0.0036),
               (0.0817, 0.0765, 0.0749), (-0.1264, -0.0522, -0.1103), (-0.0280, -0.0881, -0.0499),
               (-0.1262, -0.0982, -0.0778)), (-0.0329, -0.0718, -0.0851))



class FluxFamily(FlowMatchingFamily):
    """FLUX.1 [dev] (guidance-distilled) and [schnell] (step-distilled), told apart by the guidance embedding."""

    name, denoiser, pipelines = "flux", "transformer", PIPELINES
    display_name = "FLUX"
    latent_rgb = LATENT_RGB

    # -- recognising and inspecting files ----------------------------------------------------------

    def recognizes(self, index: Mapping[str, Any]) -> bool:
        if index.get("_class_name", "") in self.pipelines:
            return True
        transformer = index.get("transformer")
        return isinstance(transformer, list) and transformer[-1:] == ["FluxTransformer2DModel"]

    def recognizes_file(self, keys: Mapping[str, tuple[int, ...]]) -> bool:
        return _bfl_prefix(keys) is not None

    def inspect_folder(self, name: str, path: Path, index: Mapping[str, Any]) -> "ModelInfo":
        from dts_util.models.loader import ModelInfo
        from dts_util.models.store import read_json_file

        for part in FOLDER_PARTS:
            if not (path / part).is_dir():
                raise ModelLoadError(f"FLUX model {quote(name)} has no {part}/ folder; a diffusers FLUX folder holds "
                                     f"{', '.join(FOLDER_PARTS)}")
        config = read_json_file(path / "transformer" / "config.json", f"{name}/transformer/config.json")
        return ModelInfo(
            name=name, path=path, family=self.name, denoiser_config=config,
            vae_config=read_json_file(path / "vae" / "config.json", f"{name}/vae/config.json"),
            scheduler_config=read_json_file(path / "scheduler" / "scheduler_config.json",
                                            f"{name}/scheduler/scheduler_config.json"),
            stored_dtype=folder_dtype(path / "transformer"),
        )

    def inspect_file(self, name: str, path: Path, config_cache: Path) -> "ModelInfo":
        from dts_util.models.checkpoint import cached_shapes
        from dts_util.models.loader import ModelInfo
        from dts_util.models.store import read_json_file

        keys = cached_shapes(path)
        files = COMPANIONS.find(name, path, keys)
        folder = _config_folder(name, files, config_cache)
        return ModelInfo(
            name=name, path=path, family=self.name,
            denoiser_config=read_json_file(folder / "transformer" / "config.json", f"{name} (transformer config)"),
            vae_config=read_json_file(folder / "vae" / "config.json", f"{name} (vae config)"),
            scheduler_config=read_json_file(folder / "scheduler" / "scheduler_config.json", f"{name} (scheduler)"),
            config_dir=folder, prediction_source="FLUX.1 flow matching", files=files,
            stored_dtype=safetensors_dtype(path, _bfl_prefix(keys) or ""),
        )

    # -- what clients see ---------------------------------------------------------------------------

    def label(self, info: "ModelInfo") -> str:
        return "flux1"

    def app_spec(self, info: "ModelInfo") -> dict[str, Any]:
        return {"version": "flux1", "upcast_attention": False, "high_precision_autoencoder": True,
                "clip_encoder": "clip_l", "text_encoder": "t5", "guidance_embed": _guidance_distilled(info),
                "is_consistency_model": False}

    def native_size(self, info: "ModelInfo") -> int:
        return DEFAULT_SAMPLE_SIZE * info.vae_scale_factor

    def size_multiple(self, info: "ModelInfo") -> int:
        """Latent pixels come in 2x2 patches: 16 pixels with FLUX.1's 8x VAE, as diffusers requires."""
        return 2 * info.vae_scale_factor

    def defaults(self, info: "ModelInfo") -> FamilyDefaults:
        distilled = _guidance_distilled(info)
        return FamilyDefaults(self.native_size(info), DEV_STEPS if distilled else SCHNELL_STEPS, DISTILLED_GUIDANCE,
                              DEFAULT_SAMPLER, self.size_multiple(info), IMG2IMG_STRENGTH, distilled_guidance=True,
                              flow_matching=True)

    # -- loading -------------------------------------------------------------------------------------

    def load_denoiser(self, model: "LoadedModel") -> Any:
        from diffusers import FluxTransformer2DModel

        if model.info.single_file:
            return _load_bfl_transformer(model)
        return model.from_pretrained(FluxTransformer2DModel, "transformer")

    def load_vae(self, model: "LoadedModel") -> Any:
        from diffusers import AutoencoderKL

        return model.from_pretrained(AutoencoderKL, "vae", model.vae_dtype, file=model.info.files.get("vae"))

    def load_prompt_encoders(self, model: "LoadedModel") -> "PromptEncoders":
        from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

        from dts_util.models.loader import PromptEncoders

        folder = model.info.config_dir or model.info.path
        tokenizers = [AutoTokenizer.from_pretrained(folder, subfolder=sub, local_files_only=True)
                      for sub in ("tokenizer", "tokenizer_2")]
        if not model.info.single_file:
            return PromptEncoders(tokenizers, [model.from_pretrained(CLIPTextModel, "text_encoder"),
                                               model.from_pretrained(T5EncoderModel, "text_encoder_2")])
        encoders = [_load_encoder(model, cls, part) for cls, part in
                    ((CLIPTextModel, "text_encoder"), (T5EncoderModel, "text_encoder_2"))]
        return PromptEncoders(tokenizers, encoders)

    def eager_denoiser(self, module: Any, reason: str = "") -> "Component":
        return EagerFluxTransformer(module, reason)

    # -- generation, engines, LoRA -------------------------------------------------------------------

    def pipeline(self, model: "LoadedModel", components: "ComponentProvider", should_stop: Callable[[], bool],
                 on_preview: Callable[[int, Any], None] | None) -> Callable:
        return FluxPipeline(model, components, should_stop, on_preview)

    def components(self) -> Mapping[str, ComponentDescriptor]:
        return {c.name: c for c in (TRANSFORMER, VAE_DECODER, VAE_ENCODER)}

    def lora_format(self, info: "ModelInfo") -> LoraFormat:
        # FluxLoraLoaderMixin reads diffusers, kohya (sd-scripts), XLabs and BFL control LoRA layouts.
        return LoraFormat("FluxLoraLoaderMixin", "load_lora_into_transformer", ("text_encoder",))


def _guidance_distilled(info: "ModelInfo") -> bool:
    """[dev]: the transformer embeds the guidance value ([schnell] has no guidance embedding)."""
    return bool(info.denoiser_config.get("guidance_embeds", False))


# -- the pipeline ------------------------------------------------------------------------------------


class FluxPipeline(FlowMatchingPipeline):
    """diffusers' ``FluxPipeline``, ``FluxImg2ImgPipeline`` and ``FluxInpaintPipeline`` semantics."""

    def encode_prompt(self, req: ResolvedRequest) -> PromptEmbeddings:
        """CLIP's pooled embedding and T5's hidden states of each prompt (negative first with true CFG)."""
        encoders = self.model.prompt_encoders()
        texts = [req.negative_prompt, req.prompt] if req.use_cfg else [req.prompt]
        hidden, pooled, counts = [], [], {}
        for key, text in zip(["negative_prompt", "prompt"][-len(texts):], texts):
            states, vector, tokens = self._encode_text(encoders, text)
            hidden.append(states.repeat(req.batch_size, 1, 1))
            pooled.append(vector.repeat(req.batch_size, 1))
            counts[key] = tokens
        not_read = max(0, counts["prompt"] - (MAX_SEQUENCE_LENGTH - 1))
        if not_read:
            counts["not_read"] = not_read  # past T5's 512 tokens, as diffusers truncates
        return PromptEmbeddings(torch.cat(hidden), torch.cat(pooled), counts, 1)

    @torch.inference_mode()
    def _encode_text(self, encoders: Any, text: str) -> tuple[torch.Tensor, torch.Tensor, int]:
        clip_tokenizer, t5_tokenizer = encoders.tokenizers
        clip, t5 = encoders.text_encoders
        clip_ids = clip_tokenizer(text, padding="max_length", max_length=CLIP_LENGTH, truncation=True,
                                  return_tensors="pt").input_ids
        pooled = clip(clip_ids.to(self.device), output_hidden_states=False).pooler_output
        t5_ids = t5_tokenizer(text, padding="max_length", max_length=MAX_SEQUENCE_LENGTH, truncation=True,
                              return_tensors="pt").input_ids
        states = t5(t5_ids.to(self.device), output_hidden_states=False)[0]
        tokens = len(t5_tokenizer(text, add_special_tokens=False, truncation=False).input_ids)
        return states.to(self.dtype), pooled.to(self.dtype), tokens

    def denoiser_shape(self, req: ResolvedRequest, latents: torch.Tensor, embeddings: PromptEmbeddings) -> Shape:
        # True CFG runs the negative branch as a call of its own, as diffusers does: the batch stays B.
        return Shape(latents.shape[2], latents.shape[3], latents.shape[0], embeddings.hidden_states.shape[1])

    def step_inputs(self, req: ResolvedRequest, embeddings: PromptEmbeddings, start: StartState, width: int,
                    height: int) -> dict[str, Any]:
        batch = start.latents.shape[0]
        hidden, pooled = embeddings.hidden_states, embeddings.text_embeds
        branches = [(hidden[-batch:], pooled[-batch:])]
        if req.use_cfg:
            branches.append((hidden[:batch], pooled[:batch]))
        shared: dict[str, torch.Tensor] = {
            "txt_ids": torch.zeros(hidden.shape[1], 3, device=self.device, dtype=self.dtype),
            "img_ids": image_ids(start.latents.shape[2] // 2, start.latents.shape[3] // 2, self.device, self.dtype),
        }
        if _guidance_distilled(self.model.info):
            shared["guidance"] = torch.full([1], req.cfg_scale, device=self.device,
                                            dtype=torch.float32).expand(batch)
        return {"shared": shared, "branches": branches}

    def denoise(self, denoiser: Any, scheduler: Any, latents: torch.Tensor, t: torch.Tensor,
                inputs: dict[str, Any], req: ResolvedRequest) -> torch.Tensor:
        batch, channels, height, width = latents.shape
        packed = pack_latents(latents)
        timestep = t.expand(batch).to(latents.dtype)
        predictions = [denoiser(hidden_states=packed, timestep=timestep / 1000, encoder_hidden_states=states,
                                pooled_projections=vector, **inputs["shared"])
                       for states, vector in inputs["branches"]]
        prediction = predictions[0]
        if req.use_cfg:  # true CFG: the negative branch's prediction, pushed away from
            prediction = predictions[1] + req.true_cfg_scale * (predictions[0] - predictions[1])
        return unpack_latents(prediction, height, width)


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h/2 x w/2, 4C): 2x2 patches as tokens, in diffusers' order."""
    b, c, h, w = latents.shape
    latents = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return latents.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of ``pack_latents`` for latents of ``height`` x ``width``."""
    b, _, packed = tokens.shape
    c = packed // 4
    latents = tokens.view(b, height // 2, width // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return latents.reshape(b, c, height, width)


def image_ids(rows: int, columns: int, device: Any, dtype: torch.dtype) -> torch.Tensor:
    """Each image token's (0, row, column) position for the transformer's 3-axis RoPE."""
    ids = torch.zeros(rows, columns, 3)
    ids[..., 1] = ids[..., 1] + torch.arange(rows)[:, None]
    ids[..., 2] = ids[..., 2] + torch.arange(columns)[None, :]
    return ids.reshape(rows * columns, 3).to(device=device, dtype=dtype)


class EagerFluxTransformer:
    """A diffusers FluxTransformer2DModel behind the named-input interface engines share."""

    backend = "eager"

    def __init__(self, module: Any, reason: str = "") -> None:
        self.module, self.reason = module, reason

    @torch.inference_mode()
    def __call__(self, *, hidden_states: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                 pooled_projections: torch.Tensor, txt_ids: torch.Tensor, img_ids: torch.Tensor,
                 guidance: torch.Tensor | None = None) -> torch.Tensor:
        return self.module(hidden_states=hidden_states, timestep=timestep, guidance=guidance,
                           pooled_projections=pooled_projections, encoder_hidden_states=encoder_hidden_states,
                           txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]


# -- the engine component ------------------------------------------------------------------------------


class FluxTransformerComponent(ComponentDescriptor):
    """The FLUX transformer: packed latents (B, tokens, 64) and T5/CLIP conditioning to the velocity."""

    name, output_name, weights = "transformer", "velocity", "transformer"
    static_export = True  # diffusers' apply_rotary_emb reshapes with Python ints, which tracing bakes in

    def _guidance(self, info: "ModelInfo") -> bool:
        return _guidance_distilled(info)

    def build_precision(self, info: "ModelInfo", precision: str) -> str:
        """bf16 where fp16 is asked for (TensorRT's and AOTInductor's CUDA default): FLUX's activations overflow
        fp16, and NVIDIA's diffusion demo builds its transformer in bf16 too."""
        return "bf16" if precision == "fp16" else precision

    def dynamic_axes(self, info: "ModelInfo") -> dict[str, dict[int, str]]:
        axes = {"hidden_states": {0: "batch", 1: "image_tokens"}, "timestep": {0: "batch"},
                "encoder_hidden_states": {0: "batch", 1: "text_tokens"}, "pooled_projections": {0: "batch"},
                "txt_ids": {0: "text_tokens"}, "img_ids": {0: "image_tokens"},
                "velocity": {0: "batch", 1: "image_tokens"}}
        if self._guidance(info):
            axes["guidance"] = {0: "batch"}
        return axes

    def input_shapes(self, info: "ModelInfo", shape: Shape) -> dict[str, tuple[int, ...]]:
        config = info.denoiser_config
        b, tokens = shape.batch, (shape.latent_height // 2) * (shape.latent_width // 2)
        shapes = {"hidden_states": (b, tokens, int(config["in_channels"])), "timestep": (b,),
                  "encoder_hidden_states": (b, shape.text_length, int(config["joint_attention_dim"])),
                  "pooled_projections": (b, int(config["pooled_projection_dim"])),
                  "txt_ids": (shape.text_length, 3), "img_ids": (tokens, 3)}
        if self._guidance(info):
            shapes["guidance"] = (b,)
        return shapes

    def output_shape(self, info: "ModelInfo", shape: Shape) -> tuple[int, ...]:
        config = info.denoiser_config
        tokens = (shape.latent_height // 2) * (shape.latent_width // 2)
        return (shape.batch, tokens, int(config.get("out_channels") or config["in_channels"]))

    def free_dimensions(self, info: "ModelInfo", shape: Shape) -> dict[str, int]:
        return {"batch": shape.batch, "image_tokens": (shape.latent_height // 2) * (shape.latent_width // 2),
                "text_tokens": shape.text_length}

    def text_lengths(self, info: "ModelInfo", prompt_chunks: tuple[int, ...]) -> list[int]:
        return [MAX_SEQUENCE_LENGTH]  # T5 is always padded to 512 tokens

    def representative_shape(self, info: "ModelInfo") -> Shape:
        return Shape(16, 16, 1, MAX_SEQUENCE_LENGTH)

    def sample_inputs(self, info: "ModelInfo", shape: Shape, seed: int = 0, device: str = "cpu",
                      dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        generator = torch.Generator("cpu").manual_seed(seed)
        inputs = {}
        for name, dims in self.input_shapes(info, shape).items():
            if name == "timestep":
                value = torch.rand(dims, generator=generator)  # sigma in [0, 1)
            elif name == "guidance":
                value = torch.full(dims, DISTILLED_GUIDANCE)
            elif name == "img_ids":
                value = image_ids(shape.latent_height // 2, shape.latent_width // 2, "cpu", torch.float32)
            elif name == "txt_ids":
                value = torch.zeros(dims)
            else:
                value = torch.randn(dims, generator=generator)
            exact = name in ("timestep", "guidance", "img_ids", "txt_ids")
            inputs[name] = value.to(device, torch.float32 if exact and dtype == torch.float32 else dtype)
        return inputs

    def export_module(self, model: "LoadedModel") -> torch.nn.Module:
        return _TransformerForExport(model.denoiser(), self._guidance(model.info)).eval()


class _TransformerForExport(torch.nn.Module):
    def __init__(self, transformer: Any, guidance: bool) -> None:
        super().__init__()
        self.transformer, self.guidance = transformer, guidance

    def forward(self, hidden_states, timestep, encoder_hidden_states, pooled_projections, txt_ids, img_ids,
                guidance=None):
        return self.transformer(hidden_states=hidden_states, timestep=timestep, guidance=guidance,
                                pooled_projections=pooled_projections, encoder_hidden_states=encoder_hidden_states,
                                txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]


TRANSFORMER = FluxTransformerComponent()


# -- single files as ComfyUI users keep them ----------------------------------------------------------

def _bfl_prefix(keys: Mapping[str, Any]) -> str | None:
    """The prefix of a FLUX transformer's tensors in Black Forest Labs' layout, or None when there is none."""
    for prefix in BFL_PREFIXES:
        # FLUX.1's pooled CLIP vector (vector_in) tells it from FLUX.2, whose blocks are named alike.
        if f"{prefix}double_blocks.0.img_attn.qkv.weight" in keys and f"{prefix}vector_in.in_layer.weight" in keys:
            return prefix
    return None


def _companion_kind(keys: Mapping[str, tuple[int, ...]], prefix: str = "") -> str | None:
    """What a single file (or a prefixed part of one) holds: a CLIP text model, a T5 encoder or a FLUX VAE."""
    if f"{prefix}text_model.embeddings.token_embedding.weight" in keys:
        return "text_encoder"
    if f"{prefix}encoder.block.0.layer.0.SelfAttention.q.weight" in keys:
        return "text_encoder_2"
    return "vae" if flux_vae_kind(keys, prefix) else None


COMPANIONS = Companions(
    "FLUX", {"text_encoder": "CLIP-L text encoder (clip_l.safetensors)",
             "text_encoder_2": "T5-XXL text encoder (t5xxl_fp16.safetensors or t5xxl_fp8_e4m3fn.safetensors)",
             "vae": "FLUX VAE (ae.safetensors)"},
    _companion_kind, {"text_encoder": ("clip_l", "clip"), "text_encoder_2": ("t5",), "vae": ("ae", "vae")},
    ALL_IN_ONE)


# -- config folders for single files ----------------------------------------------------------------------


def _config_folder(name: str, files: Mapping[str, Path], cache: Path) -> Path:
    """A diffusers-layout config folder (configs and tokenizers, no weights) for these files, built from their
    tensor shapes once and shared by every model with the same architecture."""
    from dts_util.models.checkpoint import cached_shapes
    from dts_util.models.store import publish_folder

    shapes = {part: strip_prefix(cached_shapes(path), _part_prefix(part, path, files)) for part, path in files.items()}
    configs = {"transformer": transformer_config(shapes["transformer"]),
               "vae": vae_config(shapes["vae"]),
               "text_encoder": clip_config(shapes["text_encoder"]),
               "text_encoder_2": t5_config(shapes["text_encoder_2"])}
    configs["scheduler"] = scheduler_config(bool(configs["transformer"]["guidance_embeds"]))
    tokenizer = find_t5_tokenizer(name, files["transformer"])
    key = hashlib.sha256(json.dumps([configs, str(tokenizer)], sort_keys=True).encode()).hexdigest()[:16]
    return publish_folder(cache / f"flux-{key}", lambda folder: _fill(folder, configs, tokenizer))


def _part_prefix(part: str, path: Path, files: Mapping[str, Path]) -> str:
    if part == "transformer":
        return _bfl_prefix(shapes_of(path)) or ""
    return ALL_IN_ONE[part] if path == files["transformer"] else ""


def transformer_config(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
    """FluxTransformer2DModel's config from a BFL-layout transformer's shapes. The RoPE axes split the head
    width as FLUX.1's do (16, 56, 56 of 128)."""
    inner, in_channels = shapes["img_in.weight"]
    head_dim = shapes["double_blocks.0.img_attn.norm.query_norm.scale"][0]
    return {"_class_name": "FluxTransformer2DModel", "patch_size": 1, "in_channels": in_channels,
            "out_channels": shapes["final_layer.linear.weight"][0],
            "num_layers": count_indices(shapes, r"double_blocks\.(\d+)\."),
            "num_single_layers": count_indices(shapes, r"single_blocks\.(\d+)\."),
            "attention_head_dim": head_dim, "num_attention_heads": inner // head_dim,
            "joint_attention_dim": shapes["txt_in.weight"][1],
            "pooled_projection_dim": shapes["vector_in.in_layer.weight"][1],
            "guidance_embeds": "guidance_in.in_layer.weight" in shapes,
            "axes_dims_rope": [head_dim // 8, 7 * head_dim // 16, 7 * head_dim // 16]}


def vae_config(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
    """AutoencoderKL's config from an LDM-layout VAE's shapes (FLUX's ae.safetensors)."""
    levels = count_indices(shapes, r"encoder\.down\.(\d+)\.")
    return {"_class_name": "AutoencoderKL", "in_channels": shapes["encoder.conv_in.weight"][1],
            "out_channels": shapes["decoder.conv_out.weight"][0],
            "latent_channels": shapes["decoder.conv_in.weight"][1],
            "block_out_channels": [shapes[f"encoder.down.{i}.block.0.conv1.weight"][0] for i in range(levels)],
            "down_block_types": ["DownEncoderBlock2D"] * levels, "up_block_types": ["UpDecoderBlock2D"] * levels,
            "layers_per_block": count_indices(shapes, r"encoder\.down\.0\.block\.(\d+)\."), "norm_num_groups": 32,
            "act_fn": "silu", "sample_size": 1024, "scaling_factor": VAE_SCALING, "shift_factor": VAE_SHIFT,
            "use_quant_conv": "quant_conv.weight" in shapes, "use_post_quant_conv": "post_quant_conv.weight" in shapes,
            "force_upcast": True}


def clip_config(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
    """CLIPTextModel's config from a CLIP-L text model's shapes (one attention head per 64 channels)."""
    vocab, hidden = shapes["text_model.embeddings.token_embedding.weight"]
    projection = shapes.get("text_projection.weight", (hidden,))[0]
    return {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "vocab_size": vocab,
            "hidden_size": hidden, "intermediate_size": shapes["text_model.encoder.layers.0.mlp.fc1.weight"][0],
            "num_hidden_layers": count_indices(shapes, r"text_model\.encoder\.layers\.(\d+)\."),
            "num_attention_heads": max(1, hidden // 64),
            "max_position_embeddings": shapes["text_model.embeddings.position_embedding.weight"][0],
            "hidden_act": "quick_gelu", "projection_dim": projection, "bos_token_id": 49406, "eos_token_id": 49407,
            "pad_token_id": 1, "layer_norm_eps": 1e-5}


def t5_config(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
    """T5EncoderModel's config from a T5 v1.1 encoder's shapes (FLUX uses T5-XXL's)."""
    vocab, width = shapes["shared.weight"]
    buckets, heads = shapes["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
    gated = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in shapes
    ff = shapes["encoder.block.0.layer.1.DenseReluDense.wi_0.weight" if gated else
                "encoder.block.0.layer.1.DenseReluDense.wi.weight"][0]
    return {"architectures": ["T5EncoderModel"], "model_type": "t5", "vocab_size": vocab, "d_model": width,
            "d_kv": shapes["encoder.block.0.layer.0.SelfAttention.q.weight"][0] // heads, "d_ff": ff,
            "num_layers": count_indices(shapes, r"encoder\.block\.(\d+)\."), "num_heads": heads,
            "relative_attention_num_buckets": buckets, "relative_attention_max_distance": 128,
            "feed_forward_proj": "gated-gelu" if gated else "relu", "is_encoder_decoder": False,
            "layer_norm_epsilon": 1e-6, "tie_word_embeddings": False, "pad_token_id": 0, "eos_token_id": 1,
            "decoder_start_token_id": 0}


def scheduler_config(guidance_distilled: bool) -> dict[str, Any]:
    """FLUX.1's published schedulers: [dev] shifts by resolution, [schnell] uses a fixed shift of 1."""
    return {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000,
            "shift": 3.0 if guidance_distilled else 1.0, "use_dynamic_shifting": guidance_distilled,
            "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096}


T5_TOKENIZER_FOLDERS = ("tokenizer_2", "t5_tokenizer", "../tokenizer_2", "../t5_tokenizer")


def find_t5_tokenizer(name: str, path: Path) -> Path:
    """T5's tokenizer folder: single T5 files carry no vocabulary, and none ships on PyPI."""
    for folder in T5_TOKENIZER_FOLDERS:
        candidate = path.parent / folder
        if (candidate / "tokenizer.json").is_file() or (candidate / "spiece.model").is_file():
            return candidate.resolve()
    raise ModelLoadError(f"FLUX model {quote(name)} needs T5's tokenizer, which single T5 files do not carry: put the "
                         "tokenizer_2/ folder of a diffusers FLUX model (tokenizer.json or spiece.model with its "
                         f"tokenizer_config.json) beside {quote(path.name)}, named tokenizer_2 or t5_tokenizer")


def _fill(folder: Path, configs: Mapping[str, dict], t5_tokenizer: Path) -> None:
    import shutil

    from dts_util.models.families import PAD_ENDOFTEXT, write_tokenizer

    for part, config in configs.items():
        (folder / part).mkdir(parents=True)
        name = "scheduler_config.json" if part == "scheduler" else "config.json"
        (folder / part / name).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    write_tokenizer(folder / "tokenizer", PAD_ENDOFTEXT)  # CLIP-L's tokenizer pads with its end token
    shutil.copytree(t5_tokenizer, folder / "tokenizer_2")
    index = {"_class_name": "FluxPipeline", "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
             "text_encoder": ["transformers", "CLIPTextModel"], "text_encoder_2": ["transformers", "T5EncoderModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "T5TokenizerFast"],
             "transformer": ["diffusers", "FluxTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"]}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


# diffusers' FluxTransformer2DModel names <-> Black Forest Labs' (the layout of flux1-dev.safetensors).
BFL_TOP = {"x_embedder": "img_in", "context_embedder": "txt_in",
           "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
           "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
           "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
           "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
           "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
           "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
           "proj_out": "final_layer.linear"}
BFL_DOUBLE = {"norm1.linear": "img_mod.lin", "norm1_context.linear": "txt_mod.lin", "attn.to_out.0": "img_attn.proj",
              "attn.to_add_out": "txt_attn.proj", "ff.net.0.proj": "img_mlp.0", "ff.net.2": "img_mlp.2",
              "ff_context.net.0.proj": "txt_mlp.0", "ff_context.net.2": "txt_mlp.2"}
BFL_DOUBLE_NORMS = {"attn.norm_q": "img_attn.norm.query_norm", "attn.norm_k": "img_attn.norm.key_norm",
                    "attn.norm_added_q": "txt_attn.norm.query_norm", "attn.norm_added_k": "txt_attn.norm.key_norm"}
BFL_FINAL_MODULATION = ("norm_out.linear", "final_layer.adaLN_modulation.1")


def swap_halves(tensor: torch.Tensor) -> torch.Tensor:
    """BFL stores the final modulation as (shift, scale), diffusers as (scale, shift); swapping is its own inverse."""
    first, second = tensor.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def move_parameters(state: dict[str, torch.Tensor], out: dict[str, torch.Tensor], source: str, target: str) -> None:
    """Move a layer's ``weight`` (and ``bias``, where it has one) from ``state`` under ``source`` to ``out`` under
    ``target``: one step of either direction of the BFL <-> diffusers renaming."""
    for suffix in ("weight", "bias"):
        if f"{source}.{suffix}" in state:
            out[f"{target}.{suffix}"] = state.pop(f"{source}.{suffix}")


def bfl_to_diffusers(state: dict[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """A BFL-layout transformer state dict under diffusers' names (any width: diffusers' own converter assumes
    FLUX.1's 3072)."""
    state, out = dict(state), {}
    inner = int(config["num_attention_heads"]) * int(config["attention_head_dim"])

    def move(source: str, target: str) -> None:
        move_parameters(state, out, source, target)

    for diffusers_name, bfl_name in BFL_TOP.items():
        move(bfl_name, diffusers_name)
    for suffix in ("weight", "bias"):
        out[f"{BFL_FINAL_MODULATION[0]}.{suffix}"] = swap_halves(state.pop(f"{BFL_FINAL_MODULATION[1]}.{suffix}"))
    for i in range(int(config["num_layers"])):
        src, dst = f"double_blocks.{i}.", f"transformer_blocks.{i}."
        for diffusers_name, bfl_name in BFL_DOUBLE.items():
            move(src + bfl_name, dst + diffusers_name)
        for diffusers_name, bfl_name in BFL_DOUBLE_NORMS.items():
            out[f"{dst}{diffusers_name}.weight"] = state.pop(f"{src}{bfl_name}.scale")
        for suffix in ("weight", "bias"):
            for side, names in (("img", ("to_q", "to_k", "to_v")), ("txt", ("add_q_proj", "add_k_proj", "add_v_proj"))):
                for name, part in zip(names, state.pop(f"{src}{side}_attn.qkv.{suffix}").split(inner)):
                    out[f"{dst}attn.{name}.{suffix}"] = part
    for i in range(int(config["num_single_layers"])):
        src, dst = f"single_blocks.{i}.", f"single_transformer_blocks.{i}."
        move(f"{src}modulation.lin", f"{dst}norm.linear")
        move(f"{src}linear2", f"{dst}proj_out")
        out[f"{dst}attn.norm_q.weight"] = state.pop(f"{src}norm.query_norm.scale")
        out[f"{dst}attn.norm_k.weight"] = state.pop(f"{src}norm.key_norm.scale")
        for suffix in ("weight", "bias"):
            fused = state.pop(f"{src}linear1.{suffix}")
            q, k, v, mlp = fused.split([inner, inner, inner, fused.shape[0] - 3 * inner])
            for name, part in (("attn.to_q", q), ("attn.to_k", k), ("attn.to_v", v), ("proj_mlp", mlp)):
                out[f"{dst}{name}.{suffix}"] = part
    if state:
        raise ModelLoadError(f"the FLUX transformer file holds tensors no FLUX.1 transformer has (e.g. "
                             f"{sorted(state)[0]}); is it a FLUX.1 [dev] or [schnell] transformer?")
    return out


def _load_bfl_transformer(model: "LoadedModel") -> Any:
    """The transformer of a BFL-layout file (or of an all-in-one checkpoint), converted and assigned into a module
    built on the meta device."""
    from diffusers import FluxTransformer2DModel

    from dts_util.models.loader import LOAD_LOCK

    path = model.info.files["transformer"]
    prefix = _bfl_prefix(shapes_of(path)) or ""
    others = tuple(ALL_IN_ONE.values()) if prefix == "" else ()
    state = bfl_to_diffusers(read_tensors(model.name, path, prefix, model.dtype, others), model.info.denoiser_config)
    with LOAD_LOCK, torch.device("meta"):
        module = FluxTransformer2DModel.from_config(model.info.denoiser_config)
    try:
        module.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise ModelLoadError(f"the FLUX transformer file {quote(path.name)} of model {quote(model.name)} does not "
                             f"fit its own shapes ({str(exc)[:200]})") from None
    return model.prepare_module(module, "transformer")


def _load_encoder(model: "LoadedModel", cls: type, part: str) -> Any:
    """A text encoder from its single file (or its part of an all-in-one), built on the meta device and filled
    with the file's tensors at the model's dtype, so a 4.7B T5 is never materialised in fp32 first."""
    from dts_util.models.loader import LOAD_LOCK

    path = model.info.files[part]
    prefix = ALL_IN_ONE[part] if path == model.info.files["transformer"] else ""
    config = cls.config_class.from_pretrained(model.info.config_dir / part)
    state = read_tensors(model.name, path, prefix, model.dtype)
    with LOAD_LOCK, torch.device("meta"):
        module = cls(config)
    if "shared.weight" in state:  # T5 ties its encoder's embedding to the shared one
        state.setdefault("encoder.embed_tokens.weight", state["shared.weight"])
    if not any(key.startswith("text_model.") for key in module.state_dict()):
        # transformers >= 5.6 dropped CLIPTextModel's "text_model." level; files keep it
        state = {key.removeprefix("text_model."): value for key, value in state.items()}
    result = module.load_state_dict(state, strict=False, assign=True)
    materialize_buffers(module, cls, config)
    missing = [k for k in result.missing_keys if not k.endswith("position_ids")]
    if missing:
        raise ModelLoadError(f"the {COMPANIONS.kinds[part]} file {quote(path.name)} of model {quote(model.name)} lacks "
                             f"{len(missing)} tensors (e.g. {missing[0]}); is it that kind of file, and complete?")
    return model.prepare_module(module.to(model.dtype), part)
