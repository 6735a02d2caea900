"""ONNX Runtime backend: a per-shape optimized model file is the engine.

Building runs ONNX Runtime's graph optimizer with every symbolic axis pinned to
the engine's shape (free-dimension overrides) and saves the optimized graph, so
loading it later skips that work and the shapes are static. It uses the CUDA
provider where onnxruntime-gpu is installed, and the CPU provider otherwise.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from dts_util.engines.backends.base import Backend, Runner, require

log = logging.getLogger(__name__)
EXTERNAL_DATA_MIN_BYTES = 1024  # with external data on, every initializer above this size goes there
PROTOBUF_LIMIT = 2 * 1024**3


def _ort():
    import onnxruntime

    return onnxruntime


def providers_for(device: str) -> list[str]:
    """CUDA provider for a CUDA device when onnxruntime-gpu has it; the CPU provider otherwise."""
    available = _ort().get_available_providers()
    if device.startswith("cuda") and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


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
        self.session = ort.InferenceSession(str(self.engine_path), options, providers=providers_for(self.device))
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
        ort = _ort()
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.optimized_model_filepath = str(engine_path)
        options.log_severity_level = 3
        for dim, value in free_dims.items():
            options.add_free_dimension_override_by_name(dim, value)
        written = [engine_path]
        if onnx_path.stat().st_size + _external_bytes(onnx_path) > PROTOBUF_LIMIT // 2:
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
