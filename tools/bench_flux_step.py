#!/usr/bin/env python3
"""Time a FLUX.1 [dev] transformer step on a GPU: eager bf16, torch.compile and fp8, in one run.

    python tools/bench_flux_step.py                    # full size: 19 double + 38 single blocks, 1024x1024
    python tools/bench_flux_step.py --dry-run          # the tiny test transformer on the CPU (CI)

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


def sample(transformer: Callable, given: dict[str, torch.Tensor], steps: int, sync: Callable) -> tuple[torch.Tensor,
                                                                                                          list[float]]:
    """``steps`` Euler steps of the flow ODE from sigma 1 to 0; the final latents and each step's milliseconds."""
    from dts_util.families.flux import pack_latents, unpack_latents

    latents = given["noise"]
    sigmas = torch.linspace(1.0, 0.0, steps + 1)
    conditioning = {k: v for k, v in given.items() if k != "noise"}
    times = []
    for i in range(steps):
        start = time.perf_counter()
        timestep = torch.full([1], float(sigmas[i]), device=latents.device, dtype=latents.dtype)
        velocity = transformer(hidden_states=pack_latents(latents), timestep=timestep, return_dict=False,
                               **conditioning)[0]
        latents = latents + (sigmas[i + 1] - sigmas[i]) * unpack_latents(velocity, *latents.shape[2:])
        sync()
        times.append((time.perf_counter() - start) * 1000)
    return latents, times


def decode(vae: torch.nn.Module, latents: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        pixels = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor,
                            return_dict=False)[0]
    return ((pixels.float() / 2 + 0.5).clamp(0, 1) * 255).round()


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
    from diffusers import AutoencoderKL, FluxTransformer2DModel

    device, dtype = args.device, torch.bfloat16
    config = dict(FLUX_DEV, num_layers=args.depth[0], num_single_layers=args.depth[1])
    if args.dry_run:
        sys.path.insert(0, str(REPO / "tools"))
        import make_tiny_flux

        config = dict(make_tiny_flux._transformer(False).config)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    transformer = random_module(FluxTransformer2DModel, config, device, dtype, seed=0)
    vae = random_module(AutoencoderKL, FLUX_VAE, device, dtype, seed=1)
    given = inputs(transformer, args.size, device, dtype)
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
            sample(made, given, 1, sync)  # warm-up: compilation, autotuning, quantization kernels
            warmup_s = time.perf_counter() - start
            latents, times = sample(made, given, args.steps, sync)
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
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--depth", default="19,38", help="DOUBLE,SINGLE blocks (FLUX.1 [dev]: 19,38)")
    parser.add_argument("--dry-run", action="store_true",
                        help="the tiny test transformer on the CPU, compiled with dynamo's eager backend (the code "
                             "path, not inductor's minute of code generation)")
    parser.add_argument("--compile-backend", default="inductor", help=argparse.SUPPRESS)
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    args.depth = tuple(int(v) for v in args.depth.split(","))
    if args.dry_run:
        args.device, args.size, args.steps, args.compile_backend = "cpu", 128, 2, "eager"
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    rows = run(args)
    depth = "the tiny test transformer" if args.dry_run else f"{args.depth[0]} double + {args.depth[1]} single blocks"
    print(f"\nFLUX.1 [dev] transformer ({depth}), {args.size}x{args.size}, {args.steps} steps, T5 text "
          f"{TEXT_TOKENS} tokens, batch 1, on {name}")
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
        Path(args.json).write_text(json.dumps({"device": name, "size": args.size, "steps": args.steps,
                                               "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
