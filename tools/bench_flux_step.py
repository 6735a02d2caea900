#!/usr/bin/env python3
"""Time a full-size DiT step on a GPU: eager bf16, torch.compile and fp8, in one run (FLUX.1, Z-Image, klein).

    python tools/bench_flux_step.py                    # FLUX.1 [dev]: 19 double + 38 single blocks, 1024x1024
    python tools/bench_flux_step.py --arch zimage      # Z-Image (6B: 30 + 2 + 2 blocks, 3840 wide), 9 steps
    python tools/bench_flux_step.py --arch flux2-klein # FLUX.2 [klein] 4B (5 + 20 blocks, 3072 wide), 4 steps
    python tools/bench_flux_step.py --arch flux2-klein-9b
    python tools/bench_flux_step.py --dry-run          # the tiny test transformer on the CPU (CI)

Z-Image's caption is 128 tokens (a long prompt with its chat template, padded as the model pads it) and klein's
Qwen3 states 512 tokens, as diffusers sends them; neither uses CFG (Turbo, distilled klein), as the defaults.

The transformer has FLUX.1 [dev]'s exact architecture with seeded random weights (speed does not depend
on their values), built on the meta device and filled on the GPU so a 12B model starts in seconds. Each
variant runs the same ``--steps``-step flow-matching Euler loop from the same noise at the given
resolution (T5 text of 512 tokens, guidance 3.5), timed per step (median), and the final latents go
through a FLUX-architecture VAE decoder: the fp8 and compiled variants report how far their pixels land
from eager bf16's. fp8 quantizes every linear layer's weights and activations to float8-e4m3 with
torchao (``Float8DynamicActivationFloat8WeightConfig``), on GPUs of compute capability 8.9 or newer
(Ada, Hopper); elsewhere, or without torchao, its row says why it did not run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

REPO = Path(__file__).resolve().parent.parent
FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))
FLUX_VAE = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                layers_per_block=2, sample_size=1024, scaling_factor=0.3611, shift_factor=0.1159,
                use_quant_conv=False, use_post_quant_conv=False)
TEXT_TOKENS = 512
ZIMAGE = dict(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=3840, n_layers=30, n_refiner_layers=2,
              n_heads=30, n_kv_heads=30, cap_feat_dim=2560, axes_dims=[32, 48, 48], axes_lens=[1536, 512, 512])
ZIMAGE_CAPTION = 128
KLEIN = {"4b": dict(patch_size=1, in_channels=128, num_layers=5, num_single_layers=20, attention_head_dim=128,
                    num_attention_heads=24, joint_attention_dim=7680, timestep_guidance_channels=256, mlp_ratio=3.0,
                    axes_dims_rope=(32, 32, 32, 32), rope_theta=2000, guidance_embeds=False),
         "9b": dict(patch_size=1, in_channels=128, num_layers=8, num_single_layers=24, attention_head_dim=128,
                    num_attention_heads=32, joint_attention_dim=12288, timestep_guidance_channels=256,
                    mlp_ratio=3.0, axes_dims_rope=(32, 32, 32, 32), rope_theta=2000, guidance_embeds=False)}
DEFAULT_STEPS = {"flux": 28, "zimage": 9, "flux2-klein": 4, "flux2-klein-9b": 4}


def random_module(cls: type, config: dict, device: str, dtype: torch.dtype, seed: int) -> torch.nn.Module:
    """``cls(**config)`` with seeded N(0, 0.02) weights made directly on ``device`` (no CPU copy first)."""
    with torch.device("meta"):
        module = cls(**config)
    module = module.to_empty(device=device)
    generator = torch.Generator(device).manual_seed(seed)
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            if tensor.is_floating_point():
                ones = name.endswith(("norm.weight", "norm_q.weight", "norm_k.weight", "norm_added_q.weight",
                                      "norm_added_k.weight"))
                tensor.copy_(torch.ones_like(tensor) if ones else
                             torch.randn(tensor.shape, generator=generator, device=device) * 0.02)
    return module.to(dtype).eval().requires_grad_(False)


def inputs(transformer: torch.nn.Module, size: int, device: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    from dts_util.families.flux import image_ids

    config = transformer.config
    latent = size // 8
    generator = torch.Generator(device).manual_seed(1)
    return {"encoder_hidden_states": torch.randn(1, TEXT_TOKENS, config.joint_attention_dim, generator=generator,
                                                 device=device, dtype=dtype),
            "pooled_projections": torch.randn(1, config.pooled_projection_dim, generator=generator, device=device,
                                              dtype=dtype),
            "txt_ids": torch.zeros(TEXT_TOKENS, 3, device=device, dtype=dtype),
            "img_ids": image_ids(latent // 2, latent // 2, device, dtype),
            "guidance": torch.full([1], 3.5, device=device, dtype=torch.float32),
            "noise": torch.randn(1, 16, latent, latent, generator=generator, device=device, dtype=dtype)}


def flux_velocity(transformer: Callable, latents: torch.Tensor, sigma: float,
                  given: dict[str, torch.Tensor]) -> torch.Tensor:
    from dts_util.families.flux import pack_latents, unpack_latents

    timestep = torch.full([1], sigma, device=latents.device, dtype=latents.dtype)
    conditioning = {k: v for k, v in given.items() if k != "noise"}
    velocity = transformer(hidden_states=pack_latents(latents), timestep=timestep, return_dict=False,
                           **conditioning)[0]
    return unpack_latents(velocity, *latents.shape[2:])


def zimage_inputs(transformer: torch.nn.Module, size: int, device: str, dtype: torch.dtype) -> dict:
    generator = torch.Generator(device).manual_seed(1)
    caption = torch.randn(1, ZIMAGE_CAPTION, transformer.config.cap_feat_dim, generator=generator, device=device,
                          dtype=dtype)
    return {"cap_feats": caption, "noise": torch.randn(1, 16, size // 8, size // 8, generator=generator,
                                                       device=device, dtype=dtype)}


def zimage_velocity(transformer: Callable, latents: torch.Tensor, sigma: float,
                    given: dict[str, torch.Tensor]) -> torch.Tensor:
    """Z-Image reads 1 - sigma and predicts the negative velocity (diffusers' ZImagePipeline)."""
    from dts_util.families.zimage import _call_transformer

    timestep = torch.full([1], 1.0 - sigma, device=latents.device, dtype=latents.dtype)
    return -_call_transformer(transformer, latents, timestep, given["cap_feats"])


def klein_inputs(transformer: torch.nn.Module, size: int, device: str, dtype: torch.dtype) -> dict:
    from dts_util.families.flux2_klein import position_ids, text_position_ids

    generator = torch.Generator(device).manual_seed(1)
    side = size // 16
    return {"encoder_hidden_states": torch.randn(1, TEXT_TOKENS, transformer.config.joint_attention_dim,
                                                 generator=generator, device=device, dtype=dtype),
            "img_ids": position_ids(0, side, side).to(device), "txt_ids": text_position_ids(TEXT_TOKENS).to(device),
            "noise": torch.randn(1, 128, side, side, generator=generator, device=device, dtype=dtype)}


def klein_velocity(transformer: Callable, latents: torch.Tensor, sigma: float,
                   given: dict[str, torch.Tensor]) -> torch.Tensor:
    batch, channels, rows, columns = latents.shape
    tokens = latents.reshape(batch, channels, rows * columns).permute(0, 2, 1)
    timestep = torch.full([1], sigma, device=latents.device, dtype=latents.dtype)
    conditioning = {k: v for k, v in given.items() if k != "noise"}
    velocity = transformer(hidden_states=tokens, timestep=timestep, guidance=None, return_dict=False,
                           **conditioning)[0]
    return velocity.permute(0, 2, 1).reshape(batch, channels, rows, columns)


def sample(velocity_of: Callable, transformer: Callable, given: dict[str, torch.Tensor], steps: int,
           sync: Callable) -> tuple[torch.Tensor, list[float]]:
    """``steps`` Euler steps of the flow ODE from sigma 1 to 0; the final latents and each step's milliseconds."""
    latents = given["noise"]
    sigmas = torch.linspace(1.0, 0.0, steps + 1)
    times = []
    for i in range(steps):
        start = time.perf_counter()
        velocity = velocity_of(transformer, latents, float(sigmas[i]), given)
        latents = latents + (sigmas[i + 1] - sigmas[i]) * velocity
        sync()
        times.append((time.perf_counter() - start) * 1000)
    return latents, times


def decode(vae: torch.nn.Module, latents: torch.Tensor) -> torch.Tensor:
    from dts_util.families.flux2_klein import unpatchify

    with torch.inference_mode():
        if latents.shape[1] == 4 * vae.config.latent_channels:  # klein samples 2x2 patches of the VAE's latents
            latents = unpatchify(latents)
        else:
            latents = latents / vae.config.scaling_factor + vae.config.shift_factor
        pixels = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
    return ((pixels.float() / 2 + 0.5).clamp(0, 1) * 255).round()


def architecture(args: argparse.Namespace) -> tuple[type, dict, type, dict, Callable, Callable, str]:
    """(transformer class, config, VAE class, config, inputs, velocity, description) of ``args.arch``."""
    from diffusers import AutoencoderKL, AutoencoderKLFlux2, Flux2Transformer2DModel, FluxTransformer2DModel, \
        ZImageTransformer2DModel

    sys.path.insert(0, str(REPO / "tools"))
    import make_tiny_dit

    # The dry run is a smoke run: toy widths everywhere (a full-width VAE in bf16 takes minutes on a CPU).
    flux_vae = {k: v for k, v in make_tiny_dit._flux_vae().config.items() if not k.startswith("_")} \
        if args.dry_run else FLUX_VAE
    if args.arch == "flux":
        config = dict(FLUX_DEV, num_layers=args.depth[0], num_single_layers=args.depth[1])
        if args.dry_run:
            import make_tiny_flux

            config = dict(make_tiny_flux._transformer(False).config)
        return (FluxTransformer2DModel, config, AutoencoderKL, flux_vae, inputs, flux_velocity,
                f"FLUX.1 [dev] transformer ({config['num_layers']} double + {config['num_single_layers']} single "
                f"blocks), T5 text {TEXT_TOKENS} tokens")
    if args.arch == "zimage":
        config = dict(make_tiny_dit.zimage_pipeline().transformer.config) if args.dry_run else ZIMAGE
        return (ZImageTransformer2DModel, config, AutoencoderKL, flux_vae, zimage_inputs, zimage_velocity,
                f"Z-Image transformer ({config['n_layers']} + 2 x {config['n_refiner_layers']} blocks, "
                f"{config['dim']} wide), caption {ZIMAGE_CAPTION} tokens")
    size = "9b" if args.arch.endswith("9b") else "4b"
    config = dict(make_tiny_dit.klein_pipeline("shallow").transformer.config) if args.dry_run else KLEIN[size]
    vae = {} if not args.dry_run else dict(block_out_channels=(32, 32, 64, 64), layers_per_block=1)
    return (Flux2Transformer2DModel, config, AutoencoderKLFlux2, vae, klein_inputs, klein_velocity,
            f"FLUX.2 [klein] {size.upper()} transformer ({config['num_layers']} double + "
            f"{config['num_single_layers']} single blocks), Qwen3 text {TEXT_TOKENS} tokens")


def fp8_available(device: str) -> str:
    """"" when fp8 can run here, else why not."""
    if not device.startswith("cuda"):
        return "fp8 matmuls need a CUDA GPU"
    if torch.cuda.get_device_capability() < (8, 9):
        return f"compute capability {torch.cuda.get_device_capability()} < 8.9 has no fp8 tensor cores"
    try:
        import torchao.quantization  # noqa: F401
    except ImportError:
        return "torchao is not installed"
    return ""


def quantize_fp8(module: torch.nn.Module) -> torch.nn.Module:
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    quantize_(module, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))
    return module


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    # bf16 as served on a GPU; the dry run (a smoke run on any CPU, many without bf16 arithmetic) in fp32.
    device, dtype = args.device, torch.float32 if args.dry_run else torch.bfloat16
    transformer_cls, config, vae_cls, vae_config, make_inputs, velocity_of, args.description = architecture(args)
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    transformer = random_module(transformer_cls, config, device, dtype, seed=0)
    vae = random_module(vae_cls, vae_config, device, dtype, seed=1)
    given = make_inputs(transformer, args.size, device, dtype)
    rows, reference = [], None
    variants: list[tuple[str, Callable[[], Callable | str]]] = [
        ("eager bf16", lambda: transformer),
        ("torch.compile bf16", lambda: torch.compile(transformer, backend=args.compile_backend)),
        ("fp8 (torchao)", lambda: fp8_available(device) or quantize_fp8(transformer)),
    ]
    for name, make in variants:
        made = make()
        if isinstance(made, str):
            rows.append({"variant": name, "skipped": made})
            continue
        with torch.inference_mode():
            start = time.perf_counter()
            sample(velocity_of, made, given, 1, sync)  # warm-up: compilation, autotuning, quantization kernels
            warmup_s = time.perf_counter() - start
            latents, times = sample(velocity_of, made, given, args.steps, sync)
        pixels = decode(vae, latents)
        reference = pixels if reference is None else reference
        difference = (pixels - reference).abs()
        rows.append({"variant": name, "step_ms": statistics.median(times), "warmup_s": warmup_s,
                     "pixel_max_diff": float(difference.max()), "pixel_mean_diff": float(difference.mean()),
                     "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else 0.0})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", type=int, default=1024, help="image side in pixels")
    parser.add_argument("--arch", choices=sorted(DEFAULT_STEPS), default="flux")
    parser.add_argument("--steps", type=int, help="default: the family's (FLUX.1 28, Z-Image Turbo 9, klein 4)")
    parser.add_argument("--depth", default="19,38", help="--arch flux: DOUBLE,SINGLE blocks (FLUX.1 [dev]: 19,38)")
    parser.add_argument("--dry-run", action="store_true",
                        help="the tiny test transformer on the CPU, compiled with dynamo's eager backend (the code "
                             "path, not inductor's minute of code generation)")
    parser.add_argument("--compile-backend", default="inductor", help=argparse.SUPPRESS)
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    args.depth = tuple(int(v) for v in args.depth.split(","))
    args.steps = args.steps or DEFAULT_STEPS[args.arch]
    if args.dry_run:
        args.device, args.size, args.steps, args.compile_backend = "cpu", 128, 2, "eager"
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    rows = run(args)
    tiny = " (dry run: tiny test sizes, in fp32)" if args.dry_run else ""
    print(f"\n{args.description}{tiny}, {args.size}x{args.size}, {args.steps} steps, batch 1, on {name}")
    print("| variant | ms per step | x eager | warm-up s | pixel diff vs eager bf16 (max / mean) | peak GiB |")
    print("|---|---:|---:|---:|---:|---:|")
    eager = rows[0]["step_ms"]
    for row in rows:
        if "skipped" in row:
            print(f"| {row['variant']} | not run: {row['skipped']} ||||| ")
            continue
        print(f"| {row['variant']} | {row['step_ms']:.1f} | {eager / row['step_ms']:.2f} | {row['warmup_s']:.1f} "
              f"| {row['pixel_max_diff']:.0f} / {row['pixel_mean_diff']:.2f} | {row['peak_gib']:.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": name, "arch": args.arch, "size": args.size,
                                               "steps": args.steps, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
