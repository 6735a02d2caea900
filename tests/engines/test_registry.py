"""Registry invalidation: changed weights, device or backend version, and corrupt manifests or engines."""

from __future__ import annotations

import json
import logging

import pytest

from dts_util.engines.manager import EngineManager
from dts_util.engines.registry import EngineRegistry
from dts_util.boundary import Shape

UNET_128 = Shape(16, 16, 2)


def _manifest(engine_dir, name: str):
    return next(engine_dir.rglob(f"{name}.manifest.json"))


def _edit(path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_matching_engine_is_selected(engine_dir, cpu_model) -> None:
    runner, reason = EngineManager(engine_dir).runner_for(cpu_model, "unet", UNET_128)
    assert runner is not None and runner.backend == "onnxruntime" and reason == ""


def test_no_engine_for_other_shape_says_which(engine_dir, cpu_model) -> None:
    runner, reason = EngineManager(engine_dir).runner_for(cpu_model, "unet", Shape(24, 16, 2))
    assert runner is None and reason == "no engine for 128x192 b2"


@pytest.mark.parametrize("changes,expected", [
    (dict(model_fingerprint="0" * 64), "built for other weights"),
    (dict(device_fingerprint="cuda:NVIDIA H100:sm9.0"), "built for device cuda:NVIDIA H100:sm9.0"),
    (dict(backend_version="0.0.1"), "built with onnxruntime 0.0.1"),
])
def test_stale_engine_is_ignored_with_a_warning(engine_dir, cpu_model, caplog, changes, expected) -> None:
    _edit(_manifest(engine_dir, "unet-fp32-128x128-b2"), **changes)
    with caplog.at_level(logging.WARNING):
        runner, reason = EngineManager(engine_dir).runner_for(cpu_model, "unet", UNET_128)
    assert runner is None and expected in reason
    assert any(expected in r.message and "engine ignored" in r.message for r in caplog.records)


def test_changed_model_weights_invalidate_engines(engine_dir, cpu_model, model_store, tmp_path) -> None:
    import shutil

    from dts_util.models.loader import load_model

    copy = tmp_path / "builtin-tiny-sd"
    shutil.copytree(model_store.model_path("builtin-tiny-sd"), copy)
    weights = copy / "vae" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one changed byte of weights is another model
    weights.write_bytes(bytes(data))
    changed = load_model("builtin-tiny-sd", copy, "cpu")
    assert changed.fingerprint != cpu_model.fingerprint
    runner, reason = EngineManager(engine_dir).runner_for(changed, "unet", UNET_128)
    assert runner is None and "built for other weights" in reason


@pytest.mark.parametrize("garbage", [b"{not json", b'{"format": 99}', b'{"format": 1}'])
def test_corrupt_manifest_is_skipped(engine_dir, cpu_model, caplog, garbage: bytes) -> None:
    _manifest(engine_dir, "unet-fp32-128x128-b2").write_bytes(garbage)
    with caplog.at_level(logging.WARNING):
        registry = EngineRegistry(engine_dir)
        names = [r.engine_path.name for r in registry.records()]
    assert "unet-fp32-128x128-b2.onnx" not in names and "unet-fp32-256x256-b2.onnx" in names
    assert any("engine skipped" in r.message for r in caplog.records)


def test_corrupt_engine_file_falls_back_and_is_logged(engine_dir, cpu_model, caplog) -> None:
    record = EngineRegistry(engine_dir).matching("builtin-tiny-sd", "unet", UNET_128)[0]
    record.engine_path.write_bytes(b"\x00garbage" * 100)
    manager = EngineManager(engine_dir)
    with caplog.at_level(logging.ERROR):
        runner, reason = manager.runner_for(cpu_model, "unet", UNET_128)
    assert runner is None and "unreadable" in reason
    assert any("could not be loaded and is skipped" in r.message for r in caplog.records)
    # asked again, it is not retried (no second error) until the file changes
    caplog.clear()
    assert manager.runner_for(cpu_model, "unet", UNET_128)[0] is None
    assert not caplog.records


def test_new_manifests_are_picked_up_without_restart(engine_dir, cpu_model) -> None:
    manager = EngineManager(engine_dir)
    manifest = _manifest(engine_dir, "vae_decoder-fp32-128x128-b1")
    hidden = manifest.with_name("hidden.json")
    manifest.rename(hidden)
    assert manager.runner_for(cpu_model, "vae_decoder", Shape(16, 16, 1))[0] is None
    hidden.rename(manifest)
    assert manager.runner_for(cpu_model, "vae_decoder", Shape(16, 16, 1))[0] is not None
