"""Which device an engine was built for, in a form that can be compared later.

A TensorRT plan only runs on the GPU architecture it was built on, and an ONNX
Runtime model optimized at the highest level can hold CPU-specific kernels (its
NCHWc layouts depend on the vector ISA), so both are keyed by device.
"""

from __future__ import annotations

import hashlib
import platform
import re
from functools import lru_cache

ISA_FLAGS = ("avx512f", "avx512_bf16", "amx_tile", "avx2", "fma", "neon", "asimd", "sve")


def _cpu_model_and_flags() -> tuple[str, list[str]]:
    name, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as fh:
            text = fh.read()
        if match := re.search(r"^(model name|Model|CPU part)\s*:\s*(.+)$", text, re.M):
            name = match.group(2).strip()
        if match := re.search(r"^(flags|Features)\s*:\s*(.+)$", text, re.M):
            flags = set(match.group(2).split())
    except OSError:
        pass
    return name, sorted(f for f in ISA_FLAGS if f in flags)


@lru_cache(maxsize=8)
def device_info(device: str) -> dict:
    """A description of ``device`` ("cpu", "cuda", "cuda:1") that engines are keyed by."""
    if device.startswith("cuda"):
        import torch

        index = torch.device(device).index or 0
        major, minor = torch.cuda.get_device_capability(index)
        return {"kind": "cuda", "name": torch.cuda.get_device_name(index), "capability": f"{major}.{minor}"}
    name, flags = _cpu_model_and_flags()
    return {"kind": "cpu", "name": name, "machine": platform.machine(), "isa": flags}


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512_BF16 or AMX), where bf16 engines and eager bf16 pay."""
    _, flags = _cpu_model_and_flags()
    return "avx512_bf16" in flags or "amx_tile" in flags


def device_fingerprint(info: dict) -> str:
    """A stable string: equal fingerprints mean an engine built on one runs on the other."""
    if info["kind"] == "cuda":
        return f"cuda:{info['name']}:sm{info['capability']}"
    isa = hashlib.sha256(",".join(info["isa"]).encode()).hexdigest()[:8]
    return f"cpu:{info['machine']}:{info['name']}:{isa}"


def device_tag(info: dict) -> str:
    """A short folder name for the device (the full fingerprint lives in each manifest)."""
    if info["kind"] == "cuda":
        return f"sm{info['capability'].replace('.', '')}-{info['name']}"
    return f"cpu-{info['machine']}-{hashlib.sha256(device_fingerprint(info).encode()).hexdigest()[:8]}"
