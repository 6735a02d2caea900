#!/usr/bin/env python3
"""Eager PyTorch against every available engine backend, measured in one run on the same inputs.

    python tools/bench_engines.py                       # built-in model, native size
    python tools/bench_engines.py --arch sd15 --resolution 512x512 --e2e-steps 20

Variants are ``backend[:precision]``: ``eager`` (fp32), ``eager:bf16``, ``onnxruntime``,
``openvino:fp32``, ``openvino:bf16``, ``aotinductor``, ``aotinductor+cudagraph`` (its engines
replayed in a CUDA graph), ``tensorrt:fp16`` ... (default: every one that can run here). For each
it prints the per-UNet-step median, the VAE decode and encode (img2img) times, the end-to-end
image time and the peak memory, each with its ratio to eager fp32, and, with
``--export-memory``, the peak memory of exporting the UNet to ONNX. The CPU's name and
vector extensions are printed with the table: compare backends only within one run. Every backend runs in its
own subprocess, so peak memory is that backend's alone (RSS on the CPU; CUDA peak
allocation on a GPU, where engine memory outside torch's allocator is not counted).
Engines are built first (or reused when valid) in --engine-dir.

``--arch sd15`` benchmarks the Stable Diffusion 1.5 architecture (UNet 860M, VAE 83M,
CLIP ViT-L/14 text encoder) with seeded random weights: speed does not depend on the
weights' values. ``--arch flux`` benchmarks FLUX.1 [dev]'s transformer at full width (3072,
24 heads of 128, T5 width 4096) and its VAE, with ``--flux-depth DOUBLE,SINGLE`` of its 19
double and 38 single blocks (default 1,2: the full 12B transformer needs 48 GB in fp32); the
table says which depth ran. Its text encoders are one-layer stand-ins of the real widths: the
transformer step and the VAE are what is measured.

``--arch zimage`` and ``--arch flux2-klein`` do the same for Z-Image (3840 wide, 30 heads, Qwen3-4B's 2560-wide
captions; ``--dit-depth LAYERS,REFINERS`` of its 30 main and 2+2 refiner blocks, default 1,1) and FLUX.2
[klein] 4B (3072 wide, 24 heads, 128 latent channels, 7680-wide text states; ``--dit-depth DOUBLE,SINGLE``
of its 5 double and 20 single blocks, default 1,2), with their real VAEs and one-head stand-ins of Qwen3
at its width (klein reads layer 27, so its stand-in has 28 thin layers).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CUDA_GRAPH_SUFFIX = "+cudagraph"
DEFAULT_ENGINE_COMPONENTS = "denoiser,vae_decoder,vae_encoder"  # "denoiser": the UNet or the transformer
FLUX_TRANSFORMER = dict(patch_size=1, in_channels=64, attention_head_dim=128, num_attention_heads=24,
                        joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                        axes_dims_rope=(16, 56, 56))
FLUX_VAE = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                layers_per_block=2, sample_size=1024, scaling_factor=0.3611, shift_factor=0.1159,
                use_quant_conv=False, use_post_quant_conv=False)
SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
SD15_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                layers_per_block=2, sample_size=512, scaling_factor=0.18215)
SD15_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                 bos_token_id=49406, eos_token_id=49407)


def ensure_sd15(store_root: Path) -> str:
    """Write an SD1.5-architecture model with seeded random weights into the store (once)."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from dts_util.models.builtin import SCHEDULER_CONFIG
    from dts_util.models.clip_vocab import clip_vocabulary

    name = "bench-sd15-arch"
    if (store_root / name / "model_index.json").is_file():
        return name
    print(f"creating {name} (SD1.5 architecture, random weights) in {store_root}", file=sys.stderr)
    vocab, merges = clip_vocabulary()
    torch.manual_seed(0)
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL(**SD15_VAE), text_encoder=CLIPTextModel(CLIPTextConfig(**SD15_TEXT)),
        tokenizer=CLIPTokenizer(vocab=vocab, merges=[tuple(m.split()) for m in merges], model_max_length=77),
        unet=UNet2DConditionModel(**SD15_UNET), scheduler=PNDMScheduler(**SCHEDULER_CONFIG),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    tmp = Path(tempfile.mkdtemp(prefix=".partial-", dir=store_root))
    pipe.save_pretrained(tmp)
    tmp.rename(store_root / name)
    return name


def ensure_flux(store_root: Path, depth: str) -> str:
    """Write a FLUX.1 [dev]-width model of ``depth`` (double,single blocks) with seeded random weights (once)."""
    import torch
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    double, single = (int(v) for v in depth.split(","))
    name = f"bench-flux-arch-{double}x{single}"
    if (store_root / name / "model_index.json").is_file():
        return name
    print(f"creating {name} (FLUX.1 [dev] widths, {double} double + {single} single blocks, random weights) in "
          f"{store_root}", file=sys.stderr)
    sys.path.insert(0, str(REPO / "tools"))
    import make_tiny_flux

    torch.manual_seed(0)
    pipe = make_tiny_flux.pipeline()
    tokenizer_vocab = len(pipe.tokenizer_2)
    pipe.transformer = FluxTransformer2DModel(**FLUX_TRANSFORMER, num_layers=double, num_single_layers=single)
    pipe.vae = AutoencoderKL(**FLUX_VAE)
    pipe.text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                                                     num_hidden_layers=1, num_attention_heads=12,
                                                     max_position_embeddings=77, hidden_act="quick_gelu",
                                                     bos_token_id=49406, eos_token_id=49407))
    pipe.text_encoder_2 = T5EncoderModel(T5Config(vocab_size=tokenizer_vocab, d_model=4096, d_kv=64, d_ff=256,
                                                  num_layers=1, num_heads=4, feed_forward_proj="gated-gelu",
                                                  is_encoder_decoder=False))
    tmp = Path(tempfile.mkdtemp(prefix=".partial-", dir=store_root))
    pipe.save_pretrained(tmp)
    tmp.rename(store_root / name)
    return name


ZIMAGE_TRANSFORMER = dict(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=3840, n_heads=30,
                          n_kv_heads=30, cap_feat_dim=2560, axes_dims=[32, 48, 48], axes_lens=[1536, 512, 512])
KLEIN_TRANSFORMER = dict(patch_size=1, in_channels=128, attention_head_dim=128, num_attention_heads=24,
                         joint_attention_dim=7680, timestep_guidance_channels=256, mlp_ratio=3.0,
                         axes_dims_rope=(32, 32, 32, 32), rope_theta=2000, guidance_embeds=False)


def _qwen_stand_in(tokenizer, layers: int):
    """Qwen3 at Qwen3-4B's width (2560) with one thin head per layer: the captions' shape, not its cost."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    return Qwen3ForCausalLM(Qwen3Config(vocab_size=len(tokenizer), hidden_size=2560, intermediate_size=64,
                                        num_hidden_layers=layers, num_attention_heads=1, num_key_value_heads=1,
                                        head_dim=64, tie_word_embeddings=True))


def ensure_dit(store_root: Path, arch: str, depth: str) -> str:
    """Write a full-width, reduced-depth Z-Image or FLUX.2 [klein] 4B with seeded random weights (once)."""
    import torch
    from diffusers import AutoencoderKL, AutoencoderKLFlux2, Flux2Transformer2DModel, ZImageTransformer2DModel

    first, second = (int(v) for v in depth.split(","))
    name = f"bench-{arch}-arch-{first}x{second}"
    if (store_root / name / "model_index.json").is_file():
        return name
    print(f"creating {name} ({arch} widths, depth {depth}, random weights) in {store_root}", file=sys.stderr)
    sys.path.insert(0, str(REPO / "tools"))
    import make_tiny_dit

    torch.manual_seed(0)
    if arch == "zimage":
        pipe = make_tiny_dit.zimage_pipeline()
        pipe.transformer = ZImageTransformer2DModel(**ZIMAGE_TRANSFORMER, n_layers=first, n_refiner_layers=second)
        pipe.vae = AutoencoderKL(**FLUX_VAE)
        pipe.text_encoder = _qwen_stand_in(pipe.tokenizer, 3).model
    else:
        pipe = make_tiny_dit.klein_pipeline()
        pipe.transformer = Flux2Transformer2DModel(**KLEIN_TRANSFORMER, num_layers=first, num_single_layers=second)
        pipe.vae = AutoencoderKLFlux2()
        pipe.text_encoder = _qwen_stand_in(pipe.tokenizer, make_tiny_dit.KLEIN_QWEN_LAYERS)
    tmp = Path(tempfile.mkdtemp(prefix=".partial-", dir=store_root))
    pipe.save_pretrained(tmp)
    tmp.rename(store_root / name)
    return name


DIT_DEPTHS = {"zimage": ("1,1", "main and refiner", (30, 2)), "flux2-klein": ("1,2", "double and single", (5, 20))}


def peak_rss_mb() -> float:
    """This process's peak resident memory. VmHWM belongs to the address space, so unlike
    ru_maxrss it does not carry over the parent's peak across fork + exec."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def median_ms(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def worker(args: argparse.Namespace) -> None:
    """Measure one backend; print one JSON line."""
    import torch

    from dts_util.engines.components import get_component
    from dts_util.models.loader import load_model
    from dts_util.models.store import ModelStore
    from dts_util.boundary import Shape
    from dts_util.pipeline.components import EagerVaeDecoder, EagerVaeEncoder
    from dts_util.pipeline.params import GenerationRequest, resolve
    from dts_util.pipeline.generation import make_pipeline

    backend, _, precision = args.backend.removesuffix(CUDA_GRAPH_SUFFIX).partition(":")
    store = ModelStore(Path(args.model_dir))
    model = load_model(args.model, store.model_path(args.model), args.device,
                       dtype=precision if backend in ("eager", "torch-compile") and precision else "auto")
    family = model.family
    denoiser_name = family.denoiser
    descriptor = family.components()[denoiser_name]
    width, height = (int(v) for v in args.resolution.split("x"))
    scale = model.info.vae_scale_factor
    # SD's UNet runs both CFG branches as one batch; FLUX's transformer runs each guidance call at the batch.
    unet_shape = Shape(height // scale, width // scale, args.batch_size * (2 if descriptor.guided else 1),
                       descriptor.text_lengths(model.info, (1,))[0])
    vae_shape = Shape(height // scale, width // scale, args.batch_size)
    encoder_shape = Shape(height // scale, width // scale, 1)  # the input image is encoded once per request
    components = [denoiser_name if c == "denoiser" else c for c in args.engine_components.split(",")]
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)

    if backend in ("eager", "torch-compile"):
        unet = family.eager_denoiser(model.denoiser())
        if backend == "torch-compile":
            from dts_util.pipeline.compiled import compiled_module

            unet = family.eager_denoiser(compiled_module(model.denoiser()))
        vae = EagerVaeDecoder(model.vae())
        encoder = EagerVaeEncoder(model.vae())
    else:
        unet = load_engine(args, model, denoiser_name, unet_shape, backend, precision)
        vae = load_engine(args, model, "vae_decoder", vae_shape, backend, precision) \
            if "vae_decoder" in components else EagerVaeDecoder(model.vae())
        encoder = load_engine(args, model, "vae_encoder", encoder_shape, backend, precision) \
            if "vae_encoder" in components else EagerVaeEncoder(model.vae())

    unet_inputs = descriptor.sample_inputs(model.info, unet_shape, seed=0, device=args.device, dtype=model.dtype)
    latent = get_component("vae_decoder").sample_inputs(model.info, vae_shape, seed=0, device=args.device,
                                                   dtype=model.dtype)
    image = get_component("vae_encoder").sample_inputs(model.info, encoder_shape, seed=0, device=args.device,
                                                       dtype=model.dtype)
    with torch.inference_mode():
        unet_ms = median_ms(lambda: (unet(**unet_inputs), sync()), args.repeats, warmup=2)
        vae_ms = median_ms(lambda: (vae(**latent), sync()), max(1, args.repeats // 2))
        encode_ms = median_ms(lambda: (encoder(**image), sync()), max(1, args.repeats // 2))

        class Fixed:
            def denoiser(self, shape):
                return unet

            def vae_decoder(self, shape):
                return vae

            def vae_encoder(self, shape):
                return encoder

        request = resolve(GenerationRequest(prompt="a lighthouse", seed=1, width=width, height=height,
                                            steps=args.e2e_steps, batch_size=args.batch_size), model.name,
                          family.defaults(model.info))
        request = replace(request, sampler=family.check_sampler(model.info, request.sampler))
        pipeline = make_pipeline(model, Fixed())
        pipeline(replace(request, steps=1))  # warm: text encoder load, first-call allocations
        start = time.perf_counter()
        pipeline(request)
        sync()
        e2e_s = time.perf_counter() - start
    peak_mb = torch.cuda.max_memory_allocated() / 2**20 if args.device.startswith("cuda") else peak_rss_mb()
    print(json.dumps({"backend": args.backend, "unet_ms": unet_ms, "vae_ms": vae_ms, "vae_encode_ms": encode_ms,
                      "e2e_s": e2e_s, "peak_mb": peak_mb}))


def load_engine(args: argparse.Namespace, model, component: str, shape, backend: str, precision: str):
    """The engine of exactly this backend and precision (a server would pick among them by preference)."""
    from dts_util.engines.backends import get_backend
    from dts_util.engines.registry import EngineRegistry

    for record in EngineRegistry(Path(args.engine_dir)).matching(model.name, component, shape):
        if record.backend == backend and (not precision or record.precision == precision) \
                and record.model_fingerprint == model.fingerprint:
            return get_backend(backend).load(record.engine_path, record.input_shapes, record.output_name,
                                             args.device).activate()
    raise SystemExit(f"no {backend} {precision} engine for {component} {shape.describe()}")


def export_peak(args: argparse.Namespace) -> None:
    """Export the UNet to ONNX in a fresh folder; print this process's peak memory as JSON."""
    from dts_util.engines.export import export_component
    from dts_util.engines.components import get_component
    from dts_util.models.loader import load_model
    from dts_util.models.store import ModelStore

    store = ModelStore(Path(args.model_dir))
    model = load_model(args.model, store.model_path(args.model), "cpu")
    before = peak_rss_mb()
    with tempfile.TemporaryDirectory(dir=args.engine_dir) as folder:
        start = time.perf_counter()
        export_component(model, get_component(model.family.denoiser, model.info), Path(folder))
        seconds = time.perf_counter() - start
    print(json.dumps({"export_peak_mb": peak_rss_mb(), "before_export_mb": before, "export_s": seconds}))


def build_engines(args: argparse.Namespace, variant: str) -> None:
    from dts_util.engines.builder import build, plan
    from dts_util.models.loader import load_model
    from dts_util.models.store import ModelStore

    backend, _, precision = variant.removesuffix(CUDA_GRAPH_SUFFIX).partition(":")
    if backend in ("eager", "torch-compile"):
        return
    store = ModelStore(Path(args.model_dir))
    model = load_model(args.model, store.model_path(args.model), "cpu")
    width, height = (int(v) for v in args.resolution.split("x"))
    components = tuple(model.family.denoiser if c == "denoiser" else c for c in args.engine_components.split(","))
    for job in plan(model, Path(args.engine_dir), [(width, height)], [args.batch_size], backend,
                    precision or "auto", components=components):
        start = time.perf_counter()
        result = build(job, model, Path(args.engine_dir))
        print(f"{variant} {job.label}: {result.status} in {time.perf_counter() - start:.1f}s"
              + (f", rel L2 {result.rel_l2:.1e}" if result.rel_l2 is not None else ""), file=sys.stderr)


def run_worker(args: argparse.Namespace, backend: str) -> dict:
    command = [sys.executable, __file__, "--worker", backend] + [
        f"--{key.replace('_', '-')}={value}" for key, value in vars(args).items()
        if key not in ("worker", "backends", "arch", "torch_compile", "export_memory", "json", "flux_depth",
                       "dit_depth")
        and value is not None]
    # "aotinductor+cudagraph": the same engines, replayed inside a CUDA graph.
    env = {**os.environ, "DTS_AOTI_CUDA_GRAPH": "1" if backend.endswith(CUDA_GRAPH_SUFFIX) else "0"}
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        return {"backend": backend, "error": (result.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(result.stdout.strip().splitlines()[-1])


def available_backends(device: str) -> list[str]:
    from dts_util.engines.backends import (aotinductor_available, onnxruntime_available, openvino_available,
                                           tensorrt_available)
    from dts_util.engines.device import cpu_has_bf16

    found = ["eager:bf16"] if not device.startswith("cuda") and cpu_has_bf16() else []
    if tensorrt_available()[0] and device.startswith("cuda"):
        found.append("tensorrt")
    if aotinductor_available()[0]:
        found.append("aotinductor")
    if openvino_available()[0] and not device.startswith("cuda"):
        found += ["openvino:fp32"] + (["openvino:bf16"] if cpu_has_bf16() else [])
    if onnxruntime_available()[0]:
        from dts_util.engines.backends import default_build_device

        # On a GPU, CPU-provider onnxruntime engines would be measured against GPU eager: skip them.
        if default_build_device("onnxruntime") == ("cuda" if device.startswith("cuda") else "cpu"):
            found.append("onnxruntime")
    return found


def print_table(rows: list[dict], args: argparse.Namespace) -> None:
    eager = next(r for r in rows if r["backend"] == "eager")
    unit = "CUDA peak MB" if args.device.startswith("cuda") else "peak RSS MB"
    denoiser = "UNet" if args.arch in ("builtin", "sd15") else "transformer"
    header = f"| backend | {denoiser} step ms | x eager | VAE decode ms | x eager | VAE encode ms | x eager " \
             f"| image s ({args.e2e_steps} steps) | x eager | {unit} | x eager |"
    from dts_util.engines.device import device_info

    cpu = device_info("cpu")
    batch = {"flux": f"transformer batch {args.batch_size}, guidance embedded",
             "zimage": f"transformer batch {args.batch_size}, Turbo: no CFG",
             "flux2-klein": f"transformer batch {args.batch_size}, distilled: no CFG"}.get(
        args.arch, f"UNet batch {args.batch_size * 2} with CFG")
    print(f"\n{args.model} {args.resolution}, batch {args.batch_size} ({batch}), "
          f"device {args.device}, {os.cpu_count()} CPU cores: {cpu['name']} ({', '.join(cpu['isa'])})")
    if args.arch == "flux":
        double, single = args.flux_depth.split(",")
        print(f"reduced-depth FLUX.1 [dev]: {double} of 19 double and {single} of 38 single blocks at full width; "
              "a full transformer step is about 19/double or 38/single times longer per block type")
    if args.arch in DIT_DEPTHS:
        _, kinds, full = DIT_DEPTHS[args.arch]
        first, second = args.dit_depth.split(",")
        print(f"reduced-depth {args.arch}: {first} of {full[0]} and {second} of {full[1]} {kinds} blocks at full "
              "width; a full step is longer in proportion to the blocks")
    if args.engine_components != DEFAULT_ENGINE_COMPONENTS:
        print(f"engine variants run engines for {args.engine_components} only; the rest runs eagerly")
    print(header)
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        if "error" in row:
            print(f"| {row['backend']} | failed: {row['error']} |||||||||| ")
            continue
        print(f"| {row['backend']} | {row['unet_ms']:.1f} | {eager['unet_ms'] / row['unet_ms']:.2f} "
              f"| {row['vae_ms']:.1f} | {eager['vae_ms'] / row['vae_ms']:.2f} "
              f"| {row['vae_encode_ms']:.1f} | {eager['vae_encode_ms'] / row['vae_encode_ms']:.2f} "
              f"| {row['e2e_s']:.2f} | {eager['e2e_s'] / row['e2e_s']:.2f} "
              f"| {row['peak_mb']:.0f} | {row['peak_mb'] / eager['peak_mb']:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=["builtin", "sd15", "flux", "zimage", "flux2-klein"], default="builtin")
    parser.add_argument("--flux-depth", default="1,2", help="--arch flux: DOUBLE,SINGLE blocks [default: 1,2]")
    parser.add_argument("--dit-depth", help="--arch zimage: LAYERS,REFINERS [1,1]; flux2-klein: DOUBLE,SINGLE [1,2]")
    parser.add_argument("--model", help="model name in --model-dir (overrides --arch)")
    parser.add_argument("--model-dir", default=str(REPO / "models"), help="model store [default: ./models]")
    parser.add_argument("--engine-dir", default=str(REPO / "engines"))
    parser.add_argument("--resolution", help="WxH [default: the model's native size]")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=10, help="timed UNet steps per backend")
    parser.add_argument("--e2e-steps", type=int, default=20)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backends", help="comma list [default: every available]")
    parser.add_argument("--torch-compile", action="store_true", help="also time eager under torch.compile")
    parser.add_argument("--export-memory", action="store_true", help="also measure the UNet export's peak memory")
    parser.add_argument("--json", help="also write the table's rows to this JSON file")
    parser.add_argument("--engine-components", default=DEFAULT_ENGINE_COMPONENTS,
                        help="components engine variants build and run (the others run eagerly)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker == "export":
        export_peak(args)
        return
    if args.worker:
        args.backend = args.worker
        worker(args)
        return

    from dts_util.models.builtin import ensure_builtin_model
    from dts_util.models.loader import inspect_model
    from dts_util.models.store import ModelStore

    store = ModelStore(Path(args.model_dir))
    if args.model is None:
        if args.arch == "flux":
            args.model = ensure_flux(store.root, args.flux_depth)
        elif args.arch in DIT_DEPTHS:
            args.dit_depth = args.dit_depth or DIT_DEPTHS[args.arch][0]
            args.model = ensure_dit(store.root, args.arch, args.dit_depth)
        else:
            args.model = ensure_sd15(store.root) if args.arch == "sd15" else ensure_builtin_model(store).name
    if args.resolution is None:
        size = inspect_model(args.model, store.model_path(args.model)).native_size
        args.resolution = f"{size}x{size}"
    backends = args.backends.split(",") if args.backends else available_backends(args.device)
    for backend in backends:
        build_engines(args, backend)
    rows = [run_worker(args, "eager")]
    if args.torch_compile:
        rows.append(run_worker(args, "torch-compile"))
    rows += [run_worker(args, backend) for backend in backends]
    print_table(rows, args)
    if args.json:
        meta = {key: getattr(args, key) for key in ("model", "resolution", "batch_size", "device", "e2e_steps")}
        Path(args.json).write_text(json.dumps({**meta, "rows": rows}, indent=2))
    if args.export_memory:
        export = run_worker(args, "export")
        print(f"\nUNet export to ONNX: peak RSS {export.get('export_peak_mb', 0):.0f} MB "
              f"({export.get('before_export_mb', 0):.0f} MB with the model loaded), "
              f"{export.get('export_s', 0):.0f} s" if "error" not in export else f"\nexport failed: {export['error']}")


if __name__ == "__main__":
    main()
