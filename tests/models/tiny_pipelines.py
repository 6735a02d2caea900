"""Tiny seeded SD1.x, SD2.x and SDXL pipelines and their single-file conversions, for tests: the builder
lives in tools/make_tiny_checkpoint.py (users try the single-file path with it too)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

_TOOL = Path(__file__).resolve().parents[2] / "tools" / "make_tiny_checkpoint.py"


def _load():
    if "make_tiny_checkpoint" not in sys.modules:
        spec = importlib.util.spec_from_file_location("make_tiny_checkpoint", _TOOL)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    return sys.modules["make_tiny_checkpoint"]


build = _load().build
single_file = _load().single_file
