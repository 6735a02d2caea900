"""Make a tiny Stable Diffusion checkpoint (SD1.x, SD2.x or SDXL) with seeded random weights.

For trying the single-file path without downloading a model, and for the tests:

    python tools/make_tiny_checkpoint.py --family sd1 checkpoints/tiny-sd1.safetensors
    python tools/make_tiny_checkpoint.py --family sd1 --inpainting checkpoints/tiny-sd1-inpainting.safetensors
    dts-util upload checkpoints/tiny-sd1.safetensors --as checkpoints/tiny-sd1.safetensors

The pipeline is built in the diffusers layout, then written as one file in the original
Stable Diffusion key layout by tools/convert_to_single_file.py. Its images are noise.

Hyperparameters that leave no trace in tensor shapes follow the families' published rules, as real
checkpoints do (``models/checkpoint.py``): 8 attention heads per block for SD1.x, one per 64 channels
for SD2.x/SDXL and for every text encoder, 32 group-norm groups, and the shipped scheduler and VAE
scaling factor of the family. The two SDXL text encoders have different widths, as the real ones do.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

from dts_util.models.clip_vocab import clip_vocabulary
from dts_util.models.families import config_folder

TOOL = Path(__file__).resolve().parent / "convert_to_single_file.py"
SEED = 1234


def converter():
    """tools/convert_to_single_file.py as a module."""
    if "convert_to_single_file" not in sys.modules:
        spec = importlib.util.spec_from_file_location("convert_to_single_file", TOOL)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    return sys.modules["convert_to_single_file"]


def _vae(scaling_factor: float):
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 32, 64, 64),
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         layers_per_block=1, norm_num_groups=32, sample_size=64, scaling_factor=scaling_factor)


def _text_encoder(hidden: int, act: str, projection: int | None = None):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=49408, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=2,
                            num_attention_heads=max(1, hidden // 64), max_position_embeddings=77, hidden_act=act,
                            bos_token_id=49406, eos_token_id=49407, pad_token_id=1,
                            projection_dim=projection or hidden)
    return CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)


def _tokenizer(pad_token: str):
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocabulary()
    return CLIPTokenizer(vocab=vocab, merges=[tuple(m.split()) for m in merges], model_max_length=77,
                         pad_token=pad_token)


def _scheduler(variant: str):
    import diffusers

    config = json.loads((config_folder(variant) / "scheduler" / "scheduler_config.json").read_text())
    return getattr(diffusers, config["_class_name"]).from_config(config)


def build(family: str, folder: Path, inpainting: bool = False) -> Path:
    """Save a tiny ``family`` ("sd1", "sd2", "sdxl") pipeline with seeded weights into ``folder``; with
    ``inpainting``, a dedicated inpainting model (a UNet of 9 input channels: latents, mask, masked image)."""
    import torch
    from diffusers import (StableDiffusionInpaintPipeline, StableDiffusionPipeline, StableDiffusionXLInpaintPipeline,
                           StableDiffusionXLPipeline, UNet2DConditionModel)

    torch.manual_seed(SEED)
    in_channels = 9 if inpainting else 4
    if family == "sdxl":
        unet = UNet2DConditionModel(
            sample_size=8, in_channels=in_channels, block_out_channels=(64, 128), layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(1, 2),
            transformer_layers_per_block=(1, 2), cross_attention_dim=64 + 128, use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=32 + 6 * 8, norm_num_groups=32)
        pipe = (StableDiffusionXLInpaintPipeline if inpainting else StableDiffusionXLPipeline)(
            vae=_vae(0.13025), text_encoder=_text_encoder(64, "quick_gelu"),
            text_encoder_2=_text_encoder(128, "gelu", projection=32), tokenizer=_tokenizer("<|endoftext|>"),
            tokenizer_2=_tokenizer("!"), unet=unet, scheduler=_scheduler("sdxl_base"))
    else:
        sd2 = family == "sd2"
        unet = UNet2DConditionModel(
            sample_size=8, in_channels=in_channels, block_out_channels=(64, 128) if sd2 else (32, 64), layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            attention_head_dim=(1, 2) if sd2 else 8, cross_attention_dim=64, use_linear_projection=sd2,
            norm_num_groups=32)
        pipe = (StableDiffusionInpaintPipeline if inpainting else StableDiffusionPipeline)(
            vae=_vae(0.18215), text_encoder=_text_encoder(64, "gelu" if sd2 else "quick_gelu"),
            tokenizer=_tokenizer("!" if sd2 else "<|endoftext|>"), unet=unet,
            scheduler=_scheduler("sd2_768" if sd2 else "sd15"), safety_checker=None, feature_extractor=None,
            requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    # The family's shipped scheduler config as it is (save_pretrained would add defaults such as
    # timestep_spacing, which other samplers built from the config read differently).
    variant = {"sd1": "sd15", "sd2": "sd2_768", "sdxl": "sdxl_base"}[family]
    shutil.copy(config_folder(variant) / "scheduler" / "scheduler_config.json",
                folder / "scheduler" / "scheduler_config.json")
    return folder


def single_file(folder: Path, out: Path, dtype: str = "fp32") -> Path:
    """``folder`` converted to one checkpoint file in the original SD layout (.safetensors or .ckpt)."""
    converter().convert(folder, out, dtype)
    return out


def main(argv: list[str] | None = None) -> None:
    import argparse
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="checkpoint to write (.safetensors or .ckpt)")
    parser.add_argument("--family", choices=("sd1", "sd2", "sdxl"), default="sd1")
    parser.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32")
    parser.add_argument("--inpainting", action="store_true", help="an inpainting model (9-channel UNet)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        single_file(build(args.family, Path(folder) / "pipeline", args.inpainting), args.out, args.dtype)
    kind = " inpainting" if args.inpainting else ""
    print(f"wrote {args.out} (tiny {args.family}{kind}, {args.dtype}, random weights)")


if __name__ == "__main__":
    main()
