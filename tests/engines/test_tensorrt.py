"""TensorRT backend: runs where tensorrt imports and a CUDA GPU is present (marker `tensorrt`)."""

from __future__ import annotations

import pytest
import torch

from dts_util.engines.builder import build, plan
from dts_util.engines.manager import EngineManager
from dts_util.boundary import Shape

pytestmark = pytest.mark.tensorrt


def test_fp16_unet_and_vae_engines_build_and_validate(cpu_model, tmp_path) -> None:
    jobs = plan(cpu_model, tmp_path, [(128, 128)], [1], backend_name="tensorrt", precision="fp16")
    assert [(j.component.name, j.backend.name) for j in jobs] == [
        ("unet", "tensorrt"), ("vae_decoder", "tensorrt"), ("vae_encoder", "tensorrt")]  # the plan's three
    for job in jobs:
        result = build(job, cpu_model, tmp_path)
        assert result.status == "built" and result.rel_l2 < 3e-2
        assert result.manifest["device"]["kind"] == "cuda"
    assert (jobs[0].paths.engine.parent / "timing.cache").is_file()


def test_cuda_graph_replay_matches_plain_enqueue(cpu_model, tmp_path) -> None:
    from dts_util.engines.backends.tensorrt import TensorRTRunner
    from dts_util.engines.components import get_component

    job = plan(cpu_model, tmp_path, [(128, 128)], [1], backend_name="tensorrt", components=("unet",))[0]
    build(job, cpu_model, tmp_path)
    spec = get_component("unet")
    shapes = spec.input_shapes(cpu_model.info, job.shape)
    inputs = {k: v.cuda() for k, v in spec.sample_inputs(cpu_model.info, job.shape, seed=5).items()}
    with TensorRTRunner(job.paths.engine, shapes, "noise_pred", "cuda", use_cuda_graph=False) as plain, \
            TensorRTRunner(job.paths.engine, shapes, "noise_pred", "cuda", use_cuda_graph=True) as graphed:
        expected = plain(**inputs)
        graphed(**inputs)  # captures
        assert graphed.graph is not None
        assert torch.equal(graphed(**inputs), expected)


def test_manager_prefers_tensorrt_on_gpu(cpu_model, tmp_path) -> None:
    from dts_util.models.loader import load_model

    for job in plan(cpu_model, tmp_path, [(128, 128)], [1], backend_name="tensorrt", components=("unet",)):
        build(job, cpu_model, tmp_path)
    gpu_model = load_model(cpu_model.name, cpu_model.info.path, "cuda")
    runner, reason = EngineManager(tmp_path).runner_for(gpu_model, "unet", Shape(16, 16, 2))
    assert runner is not None and runner.backend == "tensorrt" and reason == ""


def test_corrupt_plan_is_refused(cpu_model, tmp_path) -> None:
    from dts_util.engines.backends.tensorrt import TensorRTRunner

    bad = tmp_path / "bad.plan"
    bad.write_bytes(b"\x00" * 64)
    with pytest.raises(RuntimeError, match="could not deserialize"):
        TensorRTRunner(bad, {"latent": (1, 4, 16, 16)}, "image", "cuda").activate()
