"""LoRA files and long prompts through a real server: applied per request, exact at weight 0, engines
for a LoRA set and for longer text, A1111 emphasis, clip skip."""

from __future__ import annotations

import io
import json
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from dts_util.grpc.proto import image_generation_pb2 as pb
from tests.models.tiny_lora import write_kohya_lora

BASE = dict(prompt="a red lighthouse", width=64, height=64, steps=3, seed=21, sampler="Euler")
LONG_PROMPT = "red " * 100  # 100 tokens: two chunks


def _pixels(reply: pb.ImageGenerationResponse) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(reply.images[0])).convert("RGB"), dtype=np.int16)


@pytest.fixture(scope="module")
def lora_server(base_config, model_store, tmp_path_factory):
    from dataclasses import replace

    from tests.conftest import ServerThread, fresh_store

    root = fresh_store(model_store, tmp_path_factory.mktemp("lora"))
    with ServerThread(replace(base_config, model_dir=root, engine_dir=tmp_path_factory.mktemp("engines"),
                              max_upload_bytes=1 << 28)) as server:
        model = server.service.model("builtin-tiny-sd")
        encoders = model.prompt_encoders().text_encoders
        write_kohya_lora(root / "loras/style.safetensors", model.unet(), encoders)
        write_kohya_lora(root / "loras/other.safetensors", model.unet(), encoders, seed=8)
        (root / "loras/broken.safetensors").write_bytes(b"not safetensors")
        (root / "loras/not-a-lora.safetensors").write_bytes((root / "builtin-tiny-sd/vae").joinpath(
            "diffusion_pytorch_model.safetensors").read_bytes())
        yield server


def _generate(server, **fields) -> pb.ImageGenerationResponse:
    with server.client(timeout=300) as client:
        return client.generate(**{**BASE, **fields})


def test_a_lora_changes_the_image_and_is_removed_after_the_request(lora_server) -> None:
    base = _pixels(_generate(lora_server))
    styled = _generate(lora_server, loras=[pb.LoraWeight(file="loras/style.safetensors", weight=0.8)])
    assert np.abs(_pixels(styled) - base).mean() > 1
    info = json.loads(styled.info)
    assert info["loras"][0]["file"] == "loras/style.safetensors" and info["loras"][0]["weight"] == pytest.approx(0.8)
    assert info["backends"]["unet"].startswith("eager (LoRA")
    assert "LoRA: loras/style.safetensors: 0.8" in Image.open(io.BytesIO(styled.images[0])).text["parameters"]
    assert np.array_equal(_pixels(_generate(lora_server)), base)  # the next request sees the base weights


def test_weight_zero_is_exactly_the_base_image(lora_server) -> None:
    base = _pixels(_generate(lora_server))
    zero = _generate(lora_server, loras=[pb.LoraWeight(file="loras/style.safetensors", weight=0.0)])
    assert np.array_equal(_pixels(zero), base) and json.loads(zero.info)["loras"] == []


def test_prompt_tags_work_like_the_field_and_are_stripped(lora_server) -> None:
    field = _generate(lora_server, loras=[pb.LoraWeight(file="loras/style.safetensors", weight=0.8)])
    tagged = _generate(lora_server, prompt=BASE["prompt"] + " <lora:style:0.8>")
    assert np.array_equal(_pixels(field), _pixels(tagged))
    assert json.loads(tagged.info)["prompt"] == BASE["prompt"] + " "
    both = _generate(lora_server, prompt=BASE["prompt"] + " <lora:other:0.5>",
                     loras=[pb.LoraWeight(file="loras/style.safetensors", weight=0.8)])
    assert len(json.loads(both.info)["loras"]) == 2
    assert not np.array_equal(_pixels(both), _pixels(field))


@pytest.mark.parametrize("lora,code,words", [
    (dict(file="loras/missing.safetensors", weight=1), grpc.StatusCode.NOT_FOUND, "not in the model store"),
    (dict(file="loras/broken.safetensors", weight=1), grpc.StatusCode.FAILED_PRECONDITION, "not a readable"),
    (dict(file="loras/not-a-lora.safetensors", weight=1), grpc.StatusCode.FAILED_PRECONDITION, "not a LoRA"),
    (dict(file="../escape.safetensors", weight=1), grpc.StatusCode.INVALID_ARGUMENT, "'..'"),
    (dict(file="loras/style.safetensors", weight=float("nan")), grpc.StatusCode.INVALID_ARGUMENT, "weight nan"),
    (dict(file="loras/style.safetensors", weight=11), grpc.StatusCode.INVALID_ARGUMENT, "-10..10"),
])
def test_bad_loras_are_refused(lora_server, lora, code, words) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        _generate(lora_server, loras=[pb.LoraWeight(**lora)])
    assert caught.value.code() == code and words in caught.value.details()


def test_unknown_prompt_tag_is_not_found(lora_server) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        _generate(lora_server, prompt="x <lora:nope:1>")
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND and "'nope'" in caught.value.details()


def test_too_many_loras_are_refused(lora_server) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        _generate(lora_server, loras=[pb.LoraWeight(file="loras/style.safetensors", weight=0.1)] * 9)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "at most 8" in caught.value.details()


def test_long_prompts_are_read_in_chunks(lora_server) -> None:
    long = _generate(lora_server, prompt=LONG_PROMPT)
    info = json.loads(long.info)
    assert info["prompt_chunks"] == 2 and info["text_length"] == 154 and info["prompt_tokens"]["prompt"] > 75
    assert info["prompt_tokens"]["prompt"] == 100
    shorter = _generate(lora_server, prompt="red " * 75)  # the first chunk alone
    assert json.loads(shorter.info)["prompt_chunks"] == 1
    assert not np.array_equal(_pixels(long), _pixels(shorter))


def test_emphasis_weights_tokens(lora_server) -> None:
    plain = _pixels(_generate(lora_server, prompt="a red lighthouse"))
    assert np.array_equal(plain, _pixels(_generate(lora_server, prompt="a (red:1.0) lighthouse")))
    assert not np.array_equal(plain, _pixels(_generate(lora_server, prompt="a (red:1.6) lighthouse")))
    assert not np.array_equal(plain, _pixels(_generate(lora_server, prompt="a [[red]] lighthouse")))


def test_clip_skip(lora_server) -> None:
    default = _pixels(_generate(lora_server))
    assert np.array_equal(default, _pixels(_generate(lora_server, clip_skip=1)))
    skip = _generate(lora_server, clip_skip=2)
    assert not np.array_equal(default, _pixels(skip)) and json.loads(skip.info)["clip_skip"] == 2
    assert "Clip skip: 2" in Image.open(io.BytesIO(skip.images[0])).text["parameters"]
    with pytest.raises(grpc.RpcError) as caught:
        _generate(lora_server, clip_skip=13)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "clip_skip is 13" in caught.value.details()


def test_engines_for_a_lora_set_and_for_two_chunks(lora_server) -> None:
    from typer.testing import CliRunner

    from dts_util.cli import app
    from dts_util.engines.manager import EngineManager

    root, engines = lora_server.service.store.root, Path(lora_server.config.engine_dir)
    common = ["--model-path", str(root), "--engine-dir", str(engines), "--resolution", "64x64", "--backend", "onnxruntime"]
    built = CliRunner().invoke(app, ["build-engines", "--prompt-chunks", "1,2", *common])
    assert built.exit_code == 0, built.output
    assert "t154" in built.output or built.output.count("built") >= 3
    with_lora = CliRunner().invoke(app, ["build-engines", "--lora", "loras/style.safetensors:0.8", *common])
    assert with_lora.exit_code == 0, with_lora.output
    style = [pb.LoraWeight(file="loras/style.safetensors", weight=0.8)]
    eager_styled, base = _pixels(_generate(lora_server, loras=style)), _pixels(_generate(lora_server))
    lora_server.service.engines = EngineManager(engines)
    try:
        styled_reply = _generate(lora_server, loras=style)
        styled = json.loads(styled_reply.info)
        other = json.loads(_generate(lora_server, loras=[pb.LoraWeight(file="loras/style.safetensors",
                                                                        weight=0.5)]).info)
        long = json.loads(_generate(lora_server, prompt=LONG_PROMPT).info)
        longer = json.loads(_generate(lora_server, prompt=LONG_PROMPT + " BREAK " + LONG_PROMPT).info)
    finally:
        lora_server.service.engines.close()
        lora_server.service.engines = None
    assert styled["backends"]["unet"] == "onnxruntime"
    # the engine has the LoRA fused in: its image is the eager LoRA image (within engine tolerance), not the base
    assert np.abs(_pixels(styled_reply) - eager_styled).max() <= 3
    assert np.abs(_pixels(styled_reply) - base).mean() > 1
    assert other["backends"]["unet"] == "eager (LoRA: no engine for this LoRA set)"
    assert long["backends"]["unet"] == "onnxruntime" and long["text_length"] == 154
    assert longer["backends"]["unet"] == "eager (no engine for 64x64 b2 t308)"
