"""Tiny seeded SD1.x, SD2.x and SDXL pipelines and their single-file conversions, for tests: the builder
lives in tools/make_tiny_checkpoint.py (users try the single-file path with it too)."""

from __future__ import annotations

from tests.tools import load_tool

build = load_tool("make_tiny_checkpoint").build
single_file = load_tool("make_tiny_checkpoint").single_file
