"""Z-Image (Turbo and Base): a single-stream flow-matching DiT over FLUX.1's VAE, prompted by Qwen3.

What makes Z-Image differ, all of it here (diffusers' ``ZImagePipeline``, ``ZImageImg2ImgPipeline`` and
``ZImageInpaintPipeline`` define it):

- **Variants.** Turbo (step-distilled: 9 steps, no CFG) and Base (CFG, more steps) share one transformer
  config; the scheduler tells them apart (Turbo's shift is 3, Base's 6). A single file cannot say which it is:
  ``<file>.dts.json`` with ``{"variant": "base"}`` does, else it is served as Turbo.
- **Prompts.** The prompt goes through the tokenizer's own chat template (thinking on, as diffusers sends it),
  Qwen3's second-to-last hidden states, only the prompt's real tokens (no padding): a caption's length varies.
- **Guidance.** The request's cfg_scale s is classifier-free guidance as for SD; diffusers' Z-Image writes the
  same rule as ``pos + g (pos - neg)``, so g = s - 1 (s <= 1: no negative branch).
- **The transformer** takes lists of per-image latents (C, 1, H, W), timesteps as ``1 - sigma`` and returns the
  negative velocity; latents stay fp32 between steps.
- **Files.** A diffusers folder, or ComfyUI's ``z_image_turbo_bf16.safetensors`` + ``qwen_3_4b.safetensors`` +
  ``ae.safetensors`` with the Qwen tokenizer folder beside them (single text-encoder files carry no vocabulary).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

import torch

from dts_util.boundary import Shape
from dts_util.client_text import quote
from dts_util.engines.components import VAE_DECODER, VAE_ENCODER, ComponentDescriptor
from dts_util.errors import ModelLoadError
from dts_util.families.base import FamilyDefaults, FlowMatchingFamily, LoraFormat
from dts_util.families.flux import LATENT_RGB, vae_config
from dts_util.families.single_files import (Companions, count_indices, flux_vae_kind, folder_dtype, read_sidecar,
                                            read_tensors, safetensors_dtype, shapes_of, strip_prefix)
from dts_util.pipeline.flow import DEFAULT_SAMPLER, FlowMatchingPipeline
from dts_util.pipeline.generation import PromptEmbeddings, StartState
from dts_util.pipeline.params import ResolvedRequest

if TYPE_CHECKING:
    from dts_util.models.loader import LoadedModel, ModelInfo, PromptEncoders
    from dts_util.pipeline.components import Component, ComponentProvider

PIPELINES = frozenset({"ZImagePipeline", "ZImageImg2ImgPipeline", "ZImageInpaintPipeline"})
FOLDER_PARTS = ("transformer", "vae", "scheduler", "text_encoder", "tokenizer")
MAX_SEQUENCE_LENGTH = 512  # Qwen tokens, diffusers' default
DEFAULT_SIZE = 1024
TURBO_STEPS, BASE_STEPS = 9, 28  # diffusers' Turbo example (8 transformer steps' worth), and a usual Base count
BASE_CFG = 5.0  # s = g + 1 for diffusers' g = 4
BASE_SHIFT = 6.0  # the Base release's scheduler; Turbo's is 3
IMG2IMG_STRENGTH = 0.6  # diffusers' ZImageImg2ImgPipeline default
TRANSFORMER_PREFIXES = ("model.diffusion_model.", "")
QWEN_PREFIXES = ("model.", "")
TOKENIZER_FOLDERS = ("tokenizer", "qwen_tokenizer", "../tokenizer", "../qwen_tokenizer")


class ZImageFamily(FlowMatchingFamily):
    """Z-Image Turbo and Base (``ZImagePipeline`` folders and ComfyUI's split files)."""

    name, denoiser, pipelines = "zimage", "transformer", PIPELINES
    display_name = "Z-Image"
    latent_rgb = LATENT_RGB  # FLUX.1's VAE

    def recognizes(self, index: Mapping[str, Any]) -> bool:
        transformer = index.get("transformer")
        return index.get("_class_name", "") in self.pipelines or (
            isinstance(transformer, list) and transformer[-1:] == ["ZImageTransformer2DModel"])

    def recognizes_file(self, keys: Mapping[str, tuple[int, ...]]) -> bool:
        return _transformer_prefix(keys) is not None

    def inspect_folder(self, name: str, path: Path, index: Mapping[str, Any]) -> "ModelInfo":
        from dts_util.models.loader import ModelInfo
        from dts_util.models.store import read_json_file

        for part in FOLDER_PARTS:
            if not (path / part).is_dir():
                raise ModelLoadError(f"Z-Image model {quote(name)} has no {part}/ folder; a diffusers Z-Image "
                                     f"folder holds {', '.join(FOLDER_PARTS)}")
        return ModelInfo(
            name=name, path=path, family=self.name,
            denoiser_config=read_json_file(path / "transformer" / "config.json", f"{name}/transformer/config.json"),
            vae_config=read_json_file(path / "vae" / "config.json", f"{name}/vae/config.json"),
            scheduler_config=read_json_file(path / "scheduler" / "scheduler_config.json",
                                            f"{name}/scheduler/scheduler_config.json"),
            stored_dtype=folder_dtype(path / "transformer"))

    def inspect_file(self, name: str, path: Path, config_cache: Path) -> "ModelInfo":
        from dts_util.models.loader import ModelInfo
        from dts_util.models.store import read_json_file

        keys = shapes_of(path)
        files = COMPANIONS.find(name, path, keys)
        base = read_sidecar(name, path).get("variant") == "base"
        folder = _config_folder(name, files, base, config_cache)
        return ModelInfo(
            name=name, path=path, family=self.name,
            denoiser_config=read_json_file(folder / "transformer" / "config.json", f"{name} (transformer config)"),
            vae_config=read_json_file(folder / "vae" / "config.json", f"{name} (vae config)"),
            scheduler_config=read_json_file(folder / "scheduler" / "scheduler_config.json", f"{name} (scheduler)"),
            config_dir=folder, prediction_source="Z-Image flow matching", files=files,
            stored_dtype=safetensors_dtype(path, _transformer_prefix(keys) or ""))

    def label(self, info: "ModelInfo") -> str:
        return "zimage"

    def app_spec(self, info: "ModelInfo") -> dict[str, Any]:
        return {"version": "z_image", "upcast_attention": False, "high_precision_autoencoder": True,
                "text_encoder": "qwen_3_4b", "is_consistency_model": False}

    def native_size(self, info: "ModelInfo") -> int:
        return DEFAULT_SIZE

    def defaults(self, info: "ModelInfo") -> FamilyDefaults:
        turbo = is_turbo(info)
        return FamilyDefaults(DEFAULT_SIZE, TURBO_STEPS if turbo else BASE_STEPS, 1.0 if turbo else BASE_CFG,
                              DEFAULT_SAMPLER, 2 * info.vae_scale_factor, IMG2IMG_STRENGTH, flow_matching=True)

    def load_denoiser(self, model: "LoadedModel") -> Any:
        from diffusers import ZImageTransformer2DModel

        if not model.info.single_file:
            return model.from_pretrained(ZImageTransformer2DModel, "transformer")
        return _load_transformer_file(model)

    def load_vae(self, model: "LoadedModel") -> Any:
        from diffusers import AutoencoderKL

        return model.from_pretrained(AutoencoderKL, "vae", model.vae_dtype, file=model.info.files.get("vae"))

    def load_prompt_encoders(self, model: "LoadedModel") -> "PromptEncoders":
        from transformers import Qwen3Model

        return load_qwen_encoders(model, Qwen3Model)

    def eager_denoiser(self, module: Any, reason: str = "") -> "Component":
        return EagerZImageTransformer(module, reason)

    def pipeline(self, model: "LoadedModel", components: "ComponentProvider", should_stop: Callable[[], bool],
                 on_preview: Callable[[int, Any], None] | None) -> Callable:
        return ZImagePipeline(model, components, should_stop, on_preview)

    def components(self) -> Mapping[str, ComponentDescriptor]:
        return {c.name: c for c in (TRANSFORMER, VAE_DECODER, VAE_ENCODER)}

    def lora_format(self, info: "ModelInfo") -> LoraFormat:
        return LoraFormat("ZImageLoraLoaderMixin", "load_lora_into_transformer", ())


def is_turbo(info: "ModelInfo") -> bool:
    """Turbo's scheduler shifts by 3, Base's by 6: the one config value that tells them apart."""
    return float(info.scheduler_config.get("shift", 3.0)) < (3.0 + BASE_SHIFT) / 2


# -- the pipeline ------------------------------------------------------------------------------------


class ZImagePipeline(FlowMatchingPipeline):
    """diffusers' ``ZImagePipeline``, ``ZImageImg2ImgPipeline`` and ``ZImageInpaintPipeline`` semantics."""

    def encode_prompt(self, req: ResolvedRequest) -> PromptEmbeddings:
        """Qwen3's hidden states of each prompt's real tokens; the negative prompt's (its own length) beside."""
        encoders = self.model.prompt_encoders()
        states, tokens = self._encode_text(encoders, req.prompt)
        counts = {"prompt": tokens}
        embeddings = ZImageEmbeddings(states.repeat(req.batch_size, 1, 1), token_counts=counts)
        if req.use_cfg:
            negative, counts["negative_prompt"] = self._encode_text(encoders, req.negative_prompt)
            embeddings.negative = negative.repeat(req.batch_size, 1, 1)
        return embeddings

    @torch.inference_mode()
    def _encode_text(self, encoders: Any, text: str) -> tuple[torch.Tensor, int]:
        return encode_chat_prompt(encoders, text, self.device, enable_thinking=True, layers=(-2,),
                                  keep_padding=False)

    def denoiser_shape(self, req: ResolvedRequest, latents: torch.Tensor, embeddings: PromptEmbeddings) -> Shape:
        return Shape(latents.shape[2], latents.shape[3], latents.shape[0],
                     padded_length(embeddings.hidden_states.shape[1]))

    def step_inputs(self, req: ResolvedRequest, embeddings: PromptEmbeddings, start: StartState, width: int,
                    height: int) -> dict[str, Any]:
        """Each branch's caption padded to its multiple of 32 with a mask of its real tokens (the transformer pads
        so itself); a negative prompt of another padded length runs on a denoiser of its own shape."""
        branches = [pad_caption(embeddings.hidden_states)]
        denoisers = [None]
        if req.use_cfg:
            branches.append(pad_caption(embeddings.negative))
            negative_shape = replace(self.denoiser_shape(req, start.latents, embeddings),
                                     text_length=branches[1][0].shape[1])
            denoisers.append(self.components.denoiser(negative_shape))
        return {"branches": branches, "denoisers": denoisers}

    def denoise(self, denoiser: Any, scheduler: Any, latents: torch.Tensor, t: torch.Tensor,
                inputs: dict[str, Any], req: ResolvedRequest) -> torch.Tensor:
        """The velocity the scheduler steps with: the transformer's output negated, guided as
        ``pos + (s - 1)(pos - neg)``, in fp32."""
        timestep = ((1000 - t.expand(latents.shape[0])) / 1000).to(latents.dtype)
        outputs = [(branch_denoiser or denoiser)(latents=latents.to(self.dtype), timestep=timestep, cap_feats=states,
                                                 cap_mask=mask).float()
                   for (states, mask), branch_denoiser in zip(inputs["branches"], inputs["denoisers"])]
        prediction = outputs[0]
        if req.use_cfg:
            prediction = outputs[0] + (req.cfg_scale - 1.0) * (outputs[0] - outputs[1])
        return -prediction


@dataclass
class ZImageEmbeddings(PromptEmbeddings):
    """Z-Image's captions: the negative prompt's tokens are a tensor of their own length."""

    negative: torch.Tensor | None = None


def encode_chat_prompt(encoders: Any, text: str, device: Any, *, enable_thinking: bool, layers: tuple[int, ...],
                       keep_padding: bool) -> tuple[torch.Tensor, int]:
    """A prompt through the tokenizer's chat template and the Qwen3 text encoder, as diffusers' Qwen-prompted
    pipelines read it: the hidden states of ``layers`` (concatenated per token), padded to 512 tokens or only the
    real ones. Returns (1, tokens, width x len(layers)) and the prompt's token count."""
    tokenizer, encoder = encoders.tokenizers[0], encoders.text_encoders[0]
    chat = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                         add_generation_prompt=True, enable_thinking=enable_thinking)
    ids = tokenizer(chat, padding="max_length", max_length=MAX_SEQUENCE_LENGTH, truncation=True, return_tensors="pt")
    mask = ids.attention_mask.to(device)
    output = encoder(input_ids=ids.input_ids.to(device), attention_mask=mask, output_hidden_states=True,
                     use_cache=False)
    states = torch.cat([output.hidden_states[k] for k in layers], dim=-1) if len(layers) > 1 \
        else output.hidden_states[layers[0]]
    if not keep_padding:
        states = states[:, mask[0].bool()]
    tokens = len(tokenizer(text, add_special_tokens=False).input_ids)
    return states, tokens


class EagerZImageTransformer:
    """A diffusers ZImageTransformer2DModel behind the named-input interface engines share: a batch of latents
    (B, C, H, W) with one caption length, in and out."""

    backend = "eager"

    def __init__(self, module: Any, reason: str = "") -> None:
        self.module, self.reason = module, reason

    @torch.inference_mode()
    def __call__(self, *, latents: torch.Tensor, timestep: torch.Tensor, cap_feats: torch.Tensor,
                 cap_mask: torch.Tensor) -> torch.Tensor:
        real = int(cap_mask[0].sum())  # diffusers pads the caption itself
        return _call_transformer(self.module, latents, timestep, cap_feats[:, :real])


def padded_length(tokens: int) -> int:
    return tokens + (-tokens) % SEQUENCE_MULTIPLE


def pad_caption(states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A caption padded to its multiple of 32 (with its last token, as diffusers pads) and the mask of its real
    tokens: what engines take, so one engine serves every caption length that pads to its own."""
    batch, tokens, _ = states.shape
    padding = padded_length(tokens) - tokens
    mask = torch.cat([torch.ones(batch, tokens), torch.zeros(batch, padding)], dim=1).to(states.device, states.dtype)
    return torch.cat([states, states[:, -1:].expand(-1, padding, -1)], dim=1), mask


def _call_transformer(module: Any, latents: torch.Tensor, timestep: torch.Tensor,
                      cap_feats: torch.Tensor) -> torch.Tensor:
    images = list(latents.unsqueeze(2).unbind(0))
    outputs = module(images, timestep, list(cap_feats.unbind(0)), return_dict=False)[0]
    return torch.stack(outputs).squeeze(2)


# -- the engine component ------------------------------------------------------------------------------


class ZImageTransformerComponent(ComponentDescriptor):
    """The Z-Image transformer: latents (B, 16, h, w), 1 - sigma and a caption of one length to its output."""

    name, output_name, weights = "transformer", "velocity", "transformer"
    # The transformer pads each caption and image to 32 tokens: an engine is exported per shape, caption length
    # included (``_TransformerForExport`` writes the forward for fixed shapes).
    static_export = True

    def build_precision(self, info: "ModelInfo", precision: str) -> str:
        return "bf16" if precision == "fp16" else precision

    def dynamic_axes(self, info: "ModelInfo") -> dict[str, dict[int, str]]:
        spatial = {0: "batch", 2: "height", 3: "width"}
        return {"latents": spatial, "timestep": {0: "batch"}, "cap_feats": {0: "batch", 1: "text_tokens"},
                "cap_mask": {0: "batch", 1: "text_tokens"}, "velocity": spatial}

    def input_shapes(self, info: "ModelInfo", shape: Shape) -> dict[str, tuple[int, ...]]:
        config = info.denoiser_config
        b = shape.batch
        return {"latents": (b, int(config["in_channels"]), shape.latent_height, shape.latent_width),
                "timestep": (b,), "cap_feats": (b, shape.text_length, int(config["cap_feat_dim"])),
                "cap_mask": (b, shape.text_length)}

    def output_shape(self, info: "ModelInfo", shape: Shape) -> tuple[int, ...]:
        return (shape.batch, int(info.denoiser_config["in_channels"]), shape.latent_height, shape.latent_width)

    def free_dimensions(self, info: "ModelInfo", shape: Shape) -> dict[str, int]:
        return {"batch": shape.batch, "height": shape.latent_height, "width": shape.latent_width,
                "text_tokens": shape.text_length}

    def text_lengths(self, info: "ModelInfo", prompt_chunks: tuple[int, ...]) -> list[int]:
        """Captions pad to multiples of 32 tokens (the chat template alone is about 10), and an engine serves every
        caption that pads to its length: prompt chunk n (75 CLIP tokens' worth of words) builds all lengths up
        to 64 x n. Each is a full-size engine; --build-missing adds the lengths requests bring."""
        return [SEQUENCE_MULTIPLE * k for k in range(1, 2 * max(prompt_chunks) + 1)]

    def representative_shape(self, info: "ModelInfo") -> Shape:
        return Shape(16, 16, 1, SEQUENCE_MULTIPLE)

    def sample_inputs(self, info: "ModelInfo", shape: Shape, seed: int = 0, device: str = "cpu",
                      dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        generator = torch.Generator("cpu").manual_seed(seed)
        inputs = {}
        for name, dims in self.input_shapes(info, shape).items():
            if name == "cap_mask":  # a caption 2/3 as long as the engine's, the rest padding
                value = (torch.arange(dims[1]) < max(1, 2 * dims[1] // 3)).float().expand(dims)
            else:
                value = torch.rand(dims, generator=generator) if name == "timestep" else \
                    torch.randn(dims, generator=generator)
            inputs[name] = value.to(device, torch.float32 if name == "timestep" and dtype == torch.float32 else dtype)
        return inputs

    def export_module(self, model: "LoadedModel") -> torch.nn.Module:
        transformer = model.denoiser()
        for module in transformer.modules():  # eager serving keeps diffusers' own processor
            if hasattr(module, "set_processor") and hasattr(module, "norm_q"):
                module.set_processor(_RealRotaryProcessor())
        return _TransformerForExport(transformer).eval()


class _TransformerForExport(torch.nn.Module):
    """diffusers' Z-Image forward for one batch of captions padded to one multiple of 32, in traceable form.

    The same modules and arithmetic; what changes is only how it is written: shapes are the engine's (so padding
    the image to 32 tokens is fixed at export), the caption's padding comes as a mask, the positions' RoPE
    rotations are real cos/sin tables instead of complex numbers (ONNX has no complex type), and the attention
    processors apply them so.
    """

    def __init__(self, transformer: Any) -> None:
        super().__init__()
        self.transformer = transformer
        embedder = transformer.rope_embedder
        angles = [_rope_angles(dim, length, embedder.theta) for dim, length in zip(embedder.axes_dims,
                                                                                   embedder.axes_lens)]
        self.tables = [(angle.cos(), angle.sin()) for angle in angles]

    def forward(self, latents: torch.Tensor, timestep: torch.Tensor, cap_feats: torch.Tensor,
                cap_mask: torch.Tensor) -> torch.Tensor:
        model = self.transformer
        batch, channels, height, width = latents.shape
        rows, columns, text = height // 2, width // 2, cap_feats.shape[1]
        adaln = model.t_embedder(timestep * model.t_scale).type_as(latents)
        # Image tokens: 2x2 patches (one frame), padded with the last one to a multiple of 32.
        tokens = latents.view(batch, channels, 1, 1, rows, 2, columns, 2).permute(0, 2, 4, 6, 3, 5, 7, 1)
        tokens = tokens.reshape(batch, rows * columns, 4 * channels)
        image_len = rows * columns
        x = model.all_x_embedder["2-1"](_pad_tokens(tokens))
        x = _fill_padding(x, image_len, model.x_pad_token)
        x_rope = self._rope(_image_positions(rows, columns, text + 1, x.shape[1]), latents.device)
        for layer in model.noise_refiner:
            x = layer(x, None, x_rope, adaln)
        # The caption arrives padded to the engine's length; its padding becomes the pad token, as diffusers does.
        cap = model.cap_embedder(cap_feats)
        cap = torch.where(cap_mask[..., None] > 0.5, cap, model.cap_pad_token.to(cap.dtype))
        cap_rope = self._rope(_caption_positions(text), latents.device)
        for layer in model.context_refiner:
            cap = layer(cap, None, cap_rope)
        unified = torch.cat([x, cap], dim=1)
        rope = tuple(torch.cat([a, b], dim=1) for a, b in zip(x_rope, cap_rope))
        for layer in model.layers:
            unified = layer(unified, None, rope, adaln)
        out = model.all_final_layer["2-1"](unified, c=adaln)[:, :image_len]
        out = out.reshape(batch, 1, rows, columns, 1, 2, 2, channels).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return out.reshape(batch, channels, height, width)

    def _rope(self, positions: torch.Tensor, device: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """(1, tokens, head_dim / 2) cos and sin of each token's rotation, axis by axis as diffusers concatenates."""
        cos = torch.cat([table[0][positions[:, i]] for i, table in enumerate(self.tables)], dim=-1)
        sin = torch.cat([table[1][positions[:, i]] for i, table in enumerate(self.tables)], dim=-1)
        return cos[None].to(device), sin[None].to(device)


SEQUENCE_MULTIPLE = 32  # diffusers' SEQ_MULTI_OF: every image and caption is padded to it


def _rope_angles(dim: int, length: int, theta: float) -> torch.Tensor:
    """diffusers' ``precompute_freqs_cis`` angles: computed in float64, then float32."""
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    return torch.outer(torch.arange(length, dtype=torch.float64), freqs).float()


def _pad_tokens(tokens: torch.Tensor) -> torch.Tensor:
    padding = (-tokens.shape[1]) % SEQUENCE_MULTIPLE
    return torch.cat([tokens, tokens[:, -1:].expand(-1, padding, -1)], dim=1) if padding else tokens


def _fill_padding(tokens: torch.Tensor, real: int, pad_token: torch.Tensor) -> torch.Tensor:
    if tokens.shape[1] == real:
        return tokens
    return torch.cat([tokens[:, :real], pad_token.to(tokens.dtype)[None].expand(tokens.shape[0], -1, -1)
                      .repeat(1, tokens.shape[1] - real, 1)], dim=1)


def _image_positions(rows: int, columns: int, start: int, total: int) -> torch.Tensor:
    """(frame, row, column) of each image token, the frame after the caption; padding at (0, 0, 0)."""
    positions = torch.zeros(total, 3, dtype=torch.long)
    positions[:rows * columns, 0] = start
    positions[:rows * columns, 1] = torch.arange(rows).repeat_interleave(columns)
    positions[:rows * columns, 2] = torch.arange(columns).repeat(rows)
    return positions


def _caption_positions(total: int) -> torch.Tensor:
    """(1 + i, 0, 0) for each caption token, padding included."""
    positions = torch.zeros(total, 3, dtype=torch.long)
    positions[:, 0] = torch.arange(1, total + 1)
    return positions


class _RealRotaryProcessor:
    """diffusers' ``ZSingleStreamAttnProcessor`` with the rotation applied as real cos/sin where the traceable
    forward passes (cos, sin); diffusers' own forward (complex rotations, masks) still goes to diffusers'."""

    def __init__(self) -> None:
        from diffusers.models.transformers.transformer_z_image import ZSingleStreamAttnProcessor

        self.diffusers = ZSingleStreamAttnProcessor()

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: Any = None,
                 attention_mask: Any = None, freqs_cis: Any = None) -> torch.Tensor:
        if not isinstance(freqs_cis, tuple):
            return self.diffusers(attn, hidden_states, encoder_hidden_states, attention_mask, freqs_cis)
        query, key, value = (proj(hidden_states).unflatten(-1, (attn.heads, -1))
                             for proj in (attn.to_q, attn.to_k, attn.to_v))
        query, key = attn.norm_q(query), attn.norm_k(key)
        query, key = _rotate(query, freqs_cis), _rotate(key, freqs_cis)
        out = torch.nn.functional.scaled_dot_product_attention(query.transpose(1, 2), key.transpose(1, 2),
                                                               value.transpose(1, 2))
        return attn.to_out[0](out.transpose(1, 2).flatten(2, 3).to(query.dtype))


def _rotate(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Each (even, odd) pair of ``x`` rotated by its angle: the complex product diffusers computes, in reals."""
    cos, sin = (t.unsqueeze(2) for t in rope)
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)
    even, odd = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1)
    return rotated.flatten(3).type_as(x)


TRANSFORMER = ZImageTransformerComponent()


# -- ComfyUI's split files -------------------------------------------------------------------------------------


def _transformer_prefix(keys: Mapping[str, Any]) -> str | None:
    for prefix in TRANSFORMER_PREFIXES:
        if f"{prefix}layers.0.adaLN_modulation.0.weight" in keys and f"{prefix}cap_embedder.0.weight" in keys:
            return prefix
    return None


def qwen3_prefix(keys: Mapping[str, Any]) -> str | None:
    """The prefix of a Qwen3 text encoder's tensors in a single file (transformers' names), or None."""
    for prefix in QWEN_PREFIXES:
        if f"{prefix}layers.0.self_attn.q_norm.weight" in keys and f"{prefix}embed_tokens.weight" in keys:
            return prefix
    return None


def _companion_kind(keys: Mapping[str, tuple[int, ...]], prefix: str = "") -> str | None:
    if qwen3_prefix(strip_prefix(keys, prefix)) is not None:
        return "text_encoder"
    return "vae" if flux_vae_kind(keys, prefix) else None


COMPANIONS = Companions("Z-Image", {"text_encoder": "Qwen3-4B text encoder (qwen_3_4b.safetensors)",
                                   "vae": "FLUX VAE (ae.safetensors)"},
                        _companion_kind, {"text_encoder": ("qwen",), "vae": ("ae", "vae")})


def transformer_config(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
    """ZImageTransformer2DModel's config from the original layout's shapes; the RoPE axes split a head as the
    release's do (32, 48, 48 of 128)."""
    dim, patch_in = shapes["x_embedder.weight"]
    head_dim = shapes["layers.0.attention.q_norm.weight"][0]
    channels = patch_in // 4  # 2x2 patches of one frame
    third = head_dim * 3 // 8
    return {"_class_name": "ZImageTransformer2DModel", "all_patch_size": [2], "all_f_patch_size": [1],
            "in_channels": channels, "dim": dim, "n_layers": count_indices(shapes, r"layers\.(\d+)\."),
            "n_refiner_layers": count_indices(shapes, r"noise_refiner\.(\d+)\."), "n_heads": dim // head_dim,
            "n_kv_heads": dim // head_dim, "norm_eps": 1e-5, "qk_norm": True,
            "cap_feat_dim": shapes["cap_embedder.0.weight"][0], "rope_theta": 256.0, "t_scale": 1000.0,
            "axes_dims": [head_dim - 2 * third, third, third], "axes_lens": [1536, 512, 512]}


def qwen3_config(shapes: Mapping[str, tuple[int, ...]], architecture: str) -> dict[str, Any]:
    """Qwen3's config from a text encoder file's shapes (Qwen3's published rope theta and norm epsilon)."""
    vocab, width = shapes["embed_tokens.weight"]
    head_dim = shapes["layers.0.self_attn.q_norm.weight"][0]
    return {"architectures": [architecture], "model_type": "qwen3", "vocab_size": vocab, "hidden_size": width,
            "intermediate_size": shapes["layers.0.mlp.gate_proj.weight"][0],
            "num_hidden_layers": count_indices(shapes, r"layers\.(\d+)\."),
            "num_attention_heads": shapes["layers.0.self_attn.q_proj.weight"][0] // head_dim,
            "num_key_value_heads": shapes["layers.0.self_attn.k_proj.weight"][0] // head_dim, "head_dim": head_dim,
            "max_position_embeddings": 40960, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
            "tie_word_embeddings": True, "hidden_act": "silu"}


def find_qwen_tokenizer(name: str, path: Path) -> Path:
    """The Qwen tokenizer folder: single text-encoder files carry no vocabulary, and none ships on PyPI."""
    for folder in TOKENIZER_FOLDERS:
        candidate = path.parent / folder
        if (candidate / "tokenizer.json").is_file() or (candidate / "vocab.json").is_file():
            return candidate.resolve()
    raise ModelLoadError(f"model {quote(name)} needs Qwen's tokenizer, which single text-encoder files do not "
                         "carry: put the tokenizer/ folder of the diffusers model (tokenizer.json, "
                         f"tokenizer_config.json and its chat template) beside {quote(path.name)}, named tokenizer or "
                         "qwen_tokenizer")


def _config_folder(name: str, files: Mapping[str, Path], base: bool, cache: Path) -> Path:
    from dts_util.models.store import publish_folder

    shapes = {part: strip_prefix(shapes_of(path), _part_prefix(part, path)) for part, path in files.items()}
    configs = {"transformer": transformer_config(shapes["transformer"]), "vae": vae_config(shapes["vae"]),
               "text_encoder": qwen3_config(shapes["text_encoder"], "Qwen3Model"),
               "scheduler": {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000,
                             "shift": BASE_SHIFT if base else 3.0, "use_dynamic_shifting": False}}
    tokenizer = find_qwen_tokenizer(name, files["transformer"])
    key = hashlib.sha256(json.dumps([configs, str(tokenizer)], sort_keys=True).encode()).hexdigest()[:16]
    return publish_folder(cache / f"zimage-{key}", lambda folder: _fill(folder, configs, tokenizer))


def _part_prefix(part: str, path: Path) -> str:
    keys = shapes_of(path)
    if part == "transformer":
        return _transformer_prefix(keys) or ""
    return (qwen3_prefix(keys) or "") if part == "text_encoder" else ""


def _fill(folder: Path, configs: Mapping[str, dict], tokenizer: Path) -> None:
    import shutil

    for part, config in configs.items():
        (folder / part).mkdir(parents=True)
        name = "scheduler_config.json" if part == "scheduler" else "config.json"
        (folder / part / name).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    shutil.copytree(tokenizer, folder / "tokenizer")
    index = {"_class_name": "ZImagePipeline", "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
             "text_encoder": ["transformers", "Qwen3Model"], "tokenizer": ["transformers", "Qwen2Tokenizer"],
             "transformer": ["diffusers", "ZImageTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"]}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


def _load_transformer_file(model: "LoadedModel") -> Any:
    """The transformer of an original-layout file, renamed by diffusers' own single-file converter and assigned
    into a module built on the meta device (bf16 and fp8 files are never widened beyond the serving dtype)."""
    from diffusers import ZImageTransformer2DModel
    from diffusers.loaders.single_file_utils import convert_z_image_transformer_checkpoint_to_diffusers

    from dts_util.families.single_files import load_into_meta_module

    path = model.info.files["transformer"]
    state = read_tensors(model.name, path, _transformer_prefix(shapes_of(path)) or "", model.dtype)
    state = convert_z_image_transformer_checkpoint_to_diffusers(state)
    return load_into_meta_module(model, ZImageTransformer2DModel, model.info.denoiser_config, state, "transformer",
                                 "Z-Image transformer", path)


def load_qwen_encoders(model: "LoadedModel", cls: type) -> "PromptEncoders":
    """The Qwen tokenizer and a Qwen3 text encoder (``cls``), from a diffusers folder or a single file."""
    from transformers import AutoTokenizer

    from dts_util.models.loader import PromptEncoders

    folder = model.info.config_dir or model.info.path
    tokenizer = AutoTokenizer.from_pretrained(folder, subfolder="tokenizer", local_files_only=True)
    if model.info.single_file:
        return PromptEncoders([tokenizer], [load_qwen3_file(model, cls, "text_encoder")])
    return PromptEncoders([tokenizer], [model.from_pretrained(cls, "text_encoder")])


def load_qwen3_file(model: "LoadedModel", cls: type, part: str) -> Any:
    """A Qwen3 text encoder from its single file, filled at the model's dtype into a module built on meta."""
    from dts_util.families.single_files import load_into_meta_module

    path = model.info.files[part]
    config = cls.config_class.from_pretrained(model.info.config_dir / part)
    state = read_tensors(model.name, path, qwen3_prefix(shapes_of(path)) or "", model.dtype)
    if cls.__name__.endswith("ForCausalLM"):  # the encoder's layers sit under "model."; the LM head is tied
        state = {f"model.{key}": value for key, value in state.items() if not key.startswith("lm_head.")}
        state.setdefault("lm_head.weight", state["model.embed_tokens.weight"])
    return load_into_meta_module(model, cls, config, state, part, "Qwen3 text encoder", path, strict=False)
