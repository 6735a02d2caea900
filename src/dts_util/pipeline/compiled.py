"""Opt-in ``torch.compile`` for the eager path (``serve --torch-compile``), with warm restarts.

On a CUDA GPU this uses mode "reduce-overhead", which captures CUDA graphs and
removes the kernel-launch overhead that bounds an eager SD UNet step; it is the
fast path on GPU hosts without TensorRT. On the CPU it compiles with Inductor's
default mode. Inductor's caches are kept under the engine directory
(``use_engine_dir_cache``), so a restarted server reuses the kernels and graphs it
compiled before instead of compiling again; the server compiles the shapes it is
told about while warming up, before health reports SERVING.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)
# Keyed weakly by module: an unloaded UNet takes its compiled wrapper with it.
_COMPILED = "_dts_compiled"  # the attribute holding a module's compiled wrapper
CACHE_FOLDER = "torch-compile-cache"


def use_engine_dir_cache(engine_dir: Path) -> Path:
    """Keep Inductor's on-disk caches in ``engine_dir`` (unless TORCHINDUCTOR_CACHE_DIR was set by the
    user), so they survive restarts and move with the engine cache. Call before anything compiles."""
    chosen = _user_cache_dir()
    if chosen:
        return Path(chosen)
    folder = Path(engine_dir) / CACHE_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)
    return folder


def _user_cache_dir() -> str:
    """The cache dir the user chose, or "": Inductor fills the variable with its default on first use."""
    from dts_util import USER_INDUCTOR_CACHE_DIR

    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR", "")
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir

        default = os.path.abspath(default_cache_dir())
    except ImportError:  # moved in another torch: trust only what was set before torch loaded
        default = os.path.abspath(current) if current else ""
    if current and os.path.abspath(current) == default:
        current = ""
    return USER_INDUCTOR_CACHE_DIR or current


def compile_mode(device: torch.device) -> str:
    return "reduce-overhead" if device.type == "cuda" else "default"


def compiled_module(module: torch.nn.Module) -> Any:
    """The compiled wrapper of ``module``, created once per module object.

    Compilation happens on the first call at each new input shape (from the disk cache when an
    earlier run compiled it); the server's warm-up makes that call for the configured shapes.
    """
    compiled = module.__dict__.get(_COMPILED)
    if compiled is None:
        device = next(module.parameters()).device
        mode = compile_mode(device)
        log.info("torch.compile %s (mode=%s)", type(module).__name__, mode)
        compiled = torch.compile(module, mode=mode, dynamic=False)
        # Kept on the module itself (outside its submodules): the wrapper holds the module, so the two form a
        # cycle the garbage collector frees together when the model is unloaded or evicted. A table keyed by
        # the module would keep both alive for good.
        module.__dict__[_COMPILED] = compiled
    return compiled
