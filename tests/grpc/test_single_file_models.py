"""Single-file checkpoints end to end: uploaded through gRPC, listed, generated from, built into engines.

Tiny SD1.x, SD2.x and SDXL pipelines are converted to the original single-file layout by the
project's own converter (tools/convert_to_single_file.py); each file must give the same images as
the same weights in the diffusers layout.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from dts_util.client import Client
from tests.models.tiny_pipelines import build, single_file

REQUEST = dict(prompt="a lighthouse on a cliff", negative_prompt="blurry", width=64, height=64, steps=3, seed=11,
               cfg_scale=5.0, sampler="Euler")


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory) -> dict[str, Path]:
    """For each family: the diffusers folder and its .safetensors; SD1 also as .ckpt and fp16."""
    root = tmp_path_factory.mktemp("tiny")
    files = {}
    for family in ("sd1", "sd2", "sdxl"):
        folder = build(family, root / f"tiny-{family}")
        files[family] = folder
        files[f"{family}.safetensors"] = single_file(folder, root / f"tiny-{family}.safetensors")
    files["sd1.ckpt"] = single_file(files["sd1"], root / "tiny-sd1.ckpt")
    files["sd1.fp16"] = single_file(files["sd1"], root / "tiny-sd1-fp16.safetensors", "fp16")
    return files


def _pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)


@pytest.fixture
def store_server(make_server):
    return make_server(own_store=True, max_upload_bytes=1 << 30, max_loaded_models=4)


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_uploaded_checkpoint_gives_the_diffusers_folders_images(store_server, tiny_files, family) -> None:
    root = store_server.service.store.root
    shutil.copytree(tiny_files[family], root / f"folders/tiny-{family}")
    name = f"checkpoints/tiny-{family}.safetensors"
    with store_server.client(timeout=300) as client:
        assert client.upload(tiny_files[f"{family}.safetensors"], name).size > 0
        assert name in client.echo().models  # no restart needed
        from_file = client.generate(model=name, **REQUEST)
        from_folder = client.generate(model=f"folders/tiny-{family}", **REQUEST)
    # The same weights through two loaders: equal up to float rounding (SDXL's differs by one level in three
    # pixels with the libraries of December 2026; it was exact before).
    difference = np.abs(_pixels(from_file.images[0]) - _pixels(from_folder.images[0]))
    assert difference.max() <= 1 and difference.mean() < 0.01
    info = json.loads(from_file.info)
    assert info["model"] == name and info["model_file"] == "single file"
    expected = "v_prediction" if family == "sd2" else "epsilon"
    assert info["prediction_type"] == expected and "family default" in info["prediction_source"]
    import hashlib

    assert info["model_fingerprint"] == hashlib.sha256(tiny_files[f"{family}.safetensors"].read_bytes()).hexdigest()


def test_ckpt_and_fp16_files_load_into_the_servers_dtype(store_server, tiny_files) -> None:
    root = store_server.service.store.root
    shutil.copy(tiny_files["sd1.safetensors"], root / "a.safetensors")
    shutil.copy(tiny_files["sd1.ckpt"], root / "b.ckpt")
    shutil.copy(tiny_files["sd1.fp16"], root / "c-fp16.safetensors")
    with store_server.client(timeout=300) as client:
        base = _pixels(client.generate(model="a.safetensors", **REQUEST).images[0])
        assert np.array_equal(base, _pixels(client.generate(model="b.ckpt", **REQUEST).images[0]))
        half = _pixels(client.generate(model="c-fp16.safetensors", **REQUEST).images[0])
    assert half.shape == base.shape and np.abs(half - base).mean() < 8  # fp16 weights, fp32 compute


def test_a_ckpt_that_needs_arbitrary_pickles_is_refused(store_server, tmp_path) -> None:
    import torch

    from tests.models import pickle_bomb

    path = store_server.service.store.root / "evil.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)},
                "payload": pickle_bomb.Payload()}, path)
    with store_server.client() as client:
        with pytest.raises(grpc.RpcError) as caught:
            client.generate(model="evil.ckpt", prompt="x", steps=1)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "never executes" in caught.value.details() and not pickle_bomb.EXECUTED


def test_sidecar_yaml_chooses_the_prediction_type(store_server, tiny_files) -> None:
    root = store_server.service.store.root
    shutil.copy(tiny_files["sd2.safetensors"], root / "sd2-base.safetensors")
    (root / "sd2-base.yaml").write_text("model:\n  params:\n    parameterization: eps\n")
    shutil.copy(tiny_files["sd1.safetensors"], root / "sd1-v.safetensors")
    (root / "sd1-v.safetensors.dts.json").write_text('{"prediction_type": "v_prediction"}')
    with store_server.client(timeout=300) as client:
        sd2 = json.loads(client.generate(model="sd2-base.safetensors", **REQUEST).info)
        sd1 = json.loads(client.generate(model="sd1-v.safetensors", **REQUEST).info)
    assert sd2["prediction_type"] == "epsilon" and sd2["prediction_source"] == "sidecar sd2-base.yaml"
    assert sd1["prediction_type"] == "v_prediction" and sd1["prediction_source"] == "setting sd1-v.safetensors.dts.json"


def test_engines_for_an_uploaded_checkpoint(store_server, tiny_files, tmp_path) -> None:
    from typer.testing import CliRunner

    from dts_util.cli import app
    from dts_util.engines.manager import EngineManager

    name = "checkpoints/engine-me.safetensors"
    with store_server.client(timeout=300) as client:
        client.upload(tiny_files["sd1.safetensors"], name)
    engines = Path(store_server.config.engine_dir)
    result = CliRunner().invoke(app, ["build-engines", "--model", name, "--resolution", "64x64", "--backend", "onnxruntime",
                                      "--model-path", str(store_server.service.store.root),
                                      "--engine-dir", str(engines)])
    assert result.exit_code == 0, result.output
    store_server.service.engines = EngineManager(engines)
    try:
        with store_server.client(timeout=300) as client:
            reply = client.generate(model=name, **REQUEST)
            eager = client.generate(model=name, **{**REQUEST, "width": 72})
    finally:
        store_server.service.engines.close()
        store_server.service.engines = None
    backends = json.loads(reply.info)["backends"]
    assert backends["unet"] == "onnxruntime" and backends["vae_decoder"] == "onnxruntime"
    assert json.loads(eager.info)["backends"]["unet"].startswith("eager")


def test_refiner_and_unknown_unet_checkpoints_are_refused(store_server) -> None:
    from safetensors.torch import save_file
    import torch

    root = store_server.service.store.root
    unet_in = "model.diffusion_model.input_blocks.0.0.weight"
    save_file({unet_in: torch.zeros(32, 5, 3, 3)}, root / "depth.safetensors")
    save_file({unet_in: torch.zeros(32, 4, 3, 3), "conditioner.embedders.0.model.token_embedding.weight":
               torch.zeros(10, 8)}, root / "refiner.safetensors")
    with store_server.client() as client:
        for name, words in (("depth.safetensors", "5 input channels"), ("refiner.safetensors", "refiner")):
            with pytest.raises(grpc.RpcError) as caught:
                client.generate(model=name, prompt="x", steps=1)
            assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION and words in caught.value.details()


def test_loras_and_vaes_are_not_listed_as_models(store_server, tiny_files) -> None:
    from safetensors.torch import save_file
    import torch

    root = store_server.service.store.root
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32)},
              root / "a-lora.safetensors")
    shutil.copy(tiny_files["sd1.safetensors"], root / "real.safetensors")
    with store_server.client() as client:
        models = client.echo().models
    assert "real.safetensors" in models and "a-lora.safetensors" not in models
    assert not any(m.startswith("builtin-tiny-sd/") for m in models)


def test_loading_a_checkpoint_opens_no_socket(tiny_files, tmp_path, monkeypatch) -> None:
    import socket

    from dts_util.models.loader import load_model

    def refuse(*args, **kwargs):
        raise AssertionError("a network connection was attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    model = load_model("x.safetensors", tiny_files["sdxl.safetensors"], "cpu", config_cache=tmp_path / "configs")
    assert model.unet() is not None and model.vae() is not None and len(model.prompt_encoders().text_encoders) == 2


def test_client_sees_same_images_through_the_client_class(store_server, tiny_files) -> None:
    """The CLI's Client (what `dts-util generate --model` uses) selects single files too."""
    shutil.copy(tiny_files["sd1.safetensors"], store_server.service.store.root / "cli.safetensors")
    with Client(store_server.target, 300) as client:
        assert client.generate(model="cli.safetensors", **REQUEST).images


def test_a_checkpoint_can_be_the_default_model(make_server, tiny_files, model_store, tmp_path) -> None:
    from tests.conftest import fresh_store

    root = fresh_store(model_store, tmp_path / "default")
    (root / "checkpoints").mkdir()
    shutil.copy(tiny_files["sdxl.safetensors"], root / "checkpoints/xl.safetensors")
    server = make_server(model_dir=root, default_model="./checkpoints/xl.safetensors")
    with server.client(timeout=300) as client:
        info = json.loads(client.generate(prompt="x", width=64, height=64, steps=2, seed=1).info)
        assert client.echo().default_model == "./checkpoints/xl.safetensors"
    assert info["model"] == "checkpoints/xl.safetensors" and info["model_file"] == "single file"
