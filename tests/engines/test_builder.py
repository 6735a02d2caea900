"""Build planning, skipping valid engines, atomic output, backend choice and errors."""

from __future__ import annotations

import pytest

from dts_util.engines.backends import resolve_backend, tensorrt_available
from dts_util.engines.builder import build, parse_resolution, plan, unet_batches
from dts_util.errors import BackendUnavailable, EngineBuildError, InvalidRequest


def test_plan_builds_unet_at_cfg_batch_vae_decoder_at_image_batch_and_encoder_at_one(cpu_model, tmp_path) -> None:
    jobs = plan(cpu_model, tmp_path, [(512, 256)], [2], backend_name="onnxruntime")
    assert [(j.component.name, j.key.resolution, j.shape.batch) for j in jobs] == \
        [("unet", "512x256", 4), ("vae_decoder", "512x256", 2), ("vae_encoder", "512x256", 1)]
    assert jobs[0].shape.latent_width == 64 and jobs[0].shape.latent_height == 32
    assert all(j.backend.name == "onnxruntime" and j.precision == "fp32" for j in jobs)


def test_unet_batches() -> None:
    assert unet_batches(2, "cfg") == [4] and unet_batches(2, "no-cfg") == [2] and unet_batches(1, "both") == [2, 1]


def test_valid_engines_are_skipped(cpu_model, built_engines) -> None:
    jobs = plan(cpu_model, built_engines, [(128, 128)], [1], backend_name="onnxruntime")
    assert [j.skip_reason for j in jobs] == ["valid engine exists"] * 3
    assert all(build(j, cpu_model, built_engines).status == "skipped" for j in jobs)


def test_truncated_engine_is_rebuilt(cpu_model, engine_dir) -> None:
    job = plan(cpu_model, engine_dir, [(128, 128)], [1], components=("vae_decoder",), backend_name="onnxruntime")[0]
    job.paths.engine.write_bytes(job.paths.engine.read_bytes()[:100])
    job = plan(cpu_model, engine_dir, [(128, 128)], [1], components=("vae_decoder",), backend_name="onnxruntime")[0]
    assert job.skip_reason == ""
    result = build(job, cpu_model, engine_dir)
    assert result.status == "built" and result.rel_l2 < 1e-3
    assert not list(engine_dir.rglob(".partial*"))


@pytest.mark.parametrize("text", ["512", "512x", "100x512", "4096x512", "axb"])
def test_bad_resolutions(text: str) -> None:
    with pytest.raises(InvalidRequest, match="resolution"):
        parse_resolution(text)


def test_auto_backend_and_unavailable_tensorrt(monkeypatch) -> None:
    import torch

    from dts_util.engines import backends

    if tensorrt_available()[0]:
        assert resolve_backend("auto") == "tensorrt"
        return
    expected = "onnxruntime" if torch.cuda.is_available() or not backends.openvino_available()[0] else "openvino"
    assert resolve_backend("auto") == expected
    monkeypatch.setattr(backends, "openvino_available", lambda: (False, "not installed"))
    monkeypatch.setitem(backends.AVAILABILITY, "openvino", backends.openvino_available)
    assert resolve_backend("auto") == "onnxruntime"  # the CPU falls back when openvino is missing
    with pytest.raises(BackendUnavailable, match="backend 'openvino' cannot run here: not installed"):
        resolve_backend("openvino")
    with pytest.raises(BackendUnavailable, match="backend 'tensorrt' cannot run here"):
        resolve_backend("tensorrt")
    with pytest.raises(BackendUnavailable, match="unknown backend"):
        resolve_backend("coreml")


def test_onnxruntime_refuses_fp16(cpu_model, tmp_path) -> None:
    with pytest.raises(EngineBuildError, match="onnxruntime engines are fp32"):
        plan(cpu_model, tmp_path, [(128, 128)], [1], backend_name="onnxruntime", precision="fp16")


def test_runner_checks_input_shapes(engine_dir, cpu_model) -> None:
    import torch

    from dts_util.engines.manager import EngineManager
    from dts_util.boundary import Shape

    runner, _ = EngineManager(engine_dir).runner_for(cpu_model, "vae_decoder", Shape(16, 16, 1))
    with pytest.raises(ValueError, match=r"has shape \(1, 4, 8, 8\), the engine was built for \(1, 4, 16, 16\)"):
        runner(latent=torch.zeros(1, 4, 8, 8))


def test_onnxruntime_unet_engine_has_fused_attention(built_engines) -> None:
    import json

    import onnx

    fused = {p.parent.name: json.loads(p.read_text())["fused"] for p in built_engines.rglob("fusion.json")}
    assert fused["unet-fp32"] == 8 and fused["vae_decoder-fp32"] == 0  # the VAE has no LayerNorm attention
    engine = next(built_engines.rglob("unet-fp32-128x128-b2.onnx"))
    ops = {node.op_type for node in onnx.load(str(engine), load_external_data=False).graph.node}
    assert "MultiHeadAttention" in ops or "Attention" in ops


def test_failed_fusion_falls_back_to_the_unfused_graph(cpu_model, tmp_path, monkeypatch, caplog) -> None:
    import logging

    from dts_util.engines.backends import onnxruntime as ort_backend

    def broken(path):
        raise TypeError("optimizer broke")

    monkeypatch.setattr(ort_backend, "_optimize", broken)
    job = plan(cpu_model, tmp_path, [(64, 64)], [1], components=("unet",), backend_name="onnxruntime")[0]
    with caplog.at_level(logging.WARNING):
        result = build(job, cpu_model, tmp_path)
    assert result.status == "built" and result.rel_l2 < 1e-3
    assert any("attention fusion of" in r.message and "unfused graph" in r.message for r in caplog.records)
