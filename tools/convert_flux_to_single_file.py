#!/usr/bin/env python3
"""Convert a diffusers FLUX.1 folder to the single files ComfyUI users keep (or one all-in-one file).

    python tools/convert_flux_to_single_file.py <diffusers_folder> <out_folder> [--dtype fp32|bf16|fp8]
    python tools/convert_flux_to_single_file.py <diffusers_folder> <out_folder> --all-in-one

Writes, into ``out_folder``:

* ``flux1-dev.safetensors`` (or ``flux1-schnell``): the transformer in Black Forest Labs' key layout
  (``double_blocks.N.img_attn.qkv``, ``single_blocks.N.linear1``, ...), the inverse of diffusers'
  own conversion; ``--dtype fp8`` stores float8-e4m3fn weights as the fp8 releases do;
* ``clip_l.safetensors`` and ``t5xxl_fp16.safetensors``: the text encoders in the Hugging Face
  layout ComfyUI's files use;
* ``ae.safetensors``: the VAE in the LDM layout of BFL's ``ae.safetensors``;
* ``tokenizer_2/``: T5's tokenizer, which the single T5 file does not carry.

``--all-in-one`` writes one ``flux1-dev-all-in-one.safetensors`` with all four under ComfyUI's
checkpoint prefixes instead (plus ``tokenizer_2/``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from convert_to_single_file import _standalone, convert_vae  # noqa: E402 - a sibling tool

from dts_util.families.flux import (BFL_DOUBLE, BFL_DOUBLE_NORMS, BFL_FINAL_MODULATION, BFL_TOP,  # noqa: E402
                                    move_parameters, swap_halves)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp8": torch.float8_e4m3fn}
ALL_IN_ONE = {"transformer": "model.diffusion_model.", "text_encoder": "text_encoders.clip_l.transformer.",
              "text_encoder_2": "text_encoders.t5xxl.transformer.", "vae": "first_stage_model."}


def convert_transformer(sd: dict[str, torch.Tensor], double: int, single: int) -> dict[str, torch.Tensor]:
    """A diffusers ``FluxTransformer2DModel`` state dict in Black Forest Labs' key layout: the inverse of the
    name tables dts-util loads such files with."""
    sd, out = dict(sd), {}

    def move(source: str, target: str) -> None:
        move_parameters(sd, out, source, target)

    for source, target in BFL_TOP.items():
        move(source, target)
    for suffix in ("weight", "bias"):
        out[f"{BFL_FINAL_MODULATION[1]}.{suffix}"] = swap_halves(sd.pop(f"{BFL_FINAL_MODULATION[0]}.{suffix}"))
    for i in range(double):
        src, dst = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        for source, target in BFL_DOUBLE.items():
            move(src + source, dst + target)
        for source, target in BFL_DOUBLE_NORMS.items():
            out[f"{dst}{target}.scale"] = sd.pop(f"{src}{source}.weight")
        for suffix in ("weight", "bias"):
            out[f"{dst}img_attn.qkv.{suffix}"] = torch.cat([sd.pop(f"{src}attn.{n}.{suffix}")
                                                            for n in ("to_q", "to_k", "to_v")])
            out[f"{dst}txt_attn.qkv.{suffix}"] = torch.cat([sd.pop(f"{src}attn.{n}.{suffix}")
                                                            for n in ("add_q_proj", "add_k_proj", "add_v_proj")])
    for i in range(single):
        src, dst = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        move(f"{src}norm.linear", f"{dst}modulation.lin")
        move(f"{src}proj_out", f"{dst}linear2")
        out[f"{dst}norm.query_norm.scale"] = sd.pop(f"{src}attn.norm_q.weight")
        out[f"{dst}norm.key_norm.scale"] = sd.pop(f"{src}attn.norm_k.weight")
        for suffix in ("weight", "bias"):
            out[f"{dst}linear1.{suffix}"] = torch.cat([sd.pop(f"{src}attn.{n}.{suffix}") for n in
                                                       ("to_q", "to_k", "to_v")] + [sd.pop(f"{src}proj_mlp.{suffix}")])
    if sd:
        raise ValueError(f"unconverted transformer tensors: {sorted(sd)[:5]}")
    return out


def _clip_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """CLIP-L in the HF layout ComfyUI's clip_l.safetensors uses (``text_model.`` names)."""
    sd = module.state_dict()
    return {key if key.startswith("text_model.") else f"text_model.{key}": value for key, value in sd.items()
            if not key.endswith("position_ids")}


def _t5_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """T5's encoder as ComfyUI's t5xxl files hold it: the shared embedding once, no tied copy."""
    return {key: value for key, value in module.state_dict().items() if key != "encoder.embed_tokens.weight"}


def convert(folder: Path, dtype: str = "fp32") -> tuple[dict[str, dict[str, torch.Tensor]], bool]:
    """Every component's single-file state dict, and whether the model is [dev] (guidance-distilled)."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5EncoderModel

    transformer = FluxTransformer2DModel.from_pretrained(folder, subfolder="transformer")
    config = transformer.config
    states = {"transformer": convert_transformer(transformer.state_dict(), config.num_layers,
                                                 config.num_single_layers),
              "text_encoder": _clip_state(CLIPTextModel.from_pretrained(folder, subfolder="text_encoder")),
              "text_encoder_2": _t5_state(T5EncoderModel.from_pretrained(folder, subfolder="text_encoder_2")),
              "vae": convert_vae(AutoencoderKL.from_pretrained(folder, subfolder="vae").state_dict())}
    states["transformer"] = _standalone(states["transformer"], DTYPES[dtype])
    for part in ("text_encoder", "text_encoder_2", "vae"):
        states[part] = _standalone(states[part], torch.float32 if dtype == "fp32" else torch.float16)
    return states, bool(config.guidance_embeds)


def write_comfy_files(folder: Path, out: Path, dtype: str = "fp32", all_in_one: bool = False) -> dict[str, Path]:
    """Write the files (see the module's help) and return their paths by component."""
    from safetensors.torch import save_file

    states, dev = convert(folder, dtype)
    out.mkdir(parents=True, exist_ok=True)
    stem = "flux1-dev" if dev else "flux1-schnell"
    shutil.copytree(folder / "tokenizer_2", out / "tokenizer_2", dirs_exist_ok=True)
    if all_in_one:
        merged = {ALL_IN_ONE[part] + key: value for part, state in states.items() for key, value in state.items()}
        path = out / f"{stem}-all-in-one.safetensors"
        save_file(merged, str(path))
        return {part: path for part in states}
    names = {"transformer": f"{stem}.safetensors", "text_encoder": "clip_l.safetensors",
             "text_encoder_2": "t5xxl_fp16.safetensors", "vae": "ae.safetensors"}
    paths = {}
    for part, state in states.items():
        paths[part] = out / names[part]
        save_file(state, str(paths[part]))
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="a diffusers FLUX.1 folder")
    parser.add_argument("out", type=Path, help="the folder to write the files into")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="fp32", help="the transformer's weights")
    parser.add_argument("--all-in-one", action="store_true", help="one file with all four components")
    args = parser.parse_args(argv)
    paths = write_comfy_files(args.folder, args.out, args.dtype, args.all_in_one)
    print(json.dumps({part: str(path) for part, path in paths.items()}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
