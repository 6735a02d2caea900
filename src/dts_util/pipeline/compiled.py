"""Opt-in ``torch.compile`` for the eager path (``serve --torch-compile``).

On a CUDA GPU this uses mode "reduce-overhead", which captures CUDA graphs and
removes the kernel-launch overhead that bounds an eager SD UNet step; it is the
fast path on GPU hosts without TensorRT. On the CPU it compiles with Inductor's
default mode.
"""

from __future__ import annotations

import logging
import weakref
from typing import Any

import torch

log = logging.getLogger(__name__)
# Keyed weakly by module: an unloaded UNet takes its compiled wrapper with it.
_compiled: "weakref.WeakKeyDictionary[torch.nn.Module, Any]" = weakref.WeakKeyDictionary()


def compile_mode(device: torch.device) -> str:
    return "reduce-overhead" if device.type == "cuda" else "default"


def compiled_module(module: torch.nn.Module) -> Any:
    """The compiled wrapper of ``module``, created once per module object.

    Compilation happens on the first call at each new input shape, so the first
    request at a new resolution is slow; later ones replay.
    """
    if module not in _compiled:
        device = next(module.parameters()).device
        mode = compile_mode(device)
        log.info("torch.compile %s (mode=%s)", type(module).__name__, mode)
        _compiled[module] = torch.compile(module, mode=mode, dynamic=False)
    return _compiled[module]
