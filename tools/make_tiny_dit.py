"""Make a tiny Z-Image or FLUX.2 [klein] model with seeded random weights (diffusers layout, or ComfyUI's files).

For trying these families without downloading 20 GB, and for the tests:

    python tools/make_tiny_dit.py zimage models/tiny-zimage-turbo
    python tools/make_tiny_dit.py zimage --base models/tiny-zimage-base            # CFG, shift 6
    python tools/make_tiny_dit.py zimage --layout comfy checkpoints/tiny-zimage     # transformer + qwen_3 + ae
    python tools/make_tiny_dit.py klein models/tiny-klein-4b
    python tools/make_tiny_dit.py klein --9b --base models/tiny-klein-9b-base
    python tools/make_tiny_dit.py klein --layout comfy checkpoints/tiny-klein      # transformer + qwen_3 + vae

Every part has the real architecture at a toy width: the family's transformer, a Qwen3 text encoder over
a byte-level BPE vocabulary built here with a Qwen3-style chat template (the real vocabulary is not on
PyPI), and the family's VAE (FLUX.1's 16-channel one for Z-Image, FLUX.2's 32-channel one with its batch
norm for klein). klein's Qwen3 has 28 layers, because the pipeline reads layers 9, 18 and 27; "4B" and "9B"
are the real models' depths (5 + 20 and 8 + 24 blocks) at a toy width. Its images are noise.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

SEED = 2468
QWEN_WIDTH = 32
WORDS = ("the", "cat", "red", "blue", "house", "on", "a", "photo", "of", "dog", "tree", "sky")
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")
# Qwen3's chat template for what the pipelines send (one user message, a generation prompt, thinking on or off).
CHAT_TEMPLATE = (
    "{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}{%- endif %}")
# FLUX.2 [klein]'s depths (double, single blocks) and the Qwen3 layers its pipeline reads.
KLEIN_DEPTHS = {"4b": (5, 20), "9b": (8, 24), "shallow": (1, 2)}  # shallow: quick engine builds in tests
KLEIN_QWEN_LAYERS = 28


def qwen_tokenizer():
    """A byte-level BPE tokenizer with Qwen's special tokens and a Qwen3-style chat template, built offline."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import Qwen2TokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(ByteLevel.alphabet()))}
    merges = []
    for word in WORDS:
        merged = word[0]
        for ch in word[1:]:
            merges.append((merged, ch))
            merged += ch
            vocab.setdefault(merged, len(vocab))
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    tokenizer = Qwen2TokenizerFast(tokenizer_object=backend, pad_token="<|endoftext|>", eos_token="<|im_end|>",
                                   unk_token=None, bos_token=None, model_max_length=32768)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _qwen3_config(vocab_size: int, layers: int):
    from transformers import Qwen3Config

    return Qwen3Config(vocab_size=vocab_size, hidden_size=QWEN_WIDTH, intermediate_size=64, num_hidden_layers=layers,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=1024,
                       rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True)


def _flux_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(32, 32, 64, 64),
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         layers_per_block=1, norm_num_groups=32, sample_size=64, scaling_factor=0.3611,
                         shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False, force_upcast=True)


def zimage_pipeline(base: bool = False):
    """A tiny ZImagePipeline, seeded: Turbo's scheduler (shift 3) or the base model's (shift 6)."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Model

    torch.manual_seed(SEED)
    transformer = ZImageTransformer2DModel(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=32,
                                           n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=2,
                                           cap_feat_dim=QWEN_WIDTH, axes_dims=[4, 6, 6], axes_lens=[1024, 64, 64])
    tokenizer = qwen_tokenizer()
    text_encoder = Qwen3Model(_qwen3_config(len(tokenizer), 3))
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=6.0 if base else 3.0,
                                                use_dynamic_shifting=False)
    return ZImagePipeline(scheduler=scheduler, vae=_flux_vae(), text_encoder=text_encoder, tokenizer=tokenizer,
                          transformer=transformer)


def klein_pipeline(size: str = "4b", base: bool = False):
    """A tiny Flux2KleinPipeline, seeded, at klein 4B's or 9B's depth; step-distilled unless ``base``."""
    import torch
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, \
        Flux2Transformer2DModel
    from transformers import Qwen3ForCausalLM

    torch.manual_seed(SEED)
    double, single = KLEIN_DEPTHS[size]
    transformer = Flux2Transformer2DModel(patch_size=1, in_channels=128, out_channels=None, num_layers=double,
                                          num_single_layers=single, attention_head_dim=16, num_attention_heads=2,
                                          joint_attention_dim=3 * QWEN_WIDTH, timestep_guidance_channels=32,
                                          mlp_ratio=2.0, axes_dims_rope=(4, 4, 4, 4), rope_theta=2000,
                                          guidance_embeds=False)
    vae = AutoencoderKLFlux2(in_channels=3, out_channels=3, latent_channels=32, block_out_channels=(32, 32, 64, 64),
                             layers_per_block=1, norm_num_groups=32, sample_size=64, use_quant_conv=True,
                             use_post_quant_conv=True)
    with torch.no_grad():  # the published VAE's batch norm holds real latent statistics, not 0 and 1
        vae.bn.running_mean.copy_(torch.randn(vae.bn.running_mean.shape) * 0.1)
        vae.bn.running_var.copy_(torch.rand(vae.bn.running_var.shape) + 0.5)
    tokenizer = qwen_tokenizer()
    text_encoder = Qwen3ForCausalLM(_qwen3_config(len(tokenizer), KLEIN_QWEN_LAYERS))
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                                base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                                max_image_seq_len=4096, time_shift_type="exponential")
    return Flux2KleinPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                              transformer=transformer, is_distilled=not base)


def build(family: str, folder: Path, base: bool = False, size: str = "4b") -> Path:
    """Save a tiny ``family`` ("zimage" or "klein") pipeline in the diffusers layout into ``folder``."""
    pipeline = zimage_pipeline(base) if family == "zimage" else klein_pipeline(size, base)
    pipeline.save_pretrained(folder, safe_serialization=True)
    return folder


def zimage_comfy_files(diffusers_folder: Path, out: Path) -> dict[str, Path]:
    """A Z-Image diffusers folder as ComfyUI's split files: the transformer in the original key layout
    (``z_image_turbo_bf16.safetensors``), ``qwen_3_4b.safetensors`` and FLUX's ``ae.safetensors``, plus the
    Qwen tokenizer folder the real text encoder file does not carry."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from convert_to_single_file import _standalone, convert_vae

    out.mkdir(parents=True, exist_ok=True)
    transformer = _zimage_to_original(load_file(str(diffusers_folder / "transformer" /
                                                    "diffusion_pytorch_model.safetensors")))
    files = {"transformer": out / "z_image_turbo_bf16.safetensors", "text_encoder": out / "qwen_3_4b.safetensors",
             "vae": out / "ae.safetensors"}
    save_file(_standalone(transformer, torch.float32), str(files["transformer"]))
    encoder = load_file(str(diffusers_folder / "text_encoder" / "model.safetensors"))
    save_file({f"model.{k}" if not k.startswith("model.") else k: v for k, v in encoder.items()},
              str(files["text_encoder"]))
    vae = load_file(str(diffusers_folder / "vae" / "diffusion_pytorch_model.safetensors"))
    save_file(_standalone(convert_vae(vae), torch.float32), str(files["vae"]))
    shutil.copytree(diffusers_folder / "tokenizer", out / "qwen_tokenizer")
    return files


def _zimage_to_original(state: dict) -> dict:
    """diffusers' Z-Image transformer names -> the original release's (the inverse of diffusers' single-file
    converter: fused qkv, ``final_layer.`` and ``x_embedder.`` without the patch-size key)."""
    import torch

    out = {}
    for key in sorted(state):
        if ".attention.to_q.weight" in key:
            base = key.replace(".attention.to_q.weight", ".attention.")
            out[base + "qkv.weight"] = torch.cat([state[base + f"to_{p}.weight"] for p in "qkv"])
            continue
        if ".attention.to_k.weight" in key or ".attention.to_v.weight" in key:
            continue
        new = key.replace("all_final_layer.2-1.", "final_layer.").replace("all_x_embedder.2-1.", "x_embedder.")
        new = new.replace(".attention.to_out.0.", ".attention.out.").replace(".attention.norm_k.", ".attention.k_norm.")
        out[new.replace(".attention.norm_q.", ".attention.q_norm.")] = state[key].contiguous()
    return out


def klein_comfy_files(diffusers_folder: Path, out: Path) -> dict[str, Path]:
    """A klein diffusers folder as ComfyUI's split files: the transformer in Black Forest Labs' layout
    (``flux-2-klein-4b.safetensors``), ``qwen_3_4b.safetensors`` and ``flux2-vae.safetensors`` in the original
    VAE layout, plus the Qwen tokenizer folder the text encoder file does not carry."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from convert_to_single_file import _standalone, convert_vae

    out.mkdir(parents=True, exist_ok=True)
    files = {"transformer": out / "flux-2-klein-4b.safetensors", "text_encoder": out / "qwen_3_4b.safetensors",
             "vae": out / "flux2-vae.safetensors"}
    transformer = load_file(str(diffusers_folder / "transformer" / "diffusion_pytorch_model.safetensors"))
    save_file(_standalone(_klein_to_bfl(transformer), torch.float32), str(files["transformer"]))
    encoder = load_file(str(diffusers_folder / "text_encoder" / "model.safetensors"))
    save_file({k: v for k, v in encoder.items() if not k.startswith("lm_head.")}, str(files["text_encoder"]))
    vae = load_file(str(diffusers_folder / "vae" / "diffusion_pytorch_model.safetensors"))
    original = convert_vae({k: v for k, v in vae.items() if not k.startswith("bn.")})
    for source, target in (("quant_conv.", "encoder.quant_conv."), ("post_quant_conv.", "decoder.post_quant_conv.")):
        for key in [k for k in original if k.startswith(source)]:
            original[target + key[len(source):]] = original.pop(key)
    original.update({k: v for k, v in vae.items() if k in ("bn.running_mean", "bn.running_var")})
    save_file(_standalone(original, torch.float32), str(files["vae"]))
    shutil.copytree(diffusers_folder / "tokenizer", out / "qwen_tokenizer")
    return files


# diffusers' Flux2Transformer2DModel names -> Black Forest Labs' (the inverse of diffusers' FLUX.2 converter).
KLEIN_TOP = {"x_embedder": "img_in", "context_embedder": "txt_in",
             "time_guidance_embed.timestep_embedder.linear_1": "time_in.in_layer",
             "time_guidance_embed.timestep_embedder.linear_2": "time_in.out_layer",
             "time_guidance_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
             "time_guidance_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
             "double_stream_modulation_img.linear": "double_stream_modulation_img.lin",
             "double_stream_modulation_txt.linear": "double_stream_modulation_txt.lin",
             "single_stream_modulation.linear": "single_stream_modulation.lin", "proj_out": "final_layer.linear"}
KLEIN_DOUBLE = {"attn.norm_q": "img_attn.norm.query_norm", "attn.norm_k": "img_attn.norm.key_norm",
                "attn.to_out.0": "img_attn.proj", "ff.linear_in": "img_mlp.0", "ff.linear_out": "img_mlp.2",
                "attn.norm_added_q": "txt_attn.norm.query_norm", "attn.norm_added_k": "txt_attn.norm.key_norm",
                "attn.to_add_out": "txt_attn.proj", "ff_context.linear_in": "txt_mlp.0",
                "ff_context.linear_out": "txt_mlp.2"}
KLEIN_SINGLE = {"attn.to_qkv_mlp_proj": "linear1", "attn.to_out": "linear2", "attn.norm_q": "norm.query_norm",
                "attn.norm_k": "norm.key_norm"}


def _klein_to_bfl(state: dict) -> dict:
    import torch

    out = {}
    for key, value in state.items():
        name, _, suffix = key.rpartition(".")
        if name in KLEIN_TOP:
            out[f"{KLEIN_TOP[name]}.{suffix}"] = value
        elif name == "norm_out.linear":  # BFL keeps (shift, scale), diffusers (scale, shift)
            first, second = value.chunk(2, dim=0)
            out[f"final_layer.adaLN_modulation.1.{suffix}"] = torch.cat([second, first])
        elif key.startswith("transformer_blocks."):
            index, inner = name.split(".", 2)[1], name.split(".", 2)[2]
            if inner in ("attn.to_q", "attn.add_q_proj"):
                side, names = ("img", ("to_q", "to_k", "to_v")) if inner == "attn.to_q" else \
                    ("txt", ("add_q_proj", "add_k_proj", "add_v_proj"))
                out[f"double_blocks.{index}.{side}_attn.qkv.{suffix}"] = torch.cat(
                    [state[f"transformer_blocks.{index}.attn.{n}.{suffix}"] for n in names])
            elif inner in KLEIN_DOUBLE:
                target = KLEIN_DOUBLE[inner]
                out[f"double_blocks.{index}.{target}.{'scale' if 'norm' in target else suffix}"] = value
        elif key.startswith("single_transformer_blocks."):
            index, inner = name.split(".", 2)[1], name.split(".", 2)[2]
            target = KLEIN_SINGLE[inner]
            out[f"single_blocks.{index}.{target}.{'scale' if 'norm' in target else suffix}"] = value
    return {k: v.contiguous() for k, v in out.items()}


def main(argv: list[str] | None = None) -> None:
    import argparse
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("family", choices=("zimage", "klein"))
    parser.add_argument("out", type=Path, help="the folder to write")
    parser.add_argument("--layout", choices=("diffusers", "comfy"), default="diffusers",
                        help="comfy: ComfyUI's split files")
    parser.add_argument("--base", action="store_true", help="the undistilled base model (CFG, more steps)")
    parser.add_argument("--9b", dest="size", action="store_const", const="9b", default="4b",
                        help="klein: 9B's depth (default 4B's)")
    args = parser.parse_args(argv)
    if args.layout == "diffusers":
        build(args.family, args.out, args.base, args.size)
    else:
        with tempfile.TemporaryDirectory() as folder:
            source = build(args.family, Path(folder) / args.family, args.base, args.size)
            files = (zimage_comfy_files if args.family == "zimage" else klein_comfy_files)(source, args.out)
            if args.base:  # a single file cannot say it is the base model: its sidecar does
                sidecar = files["transformer"].with_name(files["transformer"].name + ".dts.json")
                sidecar.write_text(json.dumps({"variant": "base"}))
    print(f"wrote {args.out} (tiny {args.family}, {args.layout} layout, random weights)")


if __name__ == "__main__":
    main()
