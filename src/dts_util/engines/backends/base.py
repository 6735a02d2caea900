"""The small interface every engine backend implements.

A ``Backend`` builds one engine file for one fixed shape, from an ONNX export
(``builds_from = "onnx"``: TensorRT, OpenVINO, ONNX Runtime) or straight from the
torch module (``builds_from = "torch"``: AOTInductor), and loads an engine file
into a ``Runner``. A ``Runner`` follows polygraphy's
template: public methods keep the state right (activate before infer, shape
checks), backends fill in the ``*_impl`` methods.
"""

from __future__ import annotations

import abc
import logging
import time
from pathlib import Path

import torch

from dts_util.errors import EngineBuildError

log = logging.getLogger(__name__)


class Runner(abc.ABC):
    """Runs one engine at its fixed input shapes; called like a pipeline component.

    Args:
        name: a label for logs (usually the engine file name).
        input_shapes: the exact shape of each named input.
        output_name: the single output's name.
        device: torch device the caller's tensors live on (outputs come back there).
    """

    backend = "engine"
    reason = ""  # engines are never a fallback

    def __init__(self, name: str, input_shapes: dict[str, tuple[int, ...]], output_name: str, device: str) -> None:
        self.name, self.input_shapes, self.output_name, self.device = name, input_shapes, output_name, device
        self.is_active = False
        self.last_inference_ms = 0.0

    def activate(self) -> "Runner":
        if not self.is_active:
            self.activate_impl()
            self.is_active = True
        return self

    def deactivate(self) -> None:
        if self.is_active:
            self.deactivate_impl()
            self.is_active = False

    def __enter__(self) -> "Runner":
        return self.activate()

    def __exit__(self, *exc: object) -> None:
        self.deactivate()

    def __call__(self, **inputs: torch.Tensor) -> torch.Tensor:
        if not self.is_active:
            raise RuntimeError(f"runner {self.name} was not activated")
        for name, expected in self.input_shapes.items():
            if name not in inputs:
                raise ValueError(f"runner {self.name}: missing input {name!r}")
            if tuple(inputs[name].shape) != tuple(expected):
                raise ValueError(f"runner {self.name}: input {name!r} has shape {tuple(inputs[name].shape)}, "
                                 f"the engine was built for {tuple(expected)}")
        start = time.perf_counter()
        output = self.infer_impl({name: inputs[name] for name in self.input_shapes})
        self.last_inference_ms = (time.perf_counter() - start) * 1000
        return output

    @abc.abstractmethod
    def activate_impl(self) -> None: ...

    @abc.abstractmethod
    def infer_impl(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor: ...

    def deactivate_impl(self) -> None:
        pass

    def __del__(self) -> None:
        if getattr(self, "is_active", False):
            log.debug("runner %s was never deactivated", getattr(self, "name", "?"))


class Backend(abc.ABC):
    """Builds and loads engines of one kind."""

    name: str
    engine_suffix: str
    builds_from = "onnx"  # or "torch": then ``build_from_module`` is called instead of ``build``

    @abc.abstractmethod
    def version(self) -> str: ...

    def check_precision(self, precision: str, device: str) -> None:
        """Raise EngineBuildError when this backend cannot build ``precision`` on ``device``."""

    def build(self, onnx_path: Path, input_shapes: dict[str, tuple[int, ...]], free_dims: dict[str, int],
              precision: str, engine_path: Path, device: str, cache_dir: Path) -> list[Path]:
        """From an ONNX export: write the engine at ``engine_path``; returns every file written (engine first)."""
        raise NotImplementedError(f"the {self.name} backend builds from {self.builds_from}, not ONNX")

    def build_from_module(self, module: torch.nn.Module, inputs: dict[str, torch.Tensor], precision: str,
                          engine_path: Path, device: str, cache_dir: Path) -> list[Path]:
        """From the fp32 CPU module and sample inputs at the engine's exact shapes; like ``build``."""
        raise NotImplementedError(f"the {self.name} backend builds from {self.builds_from}, not a torch module")

    @abc.abstractmethod
    def load(self, engine_path: Path, input_shapes: dict[str, tuple[int, ...]], output_name: str,
             device: str) -> Runner:
        """An (inactive) runner for the engine file; raises on a corrupt or unreadable file."""


def require(condition: bool, message: str) -> None:
    if not condition:
        raise EngineBuildError(message)
