"""Single-file checkpoints (``.safetensors``, ``.ckpt``) in the original Stable Diffusion key layout.

These are the files users have: what A1111, ComfyUI and Civitai use. This module
reads what a checkpoint is from its tensor names and shapes alone, without
reading a tensor: the family (SD1.x, SD2.x, SDXL base), what is refused (SDXL
refiner), and the architecture, an inpainting UNet's 9 input channels included.
Shapes matter, not only the family: the layer widths and counts of every
component come from the shapes, so small fine-tunes and test models load as faithfully as full-size ones. What leaves no
trace in the shapes follows the family's published rules: attention heads (8 per
block for SD1.x, one per 64 channels for SD2.x/SDXL and every CLIP text encoder),
32 group-norm groups, sample size, VAE scaling factor and prediction type.

The result is a diffusers config folder, built from the configs shipped for each
family, that diffusers' ``from_single_file(config=...)`` loads the weights into,
offline.
"""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dts_util.client_text import quote
from dts_util.errors import ModelLoadError

log = logging.getLogger(__name__)

CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")
UNET = "model.diffusion_model."
VAE = "first_stage_model."
SD1_TEXT = "cond_stage_model.transformer.text_model."
SD2_TEXT = "cond_stage_model.model."
SDXL_TEXT = "conditioner.embedders.0.transformer.text_model."
SDXL_TEXT_2 = "conditioner.embedders.1.model."
SDXL_REFINER_TEXT = "conditioner.embedders.0.model."
# A safetensors header is JSON; real ones are a few hundred KB. Bounded, as it comes from a user's file.
MAX_HEADER_BYTES = 100 * 1024 * 1024
GROUP_NORM_GROUPS = 32

Shapes = dict[str, tuple[int, ...]]


def read_shapes(path: Path) -> Shapes:
    """Tensor name -> shape, from the safetensors header, or from a ``.ckpt`` loaded with
    ``weights_only=True`` (a pickle that needs anything else is refused, never executed)."""
    if path.suffix == ".safetensors":
        return _safetensors_shapes(path)
    return {name: tuple(t.shape) for name, t in load_ckpt_state_dict(path).items() if hasattr(t, "shape")}


def _safetensors_shapes(path: Path) -> Shapes:
    try:
        with path.open("rb") as fh:
            (length,) = struct.unpack("<Q", fh.read(8))
            if length > MAX_HEADER_BYTES:
                raise ValueError(f"header of {length} bytes")
            header = json.loads(fh.read(length))
        return {name: tuple(meta["shape"]) for name, meta in header.items() if name != "__metadata__"}
    except (OSError, ValueError, KeyError, TypeError, struct.error) as exc:
        raise ModelLoadError(f"{quote(path.name)} is not a readable safetensors file ({type(exc).__name__})") from None


def load_ckpt_state_dict(path: Path) -> dict[str, Any]:
    """The tensors of a ``.ckpt``; only plain tensors and containers are unpickled."""
    import torch

    try:
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # the legacy (non-zip) format cannot be memory-mapped
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ModelLoadError(f"{quote(path.name)} needs arbitrary Python objects to load; dts-util refuses such "
                             ".ckpt files and never executes them. Convert it to .safetensors on a trusted machine") \
            from None
    except (OSError, RuntimeError, EOFError, ValueError) as exc:
        raise ModelLoadError(f"{quote(path.name)} is not a readable .ckpt file ({type(exc).__name__})") from None
    while isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict):
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, dict):
        raise ModelLoadError(f"{quote(path.name)} does not hold a state dict")
    return checkpoint


_SHAPES_CACHE: dict[tuple, Shapes] = {}
_SHAPES_CACHE_SIZE = 256


def cached_shapes(path: Path) -> Shapes:
    """``read_shapes``, remembered while the file's size and modification time stay the same."""
    info = path.stat()
    key = (str(path), info.st_size, info.st_mtime_ns)
    if key not in _SHAPES_CACHE:
        if len(_SHAPES_CACHE) >= _SHAPES_CACHE_SIZE:
            _SHAPES_CACHE.pop(next(iter(_SHAPES_CACHE)))
        _SHAPES_CACHE[key] = read_shapes(path)
    return _SHAPES_CACHE[key]


def looks_like_checkpoint(path: Path) -> bool:
    """Whether a file in the store is a servable checkpoint; cheap enough for every Echo.

    A ``.safetensors`` file is judged by its header. A ``.ckpt`` would have to be
    unpickled, so it counts when it is not part of a diffusers folder, and is
    checked when it is loaded.
    """
    if path.suffix == ".ckpt":
        return True
    try:
        return is_checkpoint(cached_shapes(path))
    except (ModelLoadError, OSError):
        return False


def is_checkpoint(shapes: Shapes) -> bool:
    """Whether the tensors are a whole model of some family dts-util serves (not a LoRA, VAE or embedding)."""
    from dts_util.families import family_for_file

    return family_for_file(shapes) is not None


def is_stable_diffusion(shapes: Shapes) -> bool:
    """Whether the tensors are a whole Stable Diffusion model in the original key layout."""
    return f"{UNET}input_blocks.0.0.weight" in shapes


def refuse_unknown_file(shapes: Shapes, name: str) -> None:
    """The error for a single file no family recognises."""
    raise ModelLoadError(f"{quote(name)} is not a Stable Diffusion checkpoint or FLUX transformer (it has no "
                         f"{UNET}* or double_blocks.* tensors); LoRA, VAE and text-encoder files are not models")


@dataclass(frozen=True)
class CheckpointArchitecture:
    """What a checkpoint is: its variant (whose shipped configs it starts from) and the config values its
    shapes dictate, per component folder."""

    variant: str
    family: str
    overrides: dict[str, dict] = field(default_factory=dict)

    @property
    def key(self) -> str:
        """Names the config folder: equal architectures share one."""
        blob = json.dumps([self.variant, self.overrides], sort_keys=True).encode()
        return f"{self.variant}-{hashlib.sha256(blob).hexdigest()[:16]}"


def detect(shapes: Shapes, name: str) -> CheckpointArchitecture:
    """The architecture of checkpoint ``name`` from its shapes; refuses what dts-util cannot serve."""
    if not is_stable_diffusion(shapes):
        raise ModelLoadError(f"{quote(name)} is not a Stable Diffusion checkpoint (it has no "
                             f"{UNET}* tensors); LoRA, VAE and embedding files are not models")
    in_channels = shapes[f"{UNET}input_blocks.0.0.weight"][1]
    if in_channels not in (4, 9):  # 9: an inpainting UNet (latents, mask, masked image's latents)
        raise ModelLoadError(f"{quote(name)} has a UNet of {in_channels} input channels; dts-util serves "
                             "text-to-image (4) and inpainting (9) checkpoints")
    if any(k.startswith(SDXL_REFINER_TEXT) for k in shapes) and not any(k.startswith(SDXL_TEXT_2) for k in shapes):
        raise ModelLoadError(f"{quote(name)} is an SDXL refiner checkpoint; dts-util serves SDXL base "
                             "checkpoints only, so far")
    if any(k.startswith(SDXL_TEXT_2) for k in shapes):
        return _sdxl(shapes, name)
    if any(k.startswith(SD2_TEXT) for k in shapes):
        return _sd(shapes, name, "sd2_768", "sd2", _open_clip_text(shapes, SD2_TEXT, drop_last_layer=True))
    if any(k.startswith(SD1_TEXT) for k in shapes):
        return _sd(shapes, name, "sd15", "sd1", _clip_text(shapes, SD1_TEXT, "quick_gelu"))
    raise ModelLoadError(f"{quote(name)} has a Stable Diffusion UNet but no text encoder dts-util knows "
                         "(SD1.x CLIP-L, SD2.x OpenCLIP-H or SDXL's two encoders)")


def _sd(shapes: Shapes, name: str, variant: str, family: str, text: dict) -> CheckpointArchitecture:
    unet = _unet(shapes, name, heads_rule=family)
    return CheckpointArchitecture(variant, family, {"unet": unet, "vae": _vae(shapes, name), "text_encoder": text})


def _sdxl(shapes: Shapes, name: str) -> CheckpointArchitecture:
    text = _clip_text(shapes, SDXL_TEXT, "quick_gelu")
    text_2 = _open_clip_text(shapes, SDXL_TEXT_2, drop_last_layer=False)
    unet = _unet(shapes, name, heads_rule="sdxl")
    label = shapes.get(f"{UNET}label_emb.0.0.weight")
    if label is None:
        raise ModelLoadError(f"{quote(name)} looks like SDXL but has no label_emb (size/crop conditioning)")
    pooled = text_2["projection_dim"]
    unet.update(projection_class_embeddings_input_dim=label[1], addition_time_embed_dim=(label[1] - pooled) // 6)
    overrides = {"unet": unet, "vae": _vae(shapes, name), "text_encoder": text, "text_encoder_2": text_2}
    return CheckpointArchitecture("sdxl_base", "sdxl", overrides)


def _count(shapes: Shapes, pattern: str) -> int:
    """How many distinct indices the ``{}`` in ``pattern`` takes among the tensor names."""
    regex = re.compile(re.escape(pattern).replace(r"\{\}", r"(\d+)"))
    return len({m.group(1) for k in shapes if (m := regex.match(k))})


def _unet_levels(shapes: Shapes) -> list[dict]:
    """Per resolution level of the UNet's down path: output channels, ResBlocks, attention, transformer depth.

    LDM numbers the down path ``input_blocks.1..N``: ResBlocks (each maybe followed by a
    transformer) and, between levels, a downsampler (``.0.op``).
    """
    prefix = f"{UNET}input_blocks."
    levels, level = [], {"channels": 0, "layers": 0, "attention": False, "depth": 1}
    index = 1
    while any(k.startswith(f"{prefix}{index}.") for k in shapes):
        if f"{prefix}{index}.0.in_layers.0.weight" in shapes:  # a ResBlock
            level["channels"] = shapes[f"{prefix}{index}.0.out_layers.3.weight"][0]
            level["layers"] += 1
            if f"{prefix}{index}.1.norm.weight" in shapes:
                level["attention"] = True
                level["depth"] = max(level["depth"], _count(shapes, f"{prefix}{index}.1.transformer_blocks.{{}}."))
        else:  # the downsampler ends a level
            levels.append(level)
            level = {"channels": 0, "layers": 0, "attention": False, "depth": 1}
        index += 1
    return [*levels, level]


def _unet(shapes: Shapes, name: str, heads_rule: str) -> dict:
    """UNet2DConditionModel config values from the LDM UNet's shapes."""
    prefix = f"{UNET}input_blocks."
    levels = _unet_levels(shapes)
    channels, layers = [lv["channels"] for lv in levels], [lv["layers"] for lv in levels]
    attention, depth = [lv["attention"] for lv in levels], [lv["depth"] for lv in levels]
    if len(set(layers)) != 1:
        raise ModelLoadError(f"{quote(name)}: its UNet has {layers} blocks per level; dts-util needs the same "
                             "number at every level")
    first_attention = next((k for k in shapes if k.startswith(prefix) and k.endswith("attn2.to_k.weight")), None)
    proj_in = next((k for k in shapes if k.startswith(prefix) and k.endswith(".proj_in.weight")), None)
    if first_attention is None or proj_in is None:
        raise ModelLoadError(f"{quote(name)}: its UNet has no cross-attention; it is not a text-to-image model")
    heads = [8] * len(channels) if heads_rule == "sd1" else [max(1, c // 64) for c in channels]
    config = {
        "in_channels": shapes[f"{prefix}0.0.weight"][1],
        "out_channels": shapes[f"{UNET}out.2.weight"][0],
        "block_out_channels": channels,
        "layers_per_block": layers[0],
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)],
        "cross_attention_dim": shapes[first_attention][1],
        "use_linear_projection": len(shapes[proj_in]) == 2,
        "attention_head_dim": heads if heads_rule != "sd1" else 8,
        "norm_num_groups": GROUP_NORM_GROUPS,
    }
    if heads_rule != "sd1":
        config["transformer_layers_per_block"] = depth
    return config


def _vae(shapes: Shapes, name: str) -> dict:
    """AutoencoderKL config values from the LDM VAE's shapes."""
    levels = _count(shapes, f"{VAE}encoder.down.{{}}.")
    if not levels:
        raise ModelLoadError(f"{quote(name)} has no VAE ({VAE}* tensors); dts-util needs a checkpoint with its VAE")
    blocks = _count(shapes, f"{VAE}encoder.down.0.block.{{}}.")
    channels = [shapes[f"{VAE}encoder.down.{i}.block.{blocks - 1}.conv2.weight"][0] for i in range(levels)]
    return {
        "in_channels": shapes[f"{VAE}encoder.conv_in.weight"][1],
        "out_channels": shapes[f"{VAE}decoder.conv_out.weight"][0],
        "latent_channels": shapes[f"{VAE}encoder.conv_out.weight"][0] // 2,
        "block_out_channels": channels,
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "layers_per_block": blocks,
        "norm_num_groups": GROUP_NORM_GROUPS,
    }


def _clip_text(shapes: Shapes, prefix: str, activation: str) -> dict:
    """CLIPTextModel config values from an OpenAI CLIP text encoder in the transformers layout."""
    vocab, hidden = shapes[f"{prefix}embeddings.token_embedding.weight"]
    return {
        "vocab_size": vocab, "hidden_size": hidden,
        "intermediate_size": shapes[f"{prefix}encoder.layers.0.mlp.fc1.weight"][0],
        "num_hidden_layers": _count(shapes, f"{prefix}encoder.layers.{{}}."),
        "num_attention_heads": max(1, hidden // 64),
        "max_position_embeddings": shapes[f"{prefix}embeddings.position_embedding.weight"][0],
        "hidden_act": activation,
    }


def _open_clip_text(shapes: Shapes, prefix: str, drop_last_layer: bool) -> dict:
    """CLIPTextModel config values from an OpenCLIP text tower (SD2 uses its penultimate layer, so
    diffusers' SD2 text encoder leaves the last one out)."""
    vocab, hidden = shapes[f"{prefix}token_embedding.weight"]
    layers = _count(shapes, f"{prefix}transformer.resblocks.{{}}.")
    projection = shapes.get(f"{prefix}text_projection")
    return {
        "vocab_size": vocab, "hidden_size": hidden,
        "intermediate_size": shapes[f"{prefix}transformer.resblocks.0.mlp.c_fc.weight"][0],
        # diffusers' loader leaves out resblock 23 of a 24-layer tower (SD2 reads the penultimate layer).
        "num_hidden_layers": layers - 1 if drop_last_layer and layers == 24 else layers,
        "num_attention_heads": max(1, hidden // 64),
        "max_position_embeddings": shapes[f"{prefix}positional_embedding"][0],
        "hidden_act": "gelu",
        "projection_dim": projection[-1] if projection else hidden,
    }


def config_folder(architecture: CheckpointArchitecture, cache_dir: Path) -> Path:
    """The diffusers config folder for ``architecture`` (shipped configs with its shapes' values), made
    once under ``cache_dir`` and renamed into place whole."""
    from dts_util.models.families import VARIANTS, fill_config_folder
    from dts_util.models.store import publish_folder

    def fill(folder: Path) -> None:
        fill_config_folder(VARIANTS[architecture.variant], folder)
        for component, values in architecture.overrides.items():
            config_file = folder / component / ("scheduler_config.json" if component == "scheduler" else "config.json")
            config = json.loads(config_file.read_text())
            config.update(values)
            config_file.write_text(json.dumps(config, indent=2))

    return publish_folder(cache_dir / architecture.key, fill,
                          complete=lambda path: (path / "model_index.json").is_file())


# Prediction types as diffusers' schedulers name them, and as A1111 sidecars spell them.
PREDICTION_TYPES = {"epsilon": "epsilon", "eps": "epsilon", "v": "v_prediction", "v_prediction": "v_prediction"}


def prediction_type(path: Path, architecture: CheckpointArchitecture) -> tuple[str, str, str]:
    """(prediction type, where it came from, variant) for a checkpoint.

    In order: A1111's sidecar (``<stem>.yaml`` whose ``model.params.parameterization``
    is ``v``, or absent for epsilon), then dts-util's per-model setting
    (``<file>.dts.json`` with ``{"prediction_type": "v_prediction"}``), then the
    family default (SD2.x: v-prediction at 768; the others: epsilon). SD2.x with
    epsilon is the 512 base variant.
    """
    kind, source = _from_yaml(path.with_suffix(".yaml"))
    if kind is None:
        kind, source = _from_settings(path.with_name(path.name + ".dts.json"))
    if kind is None:
        kind = "v_prediction" if architecture.variant == "sd2_768" else "epsilon"
        source = f"{architecture.family} family default"
    variant = architecture.variant
    if architecture.family == "sd2":
        variant = "sd2_768" if kind == "v_prediction" else "sd2_512"
    return kind, source, variant


def _from_yaml(sidecar: Path) -> tuple[str | None, str]:
    if not sidecar.is_file():
        return None, ""
    import yaml

    try:
        document = yaml.safe_load(sidecar.read_text()) or {}
        params = document.get("model", {}).get("params", {}) or {}
    except (OSError, ValueError, AttributeError, yaml.YAMLError):
        raise ModelLoadError(f"{quote(sidecar.name)} (the checkpoint's config sidecar) is not a readable LDM "
                             "YAML config; fix or remove it") from None
    parameterization = str(params.get("parameterization", "eps"))
    if parameterization not in PREDICTION_TYPES:
        raise ModelLoadError(f"{quote(sidecar.name)}: parameterization {quote(parameterization, 40)} is not "
                             "'eps' or 'v'")
    return PREDICTION_TYPES[parameterization], f"sidecar {sidecar.name}"


def _from_settings(settings: Path) -> tuple[str | None, str]:
    if not settings.is_file():
        return None, ""
    try:
        value = json.loads(settings.read_text()).get("prediction_type")
    except (OSError, ValueError, AttributeError):
        raise ModelLoadError(f"{quote(settings.name)} is not a JSON object; fix or remove it") from None
    if value not in PREDICTION_TYPES:
        raise ModelLoadError(f"{quote(settings.name)}: prediction_type must be 'epsilon' or 'v_prediction'")
    return PREDICTION_TYPES[value], f"setting {settings.name}"
