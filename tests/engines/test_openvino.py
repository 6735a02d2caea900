"""OpenVINO engines for the built-in model: fp32 and bf16, whole-image agreement with eager fp32,
the model cache, invalidation when OpenVINO's version changes, and fallback when it is missing."""

from __future__ import annotations

import io
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dts_util.engines import backends
from dts_util.engines.builder import build, plan
from dts_util.engines.device import cpu_has_bf16
from dts_util.engines.manager import EngineManager
from tests.conftest import ServerThread

pytestmark = pytest.mark.skipif(not backends.openvino_available()[0], reason="openvino is not installed")
SIZE = 128
REQUEST = dict(prompt="a harbour at night", seed=21, width=SIZE, height=SIZE, steps=20)
# Whole images after 20 steps, against eager fp32 (8-bit pixels). fp32 engines differ by float rounding
# only. bf16 keeps 8 bits of mantissa, so its error is larger and grows along the denoising trajectory;
# measured on the built-in model at 64x64: at most 3 levels, 0.4 on average.
BOUNDS = {"fp32": (3, 0.05), "bf16": (24, 2.0)}


def _pixels(reply) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(reply.images[0])).convert("RGB"), dtype=np.int16)


@pytest.fixture(scope="module", params=["fp32", "bf16"])
def openvino_engines(request, cpu_model, tmp_path_factory) -> tuple[str, Path]:
    precision = request.param
    if precision == "bf16" and not cpu_has_bf16():
        pytest.skip("this CPU has neither AVX512_BF16 nor AMX: bf16 engines are not built here")
    engine_dir = tmp_path_factory.mktemp(f"openvino-{precision}")
    for job in plan(cpu_model, engine_dir, [(SIZE, SIZE)], [1], backend_name="openvino", precision=precision):
        assert build(job, cpu_model, engine_dir).status == "built"
    return precision, engine_dir


def test_images_on_openvino_engines_agree_with_eager(openvino_engines, base_config, client) -> None:
    precision, engine_dir = openvino_engines
    with ServerThread(replace(base_config, engine_dir=engine_dir), EngineManager(engine_dir)) as server:
        with server.client() as engine_client:
            on_engine = engine_client.generate(**REQUEST)
    eager = client.generate(**REQUEST)
    backends_used = json.loads(on_engine.info)["backends"]
    assert backends_used["unet"] == "openvino" and backends_used["vae_decoder"] == "openvino"
    difference = np.abs(_pixels(on_engine) - _pixels(eager))
    max_diff, mean_diff = BOUNDS[precision]
    assert difference.max() <= max_diff and difference.mean() <= mean_diff, (difference.max(), difference.mean())


def test_the_compiled_model_is_cached_on_disk(openvino_engines, cpu_model) -> None:
    _, engine_dir = openvino_engines
    engine = next(engine_dir.rglob("unet-*.xml"))
    runner_shapes = json.loads(engine.with_name(engine.name[:-4] + ".manifest.json").read_text())["input_shapes"]
    shapes = {name: tuple(dims) for name, dims in runner_shapes.items()}
    backend = backends.get_backend("openvino")
    start = time.perf_counter()
    with backend.load(engine, shapes, "noise_pred", "cpu"):
        first = time.perf_counter() - start
    cache = engine.parent / "openvino-cache"
    blobs = sorted(p.name for p in cache.iterdir())
    assert blobs, "no compiled model in OpenVINO's cache"
    start = time.perf_counter()
    with backend.load(engine, shapes, "noise_pred", "cpu"):  # a restart: loaded from the cache
        second = time.perf_counter() - start
    assert sorted(p.name for p in cache.iterdir()) == blobs
    assert second < first * 1.5 + 0.5


def test_engines_of_another_openvino_version_are_stale(openvino_engines, cpu_model, monkeypatch) -> None:
    _, engine_dir = openvino_engines
    from dts_util.engines.backends.openvino import OpenVinoBackend

    monkeypatch.setattr(OpenVinoBackend, "version", lambda self: "2099.1.0")
    manager = EngineManager(engine_dir)
    try:
        runner, reason = manager.runner_for(cpu_model, "unet", _unet_shape(cpu_model))
    finally:
        manager.close()
    assert runner is None and "built with openvino 2026" in reason and "this is 2099.1.0" in reason, reason


def test_without_openvino_the_cpu_falls_back_to_onnxruntime(openvino_engines, cpu_model, monkeypatch) -> None:
    _, engine_dir = openvino_engines
    monkeypatch.setattr(backends, "openvino_available", lambda: (False, "not installed"))
    monkeypatch.setitem(backends.AVAILABILITY, "openvino", backends.openvino_available)
    assert backends.resolve_backend("auto") == "onnxruntime"
    manager = EngineManager(engine_dir)
    try:
        runner, reason = manager.runner_for(cpu_model, "unet", _unet_shape(cpu_model))
    finally:
        manager.close()
    assert runner is None and "openvino" in reason


def test_precision_auto_and_unsupported_precisions(cpu_model, tmp_path) -> None:
    from dts_util.errors import EngineBuildError

    jobs = plan(cpu_model, tmp_path, [(SIZE, SIZE)], [1], backend_name="openvino", components=("vae_decoder",))
    assert jobs[0].precision == ("bf16" if cpu_has_bf16() else "fp32")
    with pytest.raises(EngineBuildError, match="fp32 or bf16"):
        plan(cpu_model, tmp_path, [(SIZE, SIZE)], [1], backend_name="openvino", precision="fp16")


def _unet_shape(model):
    from dts_util.boundary import Shape

    side = SIZE // model.info.vae_scale_factor
    return Shape(side, side, 2)
