"""VAE encoder engines, and inpainting UNets' 9-channel engines, served through gRPC and matching eager."""

from __future__ import annotations

import io
import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from dts_util.engines.builder import build, plan
from dts_util.engines.manager import EngineManager
from dts_util.models.loader import load_model
from tests.conftest import ServerThread
from tests.engines.test_serving import MAX_PIXEL_DIFF, MEAN_PIXEL_DIFF, _pixels
from tests.models.tiny_pipelines import build as build_tiny


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def _inputs(size: int) -> tuple[bytes, bytes]:
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (size, size, 3), dtype=np.uint8))
    mask = Image.new("L", (size, size))
    mask.paste(255, (size // 4, size // 4, 3 * size // 4, 3 * size // 4))
    return _png(image), _png(mask)


def test_vae_encoder_engines_are_validated_like_the_others(built_engines) -> None:
    manifests = [json.loads(p.read_text()) for p in built_engines.rglob("vae_encoder-*.manifest.json")]
    assert {m["resolution"] for m in manifests} == {"128x128", "256x256"}
    for manifest in manifests:
        side = int(manifest["resolution"].split("x")[0])
        assert manifest["input_shapes"]["image"] == [1, 3, side, side]  # once per request, whatever the batch
        assert manifest["validation"]["rel_l2"] < manifest["validation"]["tolerance"]


@pytest.mark.parametrize("mode", ["img2img", "inpaint"])
def test_img2img_and_inpainting_run_on_engines_and_match_eager(base_config, engine_dir, client, mode) -> None:
    image, mask = _inputs(128)
    request = dict(prompt="a harbour", seed=21, steps=10, denoising_strength=0.6, init_image=image,
                   mask=mask if mode == "inpaint" else b"", skip_mask_overlay=True)
    with ServerThread(replace(base_config, engine_dir=engine_dir), EngineManager(engine_dir)) as server:
        with server.client() as engine_client:
            on_engine = engine_client.generate(**request)
    eager = client.generate(**request)
    backends = json.loads(on_engine.info)["backends"]
    assert backends == {"text_encoder": "eager", "vae_encoder": "onnxruntime", "unet": "onnxruntime",
                        "vae_decoder": "onnxruntime"}
    assert json.loads(eager.info)["backends"]["vae_encoder"] == "eager"
    diff = np.abs(_pixels(on_engine.images[0]) - _pixels(eager.images[0]))
    assert diff.max() <= MAX_PIXEL_DIFF and diff.mean() <= MEAN_PIXEL_DIFF


def test_without_an_encoder_engine_it_falls_back_with_its_reason(base_config, engine_dir) -> None:
    for path in engine_dir.rglob("vae_encoder-*.manifest.json"):
        path.unlink()  # an engine without its manifest is no engine
    image, _ = _inputs(128)
    with ServerThread(replace(base_config, engine_dir=engine_dir), EngineManager(engine_dir)) as server:
        with server.client() as engine_client:
            info = json.loads(engine_client.generate(prompt="x", steps=2, seed=1, init_image=image).info)
    assert info["backends"]["vae_encoder"] == "eager (no engine for 128x128 b1)"
    assert info["backends"]["unet"] == "onnxruntime"


def test_an_inpainting_unet_gets_engines_of_its_own_input_shape(base_config, model_store, tmp_path) -> None:
    store = tmp_path / "models"
    shutil.copytree(model_store.root / "builtin-tiny-sd", store / "builtin-tiny-sd")
    folder = build_tiny("sd1", store / "tiny-inpaint", inpainting=True)
    engines = tmp_path / "engines"
    model = load_model("tiny-inpaint", folder, "cpu")
    jobs = plan(model, engines, [(64, 64)], [1], backend_name="onnxruntime")
    assert all(build(job, model, engines).status == "built" for job in jobs)
    unet = json.loads(next(engines.rglob("unet-*.manifest.json")).read_text())
    assert unet["input_shapes"]["sample"] == [2, 9, 8, 8]  # latents, mask and masked image, per CFG branch
    image, mask = _inputs(64)
    request = dict(model="tiny-inpaint", prompt="x", seed=4, steps=6, init_image=image, mask=mask,
                   skip_mask_overlay=True)
    config = replace(base_config, model_dir=store, engine_dir=engines)
    with ServerThread(config, EngineManager(engines)) as server, server.client() as engine_client:
        on_engine = engine_client.generate(**request)
    with ServerThread(replace(config, engine_dir=tmp_path / "none")) as server, server.client() as eager_client:
        eager = eager_client.generate(**request)
    assert set(json.loads(on_engine.info)["backends"].values()) == {"eager", "onnxruntime"}  # text encoder eager
    diff = np.abs(_pixels(on_engine.images[0]) - _pixels(eager.images[0]))
    assert diff.max() <= MAX_PIXEL_DIFF and diff.mean() <= MEAN_PIXEL_DIFF
