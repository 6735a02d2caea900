"""Make a tiny FLUX.1 model with seeded random weights, in the diffusers layout or as ComfyUI's single files.

For trying FLUX serving without downloading 30 GB, and for the tests:

    python tools/make_tiny_flux.py models/tiny-flux                       # a diffusers folder
    python tools/make_tiny_flux.py --layout comfy checkpoints/tiny-flux   # flux1-dev.safetensors, clip_l, t5, ae
    python tools/make_tiny_flux.py --schnell models/tiny-flux-schnell     # no guidance embedding

Every part has the real architecture at a toy width: a FLUX transformer (double and single
blocks, 3-axis RoPE, a guidance embedding for [dev]), a CLIP text encoder over the real CLIP BPE
vocabulary, a T5 encoder over a small Unigram vocabulary built here (the real T5 SentencePiece
model is not on PyPI), and a 16-channel VAE with FLUX's scale and shift. Its images are noise.
Hyperparameters that leave no trace in tensor shapes follow FLUX.1's rules, as the single-file
loader assumes them (one CLIP head per 64 channels, RoPE axes of 1/8, 7/16, 7/16 of a head,
32 group-norm groups).
"""

from __future__ import annotations

import sys
from pathlib import Path

from dts_util.models.clip_vocab import clip_vocabulary

SEED = 4321
# Toy widths: the T5 and CLIP widths are what the transformer's joint attention and pooled projection read.
T5_WIDTH, CLIP_WIDTH = 32, 32
T5_WORDS = ("a photo of the an in on with and cat dog red blue green sky tree house city night day river "
            "mountain painting portrait woman man robot flower car street light dark snow sun moon forest").split()


def _transformer(schnell: bool):
    from diffusers import FluxTransformer2DModel

    # The RoPE axes split the head width as FLUX.1's do (16, 56, 56 of 128): 4, 14, 14 of 32.
    return FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                  attention_head_dim=32, num_attention_heads=2, joint_attention_dim=T5_WIDTH,
                                  pooled_projection_dim=CLIP_WIDTH, guidance_embeds=not schnell,
                                  axes_dims_rope=(4, 14, 14))


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(32, 32, 64, 64),
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         layers_per_block=1, norm_num_groups=32, sample_size=64, scaling_factor=0.3611,
                         shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False, force_upcast=True)


def _clip():
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    config = CLIPTextConfig(vocab_size=49408, hidden_size=CLIP_WIDTH, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=1, max_position_embeddings=77, hidden_act="quick_gelu",
                            bos_token_id=49406, eos_token_id=49407, pad_token_id=1, projection_dim=CLIP_WIDTH)
    vocab, merges = clip_vocabulary()
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[tuple(m.split()) for m in merges], model_max_length=77,
                              pad_token="<|endoftext|>")
    return CLIPTextModel(config), tokenizer


def t5_tokenizer():
    """A T5-style Unigram tokenizer (pad 0, eos 1, unk 2, ▁-prefixed pieces), built offline."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [(f"▁{word}", -float(i + 1)) for i, word in enumerate(T5_WORDS)]
    pieces += [("▁", -50.0)] + [(c, -60.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789.,!?'-"]
    backend = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    backend.normalizer = normalizers.Sequence([normalizers.Replace(" {2,}", " ")])
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                           special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                           extra_ids=0, model_max_length=512)


def _t5(vocab_size: int):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(vocab_size=vocab_size, d_model=T5_WIDTH, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                      relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", is_encoder_decoder=False,
                      decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    return T5EncoderModel(config)


def pipeline(schnell: bool = False):
    """The tiny FluxPipeline itself, seeded."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    torch.manual_seed(SEED)
    transformer, vae = _transformer(schnell), _vae()
    clip, clip_tokenizer = _clip()
    tokenizer_2 = t5_tokenizer()
    # FLUX.1's published scheduler: dev shifts by resolution, schnell uses a fixed shift of 1.
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=1.0 if schnell else 3.0, use_dynamic_shifting=not schnell, base_shift=0.5,
        max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
    return FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=clip_tokenizer,
                        text_encoder_2=_t5(len(tokenizer_2)), tokenizer_2=tokenizer_2, transformer=transformer)


def build(folder: Path, schnell: bool = False) -> Path:
    """Save a tiny FLUX.1 [dev] (or [schnell]) pipeline in the diffusers layout into ``folder``."""
    pipeline(schnell).save_pretrained(folder, safe_serialization=True)
    return folder


def comfy_files(diffusers_folder: Path, out: Path, dtype: str = "fp32", all_in_one: bool = False) -> dict[str, Path]:
    """The diffusers folder as the single files ComfyUI users keep: the transformer in Black Forest Labs'
    key layout (``flux1-dev.safetensors``), ``clip_l.safetensors``, ``t5xxl_fp16.safetensors`` and
    ``ae.safetensors`` (or one all-in-one file), plus the T5 tokenizer folder the real file does not carry."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from convert_flux_to_single_file import write_comfy_files

    return write_comfy_files(diffusers_folder, out, dtype, all_in_one)


def main(argv: list[str] | None = None) -> None:
    import argparse
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="the folder to write")
    parser.add_argument("--layout", choices=("diffusers", "comfy"), default="diffusers")
    parser.add_argument("--schnell", action="store_true", help="FLUX.1 [schnell]: no guidance embedding")
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp8"), default="fp32",
                        help="weights of the comfy layout's transformer")
    args = parser.parse_args(argv)
    if args.layout == "diffusers":
        build(args.out, args.schnell)
    else:
        with tempfile.TemporaryDirectory() as folder:
            comfy_files(build(Path(folder) / "flux", args.schnell), args.out, args.dtype)
    kind = "schnell" if args.schnell else "dev"
    print(f"wrote {args.out} (tiny FLUX.1 [{kind}], {args.layout} layout, random weights)")


if __name__ == "__main__":
    main()
