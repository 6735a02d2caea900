"""AOTInductor engines: built from the torch module on the CPU, served through gRPC, matching eager."""

from __future__ import annotations

import io
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dts_util.engines.backends import resolve_backend, resolve_precision
from dts_util.engines.builder import build, plan
from dts_util.engines.manager import EngineManager
from dts_util.errors import EngineBuildError
from tests.conftest import ServerThread
from tests.engines.test_serving import MAX_PIXEL_DIFF, MEAN_PIXEL_DIFF


COMPONENTS = ("unet", "vae_decoder")


@pytest.fixture(scope="module")
def aoti_engines(cpu_model, tmp_path_factory) -> Path:
    engine_dir = tmp_path_factory.mktemp("aoti-engines")
    # The UNet and the VAE decoder: the encoder goes through the same export and compile (its engines are tested
    # with the other backends), and each package is a minute of inductor code generation on a 2-core CPU.
    results = [build(job, cpu_model, engine_dir) for job in plan(cpu_model, engine_dir, [(128, 128)], [1],
                                                                  backend_name="aotinductor", components=COMPONENTS)]
    assert [r.status for r in results] == ["built"] * 2, [r.error for r in results]
    assert all(r.rel_l2 < 1e-3 and r.export_seconds == 0.0 for r in results)  # no ONNX on this path
    return engine_dir


def _pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)), dtype=np.int16)


def test_a_request_at_the_built_shape_runs_on_aotinductor_and_matches_eager(aoti_engines, base_config,
                                                                            client) -> None:
    request = dict(prompt="a lighthouse", seed=5, width=128, height=128)
    with ServerThread(replace(base_config, engine_dir=aoti_engines), EngineManager(aoti_engines)) as server:
        with server.client() as engine_client:
            on_engine = engine_client.generate(**request)
    backends = json.loads(on_engine.info)["backends"]
    assert backends["unet"] == "aotinductor" and backends["vae_decoder"] == "aotinductor"
    diff = np.abs(_pixels(on_engine.images[0]) - _pixels(client.generate(**request).images[0]))
    assert diff.max() <= MAX_PIXEL_DIFF and diff.mean() <= MEAN_PIXEL_DIFF


def test_packages_are_keyed_by_torch_version_and_device(aoti_engines) -> None:
    manifests = [json.loads(p.read_text()) for p in aoti_engines.rglob("*.manifest.json")]
    assert {m["backend_version"] for m in manifests} == {f"torch{__import__('torch').__version__}"}
    assert all(m["device"]["kind"] == "cpu" and m["device"]["isa"] for m in manifests)
    assert all(Path(m["engine_file"]).suffix == ".pt2" for m in manifests)
    # Inductor's kernel cache sits beside the engines, so a rebuild or a new shape reuses it.
    assert any(aoti_engines.rglob(".inductor-cache"))


def test_a_second_build_skips_valid_packages(aoti_engines, cpu_model) -> None:
    jobs = plan(cpu_model, aoti_engines, [(128, 128)], [1], backend_name="aotinductor", components=COMPONENTS)
    assert [job.skip_reason for job in jobs] == ["valid engine exists"] * 2


def test_a_newer_torch_makes_packages_stale(aoti_engines, cpu_model, tmp_path) -> None:
    import shutil

    from dts_util.boundary import Shape

    engine_dir = tmp_path / "engines"
    shutil.copytree(aoti_engines, engine_dir)
    manager = EngineManager(engine_dir)
    manager._versions = {"aotinductor": "torch99.0"}  # what a server on another torch would see
    runner, reason = manager.runner_for(cpu_model, "vae_decoder", Shape(16, 16, 1))
    assert runner is None and "aotinductor engine stale" in reason


def test_auto_choices_on_this_machine() -> None:
    import torch

    if torch.cuda.is_available():
        assert resolve_backend("auto") in ("tensorrt", "aotinductor")
        assert resolve_precision("aotinductor", "auto", "cuda") == "fp16"
    assert resolve_precision("aotinductor", "auto", "cpu") == "fp32"


def test_fp16_is_refused_on_the_cpu(cpu_model, tmp_path) -> None:
    with pytest.raises(EngineBuildError, match="fp16 engines are for CUDA"):
        plan(cpu_model, tmp_path, [(128, 128)], [1], backend_name="aotinductor", precision="fp16", device="cpu")
