"""Engine backends behind one small interface (``base.py``), described in one table.

Each backend module is the only importer of its runtime (``tensorrt``,
``openvino``, ``onnxruntime``; AOTInductor is part of torch) and imports it lazily,
so dts-util starts and serves eagerly on machines where none is installed.
``BACKEND_TABLE`` says, per backend, where it lives, what its engine files end
with, how to tell whether it can run here, where it builds and at which precision
by default; its order is the preference when several engines fit a request (engines of CPU and GPU
backends never compete: each is keyed by its device). On the CPU openvino measured fastest, and
aotinductor's end-to-end time was on a par with onnxruntime's (README, Benchmarks). The
backend class itself says what it builds from (an ONNX export or the torch module).
Adding a backend is one module and one row here.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

from dts_util.errors import BackendUnavailable


def _imports(module: str) -> tuple[bool, str]:
    try:
        importlib.import_module(module)
    except ImportError as exc:
        return False, f"the {module} package does not import ({exc})"
    return True, ""


def tensorrt_available() -> tuple[bool, str]:
    """(True, "") when tensorrt imports and torch sees a CUDA GPU, else (False, why not)."""
    ok, why = _imports("tensorrt")
    if not ok:
        return False, f"{why}; install it from NVIDIA's index"
    import torch

    if not torch.cuda.is_available():
        return False, "tensorrt imports but torch sees no CUDA GPU"
    return True, ""


def openvino_available() -> tuple[bool, str]:
    ok, why = _imports("openvino")
    return (True, "") if ok else (False, f"{why}; `pip install openvino` (or dts-util[openvino])")


def onnxruntime_available() -> tuple[bool, str]:
    return _imports("onnxruntime")


def aotinductor_available() -> tuple[bool, str]:
    import torch

    if not hasattr(torch, "_inductor") or not hasattr(torch._inductor, "aoti_compile_and_package"):
        return False, f"torch {torch.__version__} has no AOTInductor packaging (needs torch 2.6 or later)"
    return True, ""


def _cuda_present() -> bool:
    import torch

    return torch.cuda.is_available()


def _cpu_precision(device: str) -> str:
    from dts_util.engines.device import cpu_has_bf16

    return "bf16" if cpu_has_bf16() else "fp32"


def _onnxruntime_build_device() -> str:
    """ONNX Runtime engines run on the GPU only where onnxruntime-gpu's CUDA provider is installed."""
    from dts_util.engines.backends.onnxruntime import providers_for

    return "cuda" if _cuda_present() and len(providers_for("cuda")) > 1 else "cpu"


@dataclass(frozen=True)
class BackendEntry:
    """One backend: its module and class, engine file suffix, availability check, where it builds by
    default, and its default precision for a build device."""

    name: str
    module: str
    cls: str
    engine_suffix: str
    available: Callable[[], tuple[bool, str]]
    build_device: Callable[[], str]
    auto_precision: Callable[[str], str]
    # Caches the backend keeps beside its engines (globs under an engine folder), removable at any time.
    caches: tuple[str, ...] = ()


BACKEND_TABLE = (
    BackendEntry("tensorrt", "dts_util.engines.backends.tensorrt", "TensorRTBackend", ".plan", tensorrt_available,
                 lambda: "cuda", lambda device: "fp16"),
    BackendEntry("openvino", "dts_util.engines.backends.openvino", "OpenVinoBackend", ".xml", openvino_available,
                 lambda: "cpu", _cpu_precision, caches=("openvino-cache",)),
    BackendEntry("aotinductor", "dts_util.engines.backends.aotinductor", "AOTInductorBackend", ".pt2",
                 aotinductor_available, lambda: "cuda" if _cuda_present() else "cpu",
                 lambda device: "fp16" if device.startswith("cuda") else "fp32", caches=(".inductor-cache",)),
    BackendEntry("onnxruntime", "dts_util.engines.backends.onnxruntime", "OnnxRuntimeBackend", ".onnx",
                 onnxruntime_available, _onnxruntime_build_device, lambda device: "fp32", caches=("fused/*",)),
)
BACKENDS = tuple(entry.name for entry in BACKEND_TABLE)
ENTRIES = {entry.name: entry for entry in BACKEND_TABLE}
AVAILABILITY = {entry.name: entry.available for entry in BACKEND_TABLE}


def available_backend_versions() -> dict[str, str]:
    """{backend: version} for every backend that can run on this machine."""
    return {name: get_backend(name).version() for name in BACKENDS if AVAILABILITY[name]()[0]}


def resolve_backend(name: str) -> str:
    """"auto": on a CUDA machine tensorrt where it imports, else aotinductor; on the CPU openvino when
    installed, else onnxruntime. A named backend is checked."""
    if name == "auto":
        if _cuda_present():
            return "tensorrt" if tensorrt_available()[0] else "aotinductor"
        return "openvino" if openvino_available()[0] else "onnxruntime"
    if name not in ENTRIES:
        raise BackendUnavailable(f"unknown backend {name!r}; choose one of auto, {', '.join(BACKENDS)}")
    ok, why = AVAILABILITY[name]()
    if not ok:
        raise BackendUnavailable(f"backend {name!r} cannot run here: {why}")
    return name


def resolve_precision(backend: str, precision: str, device: str) -> str:
    """"auto": fp16 for TensorRT and for AOTInductor on CUDA, bf16 for OpenVINO where the CPU has
    AVX512_BF16 or AMX, else fp32."""
    return ENTRIES[backend].auto_precision(device) if precision == "auto" else precision


def default_build_device(backend: str) -> str:
    """Where engines of ``backend`` are built and will run unless a device is given."""
    return ENTRIES[backend].build_device()


def get_backend(name: str):
    """The ``Backend`` instance for a resolved backend name."""
    entry = ENTRIES[name]
    return getattr(importlib.import_module(entry.module), entry.cls)()
