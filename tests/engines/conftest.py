"""Engines built once per session for the built-in model: 128x128 and 256x256, batch 1 with CFG."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from dts_util.engines.builder import build, plan
from dts_util.models.loader import LoadedModel, load_model
from dts_util.models.store import ModelStore

BUILT_SIZES = [(128, 128), (256, 256)]


@pytest.fixture(scope="session")
def cpu_model(model_store: ModelStore) -> LoadedModel:
    return load_model("builtin-tiny-sd", model_store.model_path("builtin-tiny-sd"), "cpu")


@pytest.fixture(scope="session")
def built_engines(cpu_model: LoadedModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    engine_dir = tmp_path_factory.mktemp("built-engines")
    for job in plan(cpu_model, engine_dir, BUILT_SIZES, [1], backend_name="onnxruntime"):
        assert build(job, cpu_model, engine_dir).status == "built"
    return engine_dir


@pytest.fixture
def engine_dir(built_engines: Path, tmp_path: Path) -> Path:
    """A private copy of the built engines that a test may damage."""
    copy = tmp_path / "engines"
    shutil.copytree(built_engines, copy)
    return copy
