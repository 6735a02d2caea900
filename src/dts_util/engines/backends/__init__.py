"""Engine backends behind one small interface (``base.py``).

Each backend module is the only importer of its runtime (``tensorrt``,
``onnxruntime``), and imports it lazily, so dts-util starts and serves eagerly on
machines where neither is installed.
"""

from __future__ import annotations

from dts_util.errors import BackendUnavailable

BACKENDS = ("tensorrt", "onnxruntime")


def tensorrt_available() -> tuple[bool, str]:
    """(True, "") when tensorrt imports and torch sees a CUDA GPU, else (False, why not)."""
    try:
        import tensorrt  # noqa: F401
    except ImportError as exc:
        return False, f"the tensorrt package does not import ({exc}); install it from NVIDIA's index"
    import torch

    if not torch.cuda.is_available():
        return False, "tensorrt imports but torch sees no CUDA GPU"
    return True, ""


def onnxruntime_available() -> tuple[bool, str]:
    try:
        import onnxruntime  # noqa: F401
    except ImportError as exc:
        return False, f"the onnxruntime package does not import ({exc})"
    return True, ""


AVAILABILITY = {"tensorrt": tensorrt_available, "onnxruntime": onnxruntime_available}


def available_backend_versions() -> dict[str, str]:
    """{backend: version} for every backend that can run on this machine."""
    return {name: get_backend(name).version() for name in BACKENDS if AVAILABILITY[name]()[0]}


def resolve_backend(name: str) -> str:
    """"auto" -> tensorrt when it can run here, else onnxruntime; a named backend is checked."""
    if name == "auto":
        return "tensorrt" if tensorrt_available()[0] else "onnxruntime"
    if name not in AVAILABILITY:
        raise BackendUnavailable(f"unknown backend {name!r}; choose one of auto, {', '.join(BACKENDS)}")
    ok, why = AVAILABILITY[name]()
    if not ok:
        raise BackendUnavailable(f"backend {name!r} cannot run here: {why}")
    return name


def get_backend(name: str):
    """The backend module object (``Backend`` instance) for a resolved backend name."""
    if name == "tensorrt":
        from dts_util.engines.backends.tensorrt import TensorRTBackend

        return TensorRTBackend()
    from dts_util.engines.backends.onnxruntime import OnnxRuntimeBackend

    return OnnxRuntimeBackend()
