"""AOTInductor backend: ``torch.export`` at the engine's exact shapes, compiled ahead of time into one
``.pt2`` package that loads without recompiling.

It builds from the torch module, not from ONNX, so it runs wherever torch does: on
CUDA it is the compiled path when TensorRT is not installed, and on the CPU it lets
CI build and serve a compiled engine with the built-in model. Inductor's own
caches live under the engine folder, so rebuilding an engine, or another shape of
the same model, reuses kernels that were already compiled.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import warnings
from pathlib import Path
from typing import Iterator

import torch

from dts_util.engines.backends.base import Backend, Runner, require

log = logging.getLogger(__name__)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Inputs that stay fp32 whatever the engine's precision (diffusers casts the timestep embedding itself).
FP32_INPUTS = ("timestep",)
CACHE_FOLDER = ".inductor-cache"


@contextlib.contextmanager
def inductor_cache(folder: Path) -> Iterator[None]:
    """Point Inductor's on-disk caches at ``folder`` for one build, then back where they were.

    Inductor reads the variable on each cache lookup (and sets it itself on first use), so it is
    swapped for the build rather than only set when absent.
    """
    previous = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
        else:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = previous


def engine_inputs(inputs: dict[str, torch.Tensor], device: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {name: value.to(device, torch.float32 if name in FP32_INPUTS else dtype).contiguous()
            for name, value in inputs.items()}


class AOTInductorRunner(Runner):
    """Runs a compiled ``.pt2`` package; optionally replays it inside a CUDA graph.

    Args:
        use_cuda_graph: capture the first inference on CUDA and replay it afterwards. Off unless
            ``DTS_AOTI_CUDA_GRAPH=1``: it is kept only where the GPU check measures it faster.
    """

    backend = "aotinductor"

    def __init__(self, engine_path: Path, input_shapes: dict[str, tuple[int, ...]], output_name: str,
                 device: str, use_cuda_graph: bool | None = None) -> None:
        super().__init__(engine_path.name, input_shapes, output_name, device)
        self.engine_path = engine_path
        self.use_cuda_graph = device.startswith("cuda") and (
            os.environ.get("DTS_AOTI_CUDA_GRAPH", "0") == "1" if use_cuda_graph is None else use_cuda_graph)
        self.graph: torch.cuda.CUDAGraph | None = None

    def activate_impl(self) -> None:
        index = (torch.device(self.device).index or 0) if self.device.startswith("cuda") else -1
        # Single-threaded runs (each runner belongs to one worker thread) are what CUDA graphs need.
        self.package = torch._inductor.aoti_load_package(str(self.engine_path), device_index=index,
                                                         run_single_threaded=self.use_cuda_graph)
        metadata = self.package.get_metadata()
        self.dtype = DTYPES[metadata.get("dts_precision", "fp32")]
        require(metadata.get("dts_device_kind", "cpu") == self.device.split(":")[0],
                f"{self.engine_path.name} was compiled for {metadata.get('dts_device_kind')}, not {self.device}")

    def deactivate_impl(self) -> None:
        self.graph = None
        del self.package

    def infer_impl(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        caller_dtype = next(iter(inputs.values())).dtype
        ready = engine_inputs(inputs, self.device, self.dtype)
        if self.use_cuda_graph:
            output = self._replay(ready)
        else:
            output = self._run(ready)
        return output.to(caller_dtype) if output.dtype != caller_dtype else output

    def _run(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        output = self.package(**inputs)
        return output[0] if isinstance(output, (list, tuple)) else output

    def _replay(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Copy into the captured graph's static inputs and replay; capture on first use."""
        if self.graph is None:
            self.static_inputs = {name: value.clone() for name, value in inputs.items()}
            self._run(self.static_inputs)  # warm-up outside capture: lazy initialisation must not be recorded
            torch.cuda.synchronize(self.device)
            try:
                graph = torch.cuda.CUDAGraph()
                # thread_local: another worker's GPU allocations meanwhile must not break this capture
                with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                    self.static_output = self._run(self.static_inputs)
                self.graph = graph
            except RuntimeError as exc:
                log.warning("CUDA graph capture failed for %s (%s); running without it", self.name, exc)
                self.use_cuda_graph = False
                return self._run(inputs)
        for name, value in inputs.items():
            self.static_inputs[name].copy_(value)
        self.graph.replay()
        return self.static_output.clone()


class AOTInductorBackend(Backend):
    name = "aotinductor"
    engine_suffix = ".pt2"
    builds_from = "torch"

    def version(self) -> str:
        # Packages run only under the torch that compiled them.
        return f"torch{torch.__version__}"

    def check_precision(self, precision: str, device: str) -> None:
        from dts_util.engines.device import cpu_has_bf16

        require(precision in DTYPES, f"aotinductor builds {', '.join(DTYPES)}, not {precision!r}")
        if not device.startswith("cuda"):
            require(precision != "fp16", "aotinductor fp16 engines are for CUDA; on the CPU use fp32 (or bf16)")
            require(precision != "bf16" or cpu_has_bf16(),
                    "aotinductor bf16 on the CPU needs AVX512_BF16 or AMX; this CPU has neither (use fp32)")

    def build_from_module(self, module: torch.nn.Module, inputs: dict[str, torch.Tensor], precision: str,
                          engine_path: Path, device: str, cache_dir: Path) -> list[Path]:
        self.check_precision(precision, device)
        dtype = DTYPES[precision]
        if device != "cpu" or dtype != torch.float32:
            # The caller's module stays the fp32 CPU reference that validation compares against.
            module = copy.deepcopy(module).to(device, dtype)
        example = engine_inputs(inputs, device, dtype)
        metadata = {"dts_precision": precision, "dts_device_kind": device.split(":")[0]}
        with torch.inference_mode(False), torch.no_grad(), inductor_cache(cache_dir / CACHE_FOLDER), \
                warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.export's own deprecation notices
            exported = torch.export.export(module.eval(), args=(), kwargs=example)
            torch._inductor.aoti_compile_and_package(exported, package_path=str(engine_path),
                                                     inductor_configs={"aot_inductor.metadata": metadata})
        require(engine_path.is_file(), f"AOTInductor wrote no package at {engine_path}")
        return [engine_path]

    def load(self, engine_path: Path, input_shapes: dict[str, tuple[int, ...]], output_name: str,
             device: str) -> Runner:
        return AOTInductorRunner(engine_path, input_shapes, output_name, device)
