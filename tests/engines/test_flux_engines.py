"""FLUX engines through the same build tool and registry: the transformer and the 16-channel VAE per resolution
for every backend that runs here, picked up by a serving server and matching eager within the SD engines' tolerance;
other shapes fall back to eager with a reason, and --build-missing builds them."""

from __future__ import annotations

import io
import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from dts_util.engines.builder import build, plan
from dts_util.engines.manager import BackgroundBuilds, EngineManager
from dts_util.models.loader import load_model
from tests.conftest import ServerThread, fresh_store

MAX_PIXEL_DIFF, MEAN_PIXEL_DIFF = 3, 0.05  # as the SD engines (test_serving.py)
REQUEST = dict(model="flux/tiny-dev", prompt="a lighthouse at night", seed=3, steps=4, width=64, height=64)


def _pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)


@pytest.fixture(scope="module")
def flux_store(model_store, tiny_flux, tmp_path_factory):
    root = fresh_store(model_store, tmp_path_factory.mktemp("flux-engines"))
    shutil.copytree(tiny_flux, root / "flux" / "tiny-dev")
    return root


@pytest.fixture(scope="module")
def flux_model(flux_store):
    return load_model("flux/tiny-dev", flux_store / "flux" / "tiny-dev", "cpu")


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino", "aotinductor"])
def test_every_component_builds_per_resolution_within_tolerance(flux_model, tmp_path, backend) -> None:
    if backend == "openvino":
        pytest.importorskip("openvino")
    if backend == "onnxruntime":
        jobs = plan(flux_model, tmp_path, [(64, 64), (96, 64)], [1], backend_name=backend)
        assert {job.component.name for job in jobs} == {"transformer", "vae_decoder", "vae_encoder"}
    else:  # the VAE's descriptors are SD's, built per backend by the SD engine tests; the transformer is new
        jobs = plan(flux_model, tmp_path, [(64, 64)], [1], backend_name=backend, components=("transformer",))
    transformer = next(job for job in jobs if job.component.name == "transformer")
    assert transformer.shape.text_length == 512 and transformer.shape.batch == 1  # true CFG is a call of its own
    for job in jobs:
        result = build(job, flux_model, tmp_path)
        assert result.status == "built", result.error


def test_a_server_runs_flux_on_its_engines_and_matches_eager(base_config, flux_store, flux_model, tmp_path) -> None:
    engine_dir = tmp_path / "engines"
    for job in plan(flux_model, engine_dir, [(64, 64)], [1], backend_name="onnxruntime"):
        assert build(job, flux_model, engine_dir).status == "built"
    config = replace(base_config, model_dir=flux_store, engine_dir=engine_dir)
    with ServerThread(config, EngineManager(engine_dir)) as running, running.client(timeout=300) as client:
        on_engines = client.generate(**REQUEST)
        img2img = client.generate(**{**REQUEST, "init_image": on_engines.images[0], "denoising_strength": 0.5})
        other_size = client.generate(**{**REQUEST, "width": 80})
    with ServerThread(replace(config, engine_dir=tmp_path / "none")) as running, running.client(timeout=300) as client:
        eager = client.generate(**REQUEST)
    backends = json.loads(on_engines.info)["backends"]
    assert backends["transformer"] == "onnxruntime" and backends["vae_decoder"] == "onnxruntime", backends
    assert json.loads(img2img.info)["backends"]["vae_encoder"] == "onnxruntime"
    assert json.loads(other_size.info)["backends"]["transformer"] == "eager (no engine for 80x64 b1 t512)"
    diff = np.abs(_pixels(on_engines.images[0]) - _pixels(eager.images[0]))
    assert diff.max() <= MAX_PIXEL_DIFF and diff.mean() <= MEAN_PIXEL_DIFF


def test_build_missing_builds_the_flux_shape_a_request_needed(base_config, flux_store, tmp_path) -> None:
    engine_dir = tmp_path / "engines"
    builds = BackgroundBuilds(engine_dir)
    config = replace(base_config, model_dir=flux_store, engine_dir=engine_dir)
    with ServerThread(config, EngineManager(engine_dir, builds=builds)) as running, \
            running.client(timeout=300) as client:
        first = json.loads(client.generate(**{**REQUEST, "steps": 1}).info)["backends"]
        assert first["transformer"] == "eager (no engine for 64x64 b1 t512; background build queued)"
        builds.wait()
        second = json.loads(client.generate(**{**REQUEST, "steps": 1}).info)["backends"]
    assert second["transformer"] != "eager" and not second["transformer"].startswith("eager"), second
