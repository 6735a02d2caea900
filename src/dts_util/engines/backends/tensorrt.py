"""TensorRT backend: a serialized plan per (component, resolution, batch), fp16 by default.

Building chains polygraphy's loaders, as NVIDIA's diffusion demo does:
``network_from_onnx_path`` -> ``CreateConfig(fp16, profiles=[Profile().add(name,
min=opt=max)])`` -> ``engine_from_network`` with a persistent timing cache, so a
second resolution builds faster than the first. Every profile has min = opt = max:
static shapes give TensorRT the most freedom.

The runtime uses the TensorRT 10 tensor-name API (``set_input_shape``,
``set_tensor_address``, ``execute_async_v3``) with torch CUDA tensors as the I/O
buffers, so nothing is copied through the host, and can capture the enqueue in a
CUDA graph to remove launch overhead.

This is the only module that imports ``tensorrt``, and it does so lazily.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from dts_util.atomic_files import atomic_path
from dts_util.engines.backends.base import Backend, Runner, require
from dts_util.errors import BackendUnavailable

log = logging.getLogger(__name__)
TIMING_CACHE = "timing.cache"


def _trt():
    try:
        import tensorrt
    except ImportError as exc:
        raise BackendUnavailable(f"the tensorrt package does not import ({exc}); install it with "
                                 "`pip install --extra-index-url https://pypi.nvidia.com tensorrt`") from exc
    return tensorrt


def _torch_dtype(trt_dtype) -> torch.dtype:
    trt = _trt()
    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16,
             trt.int32: torch.int32, trt.int64: torch.int64, trt.bool: torch.bool}
    return table[trt_dtype]


class TensorRTRunner(Runner):
    """Runs a deserialized plan on torch CUDA buffers, optionally replaying a captured CUDA graph.

    Args:
        use_cuda_graph: capture the first inference in a CUDA graph and replay it afterwards.
            Defaults to ``DTS_TRT_CUDA_GRAPH`` != "0".
    """

    backend = "tensorrt"

    def __init__(self, engine_path: Path, input_shapes: dict[str, tuple[int, ...]], output_name: str,
                 device: str, use_cuda_graph: bool | None = None) -> None:
        super().__init__(engine_path.name, input_shapes, output_name, device)
        self.engine_path = engine_path
        self.use_cuda_graph = os.environ.get("DTS_TRT_CUDA_GRAPH", "1") != "0" if use_cuda_graph is None \
            else use_cuda_graph
        self.graph: torch.cuda.CUDAGraph | None = None

    def activate_impl(self) -> None:
        require(self.device.startswith("cuda"), f"TensorRT engines run on CUDA devices, not {self.device!r}")
        # The engine's memory and context belong to the GPU that is current while it is deserialized:
        # make it this worker's.
        with torch.cuda.device(self.device):
            self._deserialize()

    def _deserialize(self) -> None:
        trt = _trt()
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.ERROR))
        self.engine = self.runtime.deserialize_cuda_engine(self.engine_path.read_bytes())
        if self.engine is None:
            raise RuntimeError(f"TensorRT could not deserialize {self.engine_path} (corrupt, or built by "
                               "another TensorRT version or GPU)")
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream(device=self.device)
        self.buffers: dict[str, torch.Tensor] = {}
        for index in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(index)
            if self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                self.context.set_input_shape(name, self.input_shapes[name])
        for index in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(index)
            shape = tuple(self.context.get_tensor_shape(name))
            buffer = torch.empty(shape, dtype=_torch_dtype(self.engine.get_tensor_dtype(name)), device=self.device)
            self.buffers[name] = buffer
            self.context.set_tensor_address(name, buffer.data_ptr())

    def deactivate_impl(self) -> None:
        self.graph = None
        del self.context, self.engine, self.runtime, self.buffers

    def infer_impl(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        with torch.cuda.device(self.device):
            return self._infer_on_device(inputs)

    def _infer_on_device(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        for name, value in inputs.items():
            self.buffers[name].copy_(value, non_blocking=True)
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        if self.graph is not None:
            self.graph.replay()
        else:
            self._enqueue()
            if self.use_cuda_graph:
                self._capture()
        torch.cuda.current_stream(self.device).wait_stream(self.stream)
        # The pipeline keeps its own dtype whatever precision the plan's I/O tensors have.
        output, dtype = self.buffers[self.output_name], next(iter(inputs.values())).dtype
        return output.to(dtype) if output.dtype != dtype else output.clone()

    def _enqueue(self) -> None:
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError(f"TensorRT execute_async_v3 failed for {self.name}")

    def _capture(self) -> None:
        """Record one enqueue into a CUDA graph; the buffers' addresses never change, so replay is exact."""
        try:
            graph = torch.cuda.CUDAGraph()
            # thread_local: another worker's GPU allocations meanwhile must not break this capture
            with torch.cuda.graph(graph, stream=self.stream, capture_error_mode="thread_local"):
                self._enqueue()
            self.graph = graph
        except RuntimeError as exc:  # some plugins cannot be captured; plain enqueue still works
            log.warning("CUDA graph capture failed for %s (%s); running without it", self.name, exc)
            self.use_cuda_graph = False


class TensorRTBackend(Backend):
    name = "tensorrt"
    engine_suffix = ".plan"

    def version(self) -> str:
        return _trt().__version__

    def check_precision(self, precision: str, device: str) -> None:
        require(precision in ("fp16", "fp32", "bf16"), f"tensorrt builds fp16, bf16 or fp32, not {precision}")
        require(device.startswith("cuda"), "tensorrt engines are built on, and for, a CUDA GPU")

    def build(self, onnx_path: Path, input_shapes: dict[str, tuple[int, ...]], free_dims: dict[str, int],
              precision: str, engine_path: Path, device: str, cache_dir: Path) -> list[Path]:
        self.check_precision(precision, device)
        from polygraphy.backend.trt import CreateConfig, Profile, engine_from_network, network_from_onnx_path, \
            save_engine

        profile = Profile()
        for name, shape in input_shapes.items():
            profile.add(name, min=shape, opt=shape, max=shape)
        # One timing cache per backend version and device: later builds reuse measured tactics.
        cache = cache_dir / TIMING_CACHE
        config = CreateConfig(fp16=precision == "fp16", bf16=precision == "bf16", tf32=precision == "fp32",
                              profiles=[profile], load_timing_cache=str(cache) if cache.exists() else None)
        network = network_from_onnx_path(str(onnx_path))
        # Builds sharing the cache may end together: each writes its own file and renames it into place.
        with atomic_path(cache) as updated:
            engine = engine_from_network(network, config=config, save_timing_cache=str(updated))
        save_engine(engine, path=str(engine_path))
        return [engine_path]

    def load(self, engine_path: Path, input_shapes: dict[str, tuple[int, ...]], output_name: str,
             device: str) -> Runner:
        return TensorRTRunner(engine_path, input_shapes, output_name, device)
