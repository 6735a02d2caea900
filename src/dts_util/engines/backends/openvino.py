"""OpenVINO backend (CPU): a static-shape OpenVINO IR per engine, compiled through OpenVINO's model cache.

Building reads the ONNX export, fixes every input to the engine's shape and saves the
IR (``.xml`` plus its ``.bin`` weights). Loading compiles it for the CPU with the
engine's precision as the inference-precision hint: ``bf16`` runs on AVX512_BF16 /
AMX hardware at several times the fp32 speed (measured 4.1x per SD1.5 UNet step on
such a 2-core host), ``fp32`` everywhere. Compiled blobs go to OpenVINO's model cache
beside the engines, so a restarted server loads them instead of compiling again.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from dts_util.engines.backends.base import Backend, Runner, require
from dts_util.engines.device import cpu_has_bf16

log = logging.getLogger(__name__)
PRECISION_HINTS = {"fp32": "f32", "bf16": "bf16"}
RT_INFO_PRECISION = "dts_precision"
CACHE_FOLDER = "openvino-cache"


def _ov():
    import openvino

    return openvino


def _core(cache_dir: Path | None):
    core = _ov().Core()
    if cache_dir is not None:
        cache_dir.mkdir(parents=True, exist_ok=True)
        core.set_property({"CACHE_DIR": str(cache_dir)})
    return core


def compile_config(precision: str) -> dict[str, str]:
    return {"INFERENCE_PRECISION_HINT": PRECISION_HINTS[precision], "PERFORMANCE_HINT": "LATENCY"}


class OpenVinoRunner(Runner):
    backend = "openvino"

    def __init__(self, engine_path: Path, input_shapes: dict[str, tuple[int, ...]], output_name: str,
                 device: str) -> None:
        super().__init__(engine_path.name, input_shapes, output_name, device)
        self.engine_path = engine_path
        self.request = None

    def activate_impl(self) -> None:
        core = _core(self.engine_path.parent / CACHE_FOLDER)
        model = core.read_model(str(self.engine_path))
        precision = model.get_rt_info(RT_INFO_PRECISION).astype(str) if model.has_rt_info(RT_INFO_PRECISION) else "fp32"
        # Compiled from the file path: that is what OpenVINO's model cache keys on.
        compiled = core.compile_model(str(self.engine_path), "CPU", compile_config(precision))
        self.request = compiled.create_infer_request()

    def deactivate_impl(self) -> None:
        self.request = None

    def infer_impl(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        feed = {name: value.detach().float().cpu().contiguous().numpy() for name, value in inputs.items()}
        self.request.infer(feed)
        output = np.array(self.request.get_output_tensor(0).data, dtype=np.float32, copy=True)
        return torch.from_numpy(output).to(self.device, next(iter(inputs.values())).dtype)


class OpenVinoBackend(Backend):
    name = "openvino"
    engine_suffix = ".xml"

    def version(self) -> str:
        return _ov().get_version().split("-")[0]

    def check_precision(self, precision: str, device: str) -> None:
        require(not device.startswith("cuda"), "openvino engines run on the CPU; use --backend tensorrt on a GPU")
        require(precision in PRECISION_HINTS, f"openvino engines are fp32 or bf16 (asked for {precision})")
        require(precision != "bf16" or cpu_has_bf16(),
                "bf16 needs a CPU with AVX512_BF16 or AMX; this one has neither: use --precision fp32")

    def build(self, onnx_path: Path, input_shapes: dict[str, tuple[int, ...]], free_dims: dict[str, int],
              precision: str, engine_path: Path, device: str, cache_dir: Path) -> list[Path]:
        self.check_precision(precision, device)
        ov = _ov()
        model = ov.Core().read_model(str(onnx_path))
        model.reshape({name: ov.PartialShape(list(shape)) for name, shape in input_shapes.items()})
        model.set_rt_info(precision, RT_INFO_PRECISION)
        ov.save_model(model, str(engine_path), compress_to_fp16=False)
        weights = engine_path.with_suffix(".bin")
        require(engine_path.is_file() and weights.is_file(), f"openvino wrote no IR at {engine_path}")
        return [engine_path, weights]

    def load(self, engine_path: Path, input_shapes: dict[str, tuple[int, ...]], output_name: str,
             device: str) -> Runner:
        return OpenVinoRunner(engine_path, input_shapes, output_name, device)
