"""ONNX Runtime backend: a per-shape optimized model file is the engine.

Building first fuses attention with ONNX Runtime's transformer optimizer (once per
export): the exported graph materializes every attention map, 2 x 8 x 4096 x 4096
floats per layer for SD1.5 at 512x512, and the fused MultiHeadAttention kernel
does not, which cut the UNet engine's peak memory from 7.0 to 5.2 GB there. Then it
runs ONNX Runtime's graph optimizer with every symbolic axis pinned to the engine's
shape (free-dimension overrides) and saves the optimized graph, so loading it later
skips that work and the shapes are static. It uses the CUDA provider where
onnxruntime-gpu is installed, and the CPU provider otherwise.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import shutil
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np
import torch

from dts_util.engines.backends.base import Backend, Runner, require

log = logging.getLogger(__name__)
EXTERNAL_DATA_MIN_BYTES = 1024  # with external data on, every initializer above this size goes there
PROTOBUF_LIMIT = 2 * 1024**3
_shared_arena_lock = threading.Lock()
_shared_arena_registered = False


def _ort():
    import onnxruntime

    return onnxruntime


def providers_for(device: str) -> list:
    """CUDA provider pinned to the device's GPU when onnxruntime-gpu has it; the CPU provider otherwise."""
    available = _ort().get_available_providers()
    if device.startswith("cuda") and "CUDAExecutionProvider" in available:
        index = int(device.split(":", 1)[1]) if ":" in device else 0
        return [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def _provider_name(provider) -> str:
    return provider[0] if isinstance(provider, tuple) else provider


def use_shared_cpu_arena(options) -> None:
    """Make a session allocate from one process-wide CPU arena.

    Engines run one at a time, so per-session arenas only stack up their peaks: with
    SD1.5's UNet and VAE decoder at 512x512 a shared arena lowered peak memory from
    7.9 to 5.9 GB at the same speed (2-core CPU).
    """
    global _shared_arena_registered
    ort = _ort()
    with _shared_arena_lock:
        if not _shared_arena_registered:
            memory = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
            ort.create_and_register_allocator(memory, ort.OrtArenaCfg(0, -1, -1, -1))
            _shared_arena_registered = True
    options.add_session_config_entry("session.use_env_allocators", "1")


class OnnxRuntimeRunner(Runner):
    backend = "onnxruntime"

    def __init__(self, engine_path: Path, input_shapes: dict[str, tuple[int, ...]], output_name: str,
                 device: str) -> None:
        super().__init__(engine_path.name, input_shapes, output_name, device)
        self.engine_path = engine_path
        self.session = None

    def activate_impl(self) -> None:
        ort = _ort()
        options = ort.SessionOptions()
        # The file is already optimized for this shape; basic passes only keep loading fast.
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.log_severity_level = 3
        providers = providers_for(self.device)
        if _provider_name(providers[0]) == "CPUExecutionProvider":
            use_shared_cpu_arena(options)
        self.session = ort.InferenceSession(str(self.engine_path), options, providers=providers)
        self.on_cuda = self.session.get_providers()[0] == "CUDAExecutionProvider"

    def deactivate_impl(self) -> None:
        self.session = None

    def infer_impl(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.on_cuda and self.device.startswith("cuda"):
            return self._infer_bound(inputs)
        feed = {name: value.detach().float().cpu().contiguous().numpy() for name, value in inputs.items()}
        (output,) = self.session.run([self.output_name], feed)
        return torch.from_numpy(output).to(self.device, next(iter(inputs.values())).dtype)

    def _infer_bound(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """CUDA tensors in and out through I/O binding: no host copies."""
        binding = self.session.io_binding()
        for name, value in inputs.items():
            value = value.float().contiguous()
            inputs[name] = value  # keep alive until run returns
            binding.bind_input(name, "cuda", value.device.index or 0, np.float32, tuple(value.shape), value.data_ptr())
        first = next(iter(inputs.values()))
        output = torch.empty(self._output_shape, dtype=torch.float32, device=first.device)
        binding.bind_output(self.output_name, "cuda", first.device.index or 0, np.float32, tuple(output.shape),
                            output.data_ptr())
        self.session.run_with_iobinding(binding)
        return output

    @property
    def _output_shape(self) -> tuple[int, ...]:
        return tuple(self.session.get_outputs()[0].shape)


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"
    engine_suffix = ".onnx"

    def version(self) -> str:
        return _ort().__version__

    def check_precision(self, precision: str, device: str) -> None:
        require(precision == "fp32", f"onnxruntime engines are fp32 (asked for {precision}); "
                                     "use --backend tensorrt for fp16")

    def build(self, onnx_path: Path, input_shapes: dict[str, tuple[int, ...]], free_dims: dict[str, int],
              precision: str, engine_path: Path, device: str, cache_dir: Path) -> list[Path]:
        self.check_precision(precision, device)
        onnx_path = fuse_attention(onnx_path, cache_dir)
        ort = _ort()
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.optimized_model_filepath = str(engine_path)
        options.log_severity_level = 3
        for dim, value in free_dims.items():
            options.add_free_dimension_override_by_name(dim, value)
        written = [engine_path]
        # Weights already outside the graph (streamed exports) must be written out again too: left as
        # they are, the engine would point at the export's data file by a relative name.
        if _external_bytes(onnx_path) or onnx_path.stat().st_size > PROTOBUF_LIMIT // 2:
            data = engine_path.with_name(engine_path.name + ".data")
            options.add_session_config_entry("session.optimized_model_external_initializers_file_name", data.name)
            options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes",
                                             str(EXTERNAL_DATA_MIN_BYTES))
            written.append(data)
        ort.InferenceSession(str(onnx_path), options, providers=providers_for(device))
        require(engine_path.is_file(), f"onnxruntime wrote no optimized model at {engine_path}")
        return [p for p in written if p.exists()]

    def load(self, engine_path: Path, input_shapes: dict[str, tuple[int, ...]], output_name: str,
             device: str) -> Runner:
        return OnnxRuntimeRunner(engine_path, input_shapes, output_name, device)


def _external_bytes(onnx_path: Path) -> int:
    data = onnx_path.with_name(onnx_path.name + ".data")
    return data.stat().st_size if data.exists() else 0


# Fusions that only have CUDA kernels; on the CPU they would leave unrunnable ops.
GPU_ONLY_FUSIONS = ("enable_group_norm", "enable_skip_group_norm", "enable_bias_splitgelu", "enable_nhwc_conv",
                    "enable_bias_add", "enable_packed_qkv", "enable_packed_kv")
FUSION_RECORD = "fusion.json"


def fuse_attention(onnx_path: Path, cache_dir: Path) -> Path:
    """The export with attention fused (cached in ``cache_dir``), or ``onnx_path`` when nothing fused.

    A failing optimizer is not fatal: the unfused graph builds a correct, only larger, engine.
    """
    folder = cache_dir / "fused" / onnx_path.parent.name
    try:
        record = json.loads((folder / FUSION_RECORD).read_text())
    except (OSError, ValueError):
        record = None
    if record is not None:
        return folder / onnx_path.name if record["fused"] else onnx_path
    try:
        model, fused = _optimize(onnx_path)
    except Exception as exc:  # the optimizer is heuristic pattern matching; never let it break a build
        log.warning("attention fusion of %s failed (%s: %s); building from the unfused graph",
                    onnx_path, type(exc).__name__, exc)
        return onnx_path
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".partial-", dir=folder.parent))
    try:
        if fused:
            external = onnx_path.with_name(onnx_path.name + ".data").exists()
            model.save_model_to_file(str(tmp / onnx_path.name), use_external_data_format=external,
                                     all_tensors_to_one_file=True)
        (tmp / FUSION_RECORD).write_text(json.dumps({"fused": fused}))
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("fused %d attention blocks of %s", fused, onnx_path.parent.name)
    return folder / onnx_path.name if fused else onnx_path


def _optimize(onnx_path: Path):
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    _patch_num_heads_for_numpy2()
    _quiet_optimizer_logs()
    options = FusionOptions("unet")
    for name in GPU_ONLY_FUSIONS:
        if hasattr(options, name):
            setattr(options, name, False)
    with contextlib.redirect_stderr(io.StringIO()):  # its tqdm bar would cut through our progress display
        model = optimize_model(str(onnx_path), model_type="unet", opt_level=0, optimization_options=options,
                               use_gpu=False)
    stats = model.get_fused_operator_statistics()
    return model, stats.get("Attention", 0) + stats.get("MultiHeadAttention", 0)


def _quiet_optimizer_logs() -> None:
    """The optimizer logs every pass at INFO under its own top-level module names."""
    folder = str(Path(_ort().__file__).parent / "transformers")
    for name, module in list(sys.modules.items()):
        if str(getattr(module, "__file__", "") or "").startswith(folder):
            logging.getLogger(name).setLevel(logging.WARNING)


def _patch_num_heads_for_numpy2() -> None:
    """ONNX Runtime's UNet attention fusion calls ``int()`` on a 1-element array, which NumPy 2.4
    refuses; read the head count from that array instead. (The optimizer imports its modules both
    as ``fusion_attention_unet`` and under ``onnxruntime.transformers``, so both are patched.)"""
    for name in ("fusion_attention_unet", "onnxruntime.transformers.fusion_attention_unet"):
        cls = getattr(sys.modules.get(name), "FusionAttentionUnet", None)
        if cls is None or getattr(cls.get_num_heads, "patched_by_dts", False):
            continue
        original = cls.get_num_heads

        def get_num_heads(self, reshape_q, is_torch2: bool = False, _original=original) -> int:
            try:
                return _original(self, reshape_q, is_torch2)
            except TypeError:
                parent = self.model.get_parent(reshape_q, 1)
                if parent is None or parent.op_type != "Concat" or len(parent.input) != 4:
                    return 0
                value = np.asarray(self.model.get_constant_value(parent.input[2]))
                return int(value.reshape(-1)[0]) if value.size == 1 else 0

        get_num_heads.patched_by_dts = True
        cls.get_num_heads = get_num_heads
