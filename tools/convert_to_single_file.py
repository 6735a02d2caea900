#!/usr/bin/env python3
"""Convert a diffusers-layout Stable Diffusion folder to one original-layout checkpoint.

    python tools/convert_to_single_file.py <diffusers_folder> <out.safetensors|out.ckpt> [--dtype fp32|fp16|bf16]

The output uses the original Stable Diffusion (LDM / A1111 / Civitai) key names, the
ones diffusers' ``from_single_file`` reads back:

* SD1.x: UNet ``model.diffusion_model.``, VAE ``first_stage_model.``, CLIP-L text
  encoder (HF layout) ``cond_stage_model.transformer.text_model.``.
* SD2.x: as SD1.x, but the OpenCLIP text encoder in OpenCLIP layout under
  ``cond_stage_model.model.`` (``transformer.resblocks.N...``, packed q/k/v).
* SDXL base: UNet and VAE as above; ``text_encoder`` (CLIP-L, HF layout) under
  ``conditioner.embedders.0.transformer.text_model.``; ``text_encoder_2`` (OpenCLIP
  bigG) in OpenCLIP layout under ``conditioner.embedders.1.model.``.

The weights are read through diffusers/transformers ``from_pretrained`` and the key
names taken from each module's actual ``state_dict()``: transformers >= 5.6 dropped
the ``text_model.`` prefix from ``CLIPTextModel``'s keys, so names are normalised
here instead of being assumed.

``.safetensors`` is written with ``safetensors.torch.save_file``; ``.ckpt`` as
``torch.save({"state_dict": sd})`` holding plain tensors only (it loads with
``torch.load(..., weights_only=True)``).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Iterable

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD1_CLIP_PREFIX = "cond_stage_model.transformer.text_model."
SD2_OPENCLIP_PREFIX = "cond_stage_model.model."
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer.text_model."
SDXL_OPENCLIP_PREFIX = "conditioner.embedders.1.model."

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# Sub-module names inside a ResNet block: diffusers -> LDM UNet.
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
    # SDXL's text_time embedding and SD's projection/timestep class embedding share LDM's label_emb.
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "class_embedding.linear_1": "label_emb.0.0",
    "class_embedding.linear_2": "label_emb.0.2",
    "class_embedding": "label_emb",  # nn.Embedding (num_class_embeds), e.g. the x4 upscaler
}
_VAE_TOP = {
    "conv_in": "conv_in",
    "conv_out": "conv_out",
    "conv_norm_out": "norm_out",
}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
# HF CLIP encoder layer -> OpenCLIP resblock (q/k/v projections are handled separately).
_OPENCLIP_LAYER = {
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}


# --------------------------------------------------------------------------- helpers


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def _split_param(key: str) -> tuple[str, str]:
    """``a.b.weight`` -> (``a.b``, ``weight``)."""
    module, _, param = key.rpartition(".")
    return module, param


def _indices(keys: Iterable[str], pattern: str) -> list[int]:
    """Sorted distinct integers captured by ``pattern`` (one group) at the start of the keys."""
    rx = re.compile(pattern)
    found = {int(m.group(1)) for k in keys if (m := rx.match(k))}
    return sorted(found)


def _take(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Pop every entry under ``prefix`` from ``sd``; return them with the prefix removed."""
    out = {k[len(prefix):]: sd.pop(k) for k in [k for k in sd if k.startswith(prefix)]}
    return out


def _fail_on_leftovers(component: str, leftovers: dict[str, torch.Tensor]) -> None:
    if leftovers:
        names = ", ".join(sorted(leftovers)[:10])
        more = "" if len(leftovers) <= 10 else f" (and {len(leftovers) - 10} more)"
        raise ValueError(f"{component}: no original-layout name known for {names}{more}")


# --------------------------------------------------------------------------- UNet


def _unet_resnet(src: dict[str, torch.Tensor], dst_prefix: str, out: dict[str, torch.Tensor]) -> None:
    for key, value in src.items():
        module, _, rest = key.partition(".")
        if module not in _UNET_RESNET:
            raise ValueError(f"unet: unexpected ResNet parameter {key!r}")
        out[f"{dst_prefix}.{_UNET_RESNET[module]}.{rest}"] = value


def _unet_copy(src: dict[str, torch.Tensor], dst_prefix: str, out: dict[str, torch.Tensor]) -> None:
    """Transformer (attention) blocks keep their names in the LDM layout."""
    for key, value in src.items():
        out[f"{dst_prefix}.{key}"] = value


def convert_unet(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Diffusers ``UNet2DConditionModel`` state dict -> LDM names (without ``model.diffusion_model.``).

    Block counts are read from the keys, so any ``block_out_channels`` length and any
    ``layers_per_block`` (even per block) works.
    """
    sd = dict(sd)
    out: dict[str, torch.Tensor] = {}

    for key in list(sd):
        module, param = _split_param(key)
        if module in _UNET_TOP:
            out[f"{_UNET_TOP[module]}.{param}"] = sd.pop(key)

    # Down blocks: input_blocks.0 is conv_in; then one index per resnet(+attention), one per downsampler.
    index = 1
    for b in _indices(sd, r"down_blocks\.(\d+)\."):
        block = _take(sd, f"down_blocks.{b}.")
        for j in _indices(block, r"resnets\.(\d+)\."):
            _unet_resnet(_take(block, f"resnets.{j}."), f"input_blocks.{index}.0", out)
            _unet_copy(_take(block, f"attentions.{j}."), f"input_blocks.{index}.1", out)
            index += 1
        downsampler = _take(block, "downsamplers.0.conv.")
        if downsampler:
            _unet_copy(downsampler, f"input_blocks.{index}.0.op", out)
            index += 1
        _fail_on_leftovers(f"unet down_blocks.{b}", block)

    # Mid block: resnet, attention, resnet, ... interleaved as middle_block.0, .1, .2, ...
    mid = _take(sd, "mid_block.")
    resnets = _indices(mid, r"resnets\.(\d+)\.")
    index = 0
    for j in resnets:
        _unet_resnet(_take(mid, f"resnets.{j}."), f"middle_block.{index}", out)
        index += 1
        attention = _take(mid, f"attentions.{j}.")
        if attention:
            _unet_copy(attention, f"middle_block.{index}", out)
            index += 1
    _fail_on_leftovers("unet mid_block", mid)

    # Up blocks: output_blocks.N.0 resnet, .1 attention, then the upsampler as the next sub-index.
    index = 0
    for b in _indices(sd, r"up_blocks\.(\d+)\."):
        block = _take(sd, f"up_blocks.{b}.")
        layers = _indices(block, r"resnets\.(\d+)\.")
        for j in layers:
            _unet_resnet(_take(block, f"resnets.{j}."), f"output_blocks.{index}.0", out)
            attention = _take(block, f"attentions.{j}.")
            _unet_copy(attention, f"output_blocks.{index}.1", out)
            if j == layers[-1]:
                upsampler = _take(block, "upsamplers.0.conv.")
                if upsampler:
                    _unet_copy(upsampler, f"output_blocks.{index}.{2 if attention else 1}.conv", out)
            index += 1
        _fail_on_leftovers(f"unet up_blocks.{b}", block)

    _fail_on_leftovers("unet", sd)
    return out


# --------------------------------------------------------------------------- VAE


def _vae_resnet(src: dict[str, torch.Tensor], dst_prefix: str, out: dict[str, torch.Tensor]) -> None:
    for key, value in src.items():
        if key.startswith("conv_shortcut."):
            key = "nin_shortcut." + key[len("conv_shortcut."):]
        out[f"{dst_prefix}.{key}"] = value


def _vae_half(sd: dict[str, torch.Tensor], side: str, out: dict[str, torch.Tensor]) -> None:
    """One of ``encoder``/``decoder`` (already stripped of its prefix) -> ``first_stage_model.{side}.``."""
    for key in list(sd):
        module, param = _split_param(key)
        if module in _VAE_TOP:
            out[f"{side}.{_VAE_TOP[module]}.{param}"] = sd.pop(key)

    if side == "encoder":
        for i in _indices(sd, r"down_blocks\.(\d+)\."):
            block = _take(sd, f"down_blocks.{i}.")
            for j in _indices(block, r"resnets\.(\d+)\."):
                _vae_resnet(_take(block, f"resnets.{j}."), f"encoder.down.{i}.block.{j}", out)
            _unet_copy(_take(block, "downsamplers.0.conv."), f"encoder.down.{i}.downsample.conv", out)
            _fail_on_leftovers(f"vae encoder.down_blocks.{i}", block)
    else:
        ups = _indices(sd, r"up_blocks\.(\d+)\.")
        for i in ups:
            ldm = len(ups) - 1 - i  # LDM numbers the decoder's blocks from the lowest resolution up
            block = _take(sd, f"up_blocks.{i}.")
            for j in _indices(block, r"resnets\.(\d+)\."):
                _vae_resnet(_take(block, f"resnets.{j}."), f"decoder.up.{ldm}.block.{j}", out)
            _unet_copy(_take(block, "upsamplers.0.conv."), f"decoder.up.{ldm}.upsample.conv", out)
            _fail_on_leftovers(f"vae decoder.up_blocks.{i}", block)

    mid = _take(sd, "mid_block.")
    for j in _indices(mid, r"resnets\.(\d+)\."):
        _vae_resnet(_take(mid, f"resnets.{j}."), f"{side}.mid.block_{j + 1}", out)
    attention = _take(mid, "attentions.0.")
    for key, value in attention.items():
        module, param = _split_param(key)
        if module not in _VAE_ATTN:
            raise ValueError(f"vae: unexpected mid attention parameter {key!r}")
        if param == "weight" and module != "group_norm" and value.ndim == 2:
            value = value.reshape(*value.shape, 1, 1)  # Linear [C, C] -> Conv2d 1x1 [C, C, 1, 1]
        out[f"{side}.mid.attn_1.{_VAE_ATTN[module]}.{param}"] = value
    _fail_on_leftovers(f"vae {side}.mid_block", mid)
    _fail_on_leftovers(f"vae {side}", sd)


def convert_vae(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Diffusers ``AutoencoderKL`` state dict -> LDM names (without ``first_stage_model.``)."""
    sd = dict(sd)
    out: dict[str, torch.Tensor] = {}
    for name in ("quant_conv", "post_quant_conv"):
        for key, value in _take(sd, f"{name}.").items():
            out[f"{name}.{key}"] = value
    _vae_half(_take(sd, "encoder."), "encoder", out)
    _vae_half(_take(sd, "decoder."), "decoder", out)
    _fail_on_leftovers("vae", sd)
    return out


# --------------------------------------------------------------------------- text encoders


def _strip_text_model(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Normalise a CLIP state dict to keys without ``text_model.`` (either transformers layout)."""
    return {k.removeprefix("text_model."): v for k, v in sd.items()}


def convert_clip(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF CLIP text model -> the HF layout under ``text_model.`` that A1111 checkpoints use.

    Returns keys relative to ``text_model.`` (``embeddings...``, ``encoder.layers.N...``,
    ``final_layer_norm...``). A projection, if the model has one, is not part of the
    SD1 / SDXL CLIP-L embedder and is rejected.
    """
    sd = _strip_text_model(sd)
    sd.pop("embeddings.position_ids", None)  # a non-persistent buffer in current transformers
    bad = [k for k in sd if not k.startswith(("embeddings.", "encoder.layers.", "final_layer_norm."))]
    if bad:
        raise ValueError(f"CLIP-L text encoder: unexpected parameters {bad[:10]}")
    return dict(sd)


def convert_openclip(sd: dict[str, torch.Tensor], projection: torch.Tensor) -> dict[str, torch.Tensor]:
    """HF CLIP text model -> OpenCLIP names (without the ``...model.`` prefix).

    ``projection`` is written as ``text_projection`` and must be [hidden, projection_dim]
    (OpenCLIP multiplies ``x @ text_projection``: the transpose of HF's Linear weight).
    """
    sd = _strip_text_model(sd)
    sd.pop("embeddings.position_ids", None)
    sd.pop("text_projection.weight", None)
    out: dict[str, torch.Tensor] = {
        "token_embedding.weight": sd.pop("embeddings.token_embedding.weight"),
        "positional_embedding": sd.pop("embeddings.position_embedding.weight"),
        "ln_final.weight": sd.pop("final_layer_norm.weight"),
        "ln_final.bias": sd.pop("final_layer_norm.bias"),
        "text_projection": projection,
    }
    for n in _indices(sd, r"encoder\.layers\.(\d+)\."):
        layer = _take(sd, f"encoder.layers.{n}.")
        dst = f"transformer.resblocks.{n}"
        for param in ("weight", "bias"):
            qkv = [layer.pop(f"self_attn.{p}_proj.{param}") for p in ("q", "k", "v")]
            out[f"{dst}.attn.in_proj_{param}"] = torch.cat(qkv, dim=0)
        for key, value in layer.items():
            module, param = _split_param(key)
            if module not in _OPENCLIP_LAYER:
                raise ValueError(f"OpenCLIP text encoder: unexpected parameter encoder.layers.{n}.{key}")
            out[f"{dst}.{_OPENCLIP_LAYER[module]}.{param}"] = value
    _fail_on_leftovers("OpenCLIP text encoder", sd)
    return out


# --------------------------------------------------------------------------- loading


_WEIGHT_NAMES = ("diffusion_pytorch_model", "model", "pytorch_model")


def _variant(sub: Path) -> str | None:
    """``fp16`` when the folder holds only ``*.fp16.*`` weight files (a common hub layout)."""
    names = [p.name for p in sub.iterdir()] if sub.is_dir() else []
    plain = [n for n in names if n.startswith(_WEIGHT_NAMES) and re.fullmatch(
        r"[a-z_]+(-\d+-of-\d+)?\.(safetensors|bin)|[a-z_]+\.(safetensors|bin)\.index\.json", n)]
    if not plain and any(".fp16." in n for n in names):
        return "fp16"
    return None


def _family(folder: Path, index: dict) -> str:
    if "text_encoder_2" in index or str(index.get("_class_name", "")).startswith("StableDiffusionXL"):
        if (index.get("text_encoder") or [None])[0] is None:
            raise ValueError("SDXL refiner-style pipelines (no text_encoder) are not supported")
        return "sdxl"
    text_config = _read_json(folder / "text_encoder" / "config.json")
    unet_config = _read_json(folder / "unet" / "config.json")
    cross = unet_config.get("cross_attention_dim")
    cross = cross[0] if isinstance(cross, (list, tuple)) else cross
    if text_config.get("hidden_act") == "gelu" or cross == 1024:
        return "sd2"
    return "sd1"


def _load_state_dict(folder: Path, index: dict, name: str, torch_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    library, class_name = index[name][:2]
    sub = folder / name
    variant = _variant(sub)
    if library == "transformers":
        import transformers

        cls = getattr(transformers, class_name)
        model = cls.from_pretrained(sub, dtype=torch_dtype, variant=variant, local_files_only=True)
    elif library == "diffusers":
        import diffusers

        cls = getattr(diffusers, class_name)
        model = cls.from_pretrained(sub, torch_dtype=torch_dtype, variant=variant, local_files_only=True)
    else:
        raise ValueError(f"{name}: unsupported library {library!r}")
    return model.state_dict()


def _prefixed(prefix: str, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in sd.items()}


def to_single_file_state_dict(folder: Path, dtype: str | None = None) -> dict[str, torch.Tensor]:
    """The whole pipeline at ``folder`` as one original-layout state dict.

    ``dtype`` (``fp32``/``fp16``/``bf16``) is the precision the components are loaded in;
    by default float32. The result may hold views of the loaded parameters.
    """
    folder = Path(folder)
    index = _read_json(folder / "model_index.json")
    family = _family(folder, index)
    torch_dtype = DTYPES[dtype or "fp32"]

    out: dict[str, torch.Tensor] = {}
    out.update(_prefixed(UNET_PREFIX, convert_unet(_load_state_dict(folder, index, "unet", torch_dtype))))
    out.update(_prefixed(VAE_PREFIX, convert_vae(_load_state_dict(folder, index, "vae", torch_dtype))))

    text = _load_state_dict(folder, index, "text_encoder", torch_dtype)
    if family == "sd1":
        out.update(_prefixed(SD1_CLIP_PREFIX, convert_clip(text)))
    elif family == "sd2":
        # SD2's pipeline never uses the projection, and diffusers' CLIPTextModel has none.
        # diffusers' loader skips cond_stage_model.model.text_projection for SD2 but reads its
        # shape[0] as the width to split in_proj into q/k/v, so it must be [hidden, projection].
        config = _read_json(folder / "text_encoder" / "config.json")
        hidden = text["embeddings.position_embedding.weight" if "embeddings.position_embedding.weight" in text
                      else "text_model.embeddings.position_embedding.weight"].shape[-1]
        projection = torch.eye(hidden, config.get("projection_dim") or hidden, dtype=torch_dtype)
        out.update(_prefixed(SD2_OPENCLIP_PREFIX, convert_openclip(text, projection)))
    else:
        out.update(_prefixed(SDXL_CLIP_PREFIX, convert_clip(text)))
        del text
        text_2 = _load_state_dict(folder, index, "text_encoder_2", torch_dtype)
        if "text_projection.weight" not in text_2:
            raise ValueError("SDXL text_encoder_2 has no text_projection (expected CLIPTextModelWithProjection)")
        projection = text_2["text_projection.weight"].T  # Linear [proj, hidden] -> OpenCLIP [hidden, proj]
        out.update(_prefixed(SDXL_OPENCLIP_PREFIX, convert_openclip(text_2, projection)))
    return out


# --------------------------------------------------------------------------- writing


def _standalone(sd: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Cast floating tensors; make every tensor contiguous and the sole owner of its storage."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, value in sd.items():
        tensor = value.detach()
        if tensor.is_floating_point() and tensor.dtype != dtype:
            tensor = tensor.to(dtype)
        tensor = tensor.contiguous()
        storage = tensor.untyped_storage()
        if storage.data_ptr() in seen or storage.nbytes() != tensor.numel() * tensor.element_size():
            tensor = tensor.clone()
            storage = tensor.untyped_storage()
        seen.add(storage.data_ptr())
        out[key] = tensor
    return out


def convert(folder: Path, out: Path, dtype: str = "fp32") -> None:
    """Write the pipeline at ``folder`` to ``out`` (``.safetensors`` or ``.ckpt``) in ``dtype``."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, not {dtype!r}")
    out = Path(out)
    suffix = out.suffix.lower()
    if suffix not in (".safetensors", ".ckpt"):
        raise ValueError(f"output must end in .safetensors or .ckpt: {out}")
    sd = _standalone(to_single_file_state_dict(Path(folder), dtype=dtype), DTYPES[dtype])
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    try:
        if suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(sd, str(tmp), metadata={"format": "pt"})
        else:
            torch.save({"state_dict": sd}, tmp)
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="diffusers pipeline folder (with model_index.json)")
    parser.add_argument("out", type=Path, help="output file, .safetensors or .ckpt")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    args = parser.parse_args(argv)
    if not (args.folder / "model_index.json").is_file():
        parser.error(f"{args.folder} has no model_index.json")
    if args.out.suffix.lower() not in (".safetensors", ".ckpt"):
        parser.error("the output must end in .safetensors or .ckpt")
    convert(args.folder, args.out, args.dtype)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
