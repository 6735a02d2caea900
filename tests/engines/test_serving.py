"""Serving through a real gRPC channel: engines where they match, eager with a reason elsewhere."""

from __future__ import annotations

import io
import json
import logging
import threading
import time
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from dts_util.engines.builder import build, plan
from dts_util.engines.manager import EngineManager
from tests.conftest import ServerThread

# Engine (ONNX Runtime, fp32) and eager PyTorch differ only by float rounding; after 20 steps and
# 8-bit quantization that is at most a couple of levels on a few pixels.
MAX_PIXEL_DIFF = 3
MEAN_PIXEL_DIFF = 0.05


def _pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)), dtype=np.int16)


@pytest.fixture
def engine_server(base_config, engine_dir):
    config = replace(base_config, engine_dir=engine_dir)
    with ServerThread(config, EngineManager(engine_dir)) as running:
        yield running


@pytest.mark.parametrize("size", [128, 256])
def test_request_at_built_resolution_runs_on_engines_and_matches_eager(engine_server, client, size) -> None:
    request = dict(prompt="a harbour", seed=21, width=size, height=size)
    with engine_server.client() as engine_client:
        on_engine = engine_client.generate(**request)
    eager = client.generate(**request)  # the session server runs without engines
    info = json.loads(on_engine.info)
    assert info["backends"]["unet"] == "onnxruntime" and info["backends"]["vae_decoder"] == "onnxruntime"
    events = [json.loads(e) for e in on_engine.events]
    assert {e.get("backend") for e in events if e["event"] in ("sampling", "imageDecoded")} == {"onnxruntime"}
    assert json.loads(eager.info)["backends"]["unet"] == "eager"
    diff = np.abs(_pixels(on_engine.images[0]) - _pixels(eager.images[0]))
    assert diff.max() <= MAX_PIXEL_DIFF and diff.mean() <= MEAN_PIXEL_DIFF


def test_other_resolution_falls_back_to_eager_with_reason(engine_server, caplog) -> None:
    with engine_server.client() as c, caplog.at_level(logging.INFO, logger="dts_util.requests"):
        reply = c.generate(prompt="x", seed=1, steps=2, width=192, height=128)
    backends = json.loads(reply.info)["backends"]
    assert backends["unet"] == "eager (no engine for 192x128 b2)"
    events = [json.loads(e) for e in reply.events]
    assert events[1]["event"] == "sampling" and events[1]["backend"] == "eager (no engine for 192x128 b2)"
    assert backends["vae_decoder"] == "eager (no engine for 192x128 b1)"
    line = next(r.message for r in caplog.records if r.message.startswith("GenerateImage OK"))
    assert "size=192x128" in line and "unet=eager (no engine for 192x128 b2)" in line


def test_without_cfg_the_unet_batch_is_one(engine_server) -> None:
    with engine_server.client() as c:
        backends = json.loads(c.generate(prompt="x", steps=2, width=128, height=128, cfg_scale=1).info)["backends"]
    assert backends["unet"] == "eager (no engine for 128x128 b1)" and backends["vae_decoder"] == "onnxruntime"


def test_eager_unet_is_not_resident_while_an_engine_serves(engine_server) -> None:
    with engine_server.client() as c:
        c.generate(prompt="x", steps=2, width=192, height=192)  # eager: loads the UNet
        assert engine_server.service.model("").is_loaded("unet")
        c.generate(prompt="x", steps=2, width=128, height=128)  # engine: drops it
        assert not engine_server.service.model("").is_loaded("unet")


def test_engines_built_while_serving_are_picked_up(engine_server, cpu_model, engine_dir) -> None:
    with engine_server.client() as c:
        before = json.loads(c.generate(prompt="x", steps=2, width=64, height=64).info)["backends"]
        assert before["vae_decoder"].startswith("eager")
        for job in plan(cpu_model, engine_dir, [(64, 64)], [1], components=("vae_decoder",), backend_name="onnxruntime"):
            build(job, cpu_model, engine_dir)
        after = json.loads(c.generate(prompt="x", steps=2, width=64, height=64).info)["backends"]
    assert after["vae_decoder"] == "onnxruntime"


def test_build_missing_builds_in_background(base_config, engine_dir) -> None:
    manager = EngineManager(engine_dir, build_missing=True)
    with ServerThread(replace(base_config, engine_dir=engine_dir), manager) as running, running.client() as c:
        first = json.loads(c.generate(prompt="x", steps=2, width=96, height=64).info)["backends"]
        assert first["unet"] == "eager (no engine for 96x64 b2; background build queued)"
        manager.builds.wait()
        second = json.loads(c.generate(prompt="x", steps=2, width=96, height=64).info)["backends"]
    from dts_util.engines.backends import resolve_backend

    auto = resolve_backend("auto")  # background builds use the machine's default backend
    assert second == {"text_encoder": "eager", "unet": auto, "vae_decoder": auto}


def test_corrupt_engine_never_crashes_the_server(engine_server, engine_dir) -> None:
    for engine in engine_dir.rglob("unet-fp32-256x256-b2.onnx"):
        engine.write_bytes(b"not an onnx model")
    with engine_server.client() as c:
        reply = c.generate(prompt="x", steps=2, width=256, height=256)
        assert "unreadable" in json.loads(reply.info)["backends"]["unet"]
        assert c.echo().message == "HELLO"


def test_background_builds_are_bounded_and_a_failed_one_backs_off(cpu_model, tmp_path, monkeypatch) -> None:
    from dts_util.boundary import Shape
    from dts_util.engines.manager import BackgroundBuilds

    builds = BackgroundBuilds(tmp_path, max_queued=1, max_pixels=256 * 256, retry_after=60)
    attempts = []
    gate = threading.Event()

    def failing_build(model, component, shape):
        attempts.append(shape)
        gate.wait(10)
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(builds, "_build", failing_build)
    try:
        assert builds.why_not(cpu_model, "unet", Shape(64, 64, 2)).startswith("too large for a background build")
        assert builds.why_not(cpu_model, "unet", Shape(16, 16, 2)) == ""  # queued (the worker takes it)
        assert builds.why_not(cpu_model, "unet", Shape(16, 16, 2)) == "background build already queued"
        while not attempts:
            time.sleep(0.01)
        assert builds.why_not(cpu_model, "unet", Shape(24, 24, 1)) == ""  # waits behind the running one
        assert builds.why_not(cpu_model, "unet", Shape(32, 32, 1)) == "background build queue full"
        gate.set()
        builds.wait()
        assert builds.why_not(cpu_model, "unet", Shape(16, 16, 2)).startswith("background build failed 1x, retried in")
    finally:
        gate.set()
        builds.stop()


def test_a_failed_background_build_is_recorded_for_engines_list(cpu_model, model_store, tmp_path,
                                                                monkeypatch) -> None:
    from typer.testing import CliRunner

    import dts_util.engines.builder as builder
    from dts_util.boundary import Shape
    from dts_util.cli import app
    from dts_util.engines.manager import BackgroundBuilds, failed_builds

    monkeypatch.setattr(builder, "build", lambda job, model, engine_dir: builder.BuildResult(
        job, "failed", error="the compiler ran out of memory"))
    builds = BackgroundBuilds(tmp_path)
    try:
        assert builds.request(cpu_model, "vae_decoder", Shape(8, 8, 1))
        builds.wait()
    finally:
        builds.stop()
    [failure] = failed_builds(tmp_path)
    assert failure["component"] == "vae_decoder" and "ran out of memory" in failure["error"]
    listed = CliRunner().invoke(app, ["engines", "list", "--engine-dir", str(tmp_path), "--model-path",
                                      str(model_store.root)])
    assert "failed build" in listed.output and "ran out of memory" in listed.output
