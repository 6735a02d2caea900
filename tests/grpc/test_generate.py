"""GenerateImage over a real channel: semantics, determinism, info, events and PNG metadata."""

from __future__ import annotations

import io
import json

import grpc
import pytest
from PIL import Image

from dts_util.client import Client


def _png(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def test_defaults_give_one_native_size_png_with_full_info(client: Client) -> None:
    reply = client.generate(prompt="a lighthouse", seed=7)
    assert len(reply.images) == 1
    image = _png(reply.images[0])
    assert image.format == "PNG" and image.size == (256, 256)
    info = json.loads(reply.info)
    expected = {"model": "builtin-tiny-sd", "width": 256, "height": 256, "steps": 20, "cfg_scale": 7.0,
                "guidance": True, "sampler": "DPM++ 2M Karras", "seed": 7, "seeds": [7], "batch_size": 1,
                "batch_count": 1, "enable_hr": False, "restore_faces": False}
    assert {k: info[k] for k in expected} == expected
    assert info["backends"] == {"text_encoder": "eager", "unet": "eager", "vae_decoder": "eager"}
    assert info["timings_ms"]["total"] > 0 and len(info["model_fingerprint"]) == 64


def test_png_carries_a1111_parameters(client: Client) -> None:
    reply = client.generate(prompt="a red fox", negative_prompt="blurry", seed=11, steps=4, sampler="Euler a")
    parameters = _png(reply.images[0]).text["parameters"]
    prompt, negative, fields = parameters.split("\n")
    assert prompt == "a red fox" and negative == "Negative prompt: blurry"
    assert fields.startswith("Steps: 4, Sampler: Euler a, CFG scale: 7, Seed: 11, Size: 256x256, "
                             "Model: builtin-tiny-sd")


def test_events_are_draw_things_signposts(client: Client) -> None:
    reply = client.generate(prompt="x", seed=1, steps=3)
    events = [json.loads(e) for e in reply.events]
    names = [e["event"] for e in events]
    assert names == ["textEncoded", "sampling", "sampling", "sampling", "imageDecoded"]
    assert [(e["step"], e["total"]) for e in events[1:4]] == [(1, 3), (2, 3), (3, 3)]
    assert events[1]["backend"] == "eager" and events[-1]["backend"] == "eager"
    assert all(e["elapsed_ms"] >= 0 for e in events)


def test_same_seed_is_pixel_identical_and_image_i_uses_seed_plus_i(client: Client) -> None:
    first = client.generate(prompt="a tree", seed=1234, steps=4)
    again = client.generate(prompt="a tree", seed=1234, steps=4)
    assert first.images[0] == again.images[0]
    batch = client.generate(prompt="a tree", seed=1233, steps=4, batch_count=2)
    assert json.loads(batch.info)["seeds"] == [1233, 1234]
    assert _png(batch.images[1]).tobytes() == _png(first.images[0]).tobytes()
    other = client.generate(prompt="a tree", seed=1235, steps=4)
    assert _png(other.images[0]).tobytes() != _png(first.images[0]).tobytes()


def test_batch_size_times_batch_count_images(client: Client) -> None:
    reply = client.generate(prompt="x", seed=100, steps=2, batch_size=2, batch_count=2, width=128, height=64)
    assert len(reply.images) == 4
    assert {_png(i).size for i in reply.images} == {(128, 64)}
    assert json.loads(reply.info)["seeds"] == [100, 101, 102, 103]


def test_random_seed_is_reported(client: Client) -> None:
    info = json.loads(client.generate(prompt="x", seed=-1, steps=1).info)
    assert info["seed"] >= 0 and info["seeds"] == [info["seed"]]


def test_cfg_at_or_below_one_disables_guidance(client: Client) -> None:
    info = json.loads(client.generate(prompt="x", seed=3, steps=2, cfg_scale=1.0).info)
    assert info["guidance"] is False and info["cfg_scale"] == 1.0


@pytest.mark.parametrize("name,expected", [
    ("Euler a", "Euler a"), ("Euler A", "Euler a"), ("euler A", "Euler a"), ("DPM++ 2M Karras", "DPM++ 2M Karras"),
    ("UniPC", "UniPC"), ("DDIM", "DDIM"), ("DPM++ SDE Karras", "DPM++ 2M SDE Karras"), ("", "DPM++ 2M Karras"),
    ("UniPC Trailing", "UniPC Trailing"), ("PLMS", "PLMS"),
])
def test_sampler_names_a1111_and_draw_things(client: Client, name: str, expected: str) -> None:
    info = json.loads(client.generate(prompt="x", seed=2, steps=2, sampler=name).info)
    assert info["sampler"] == expected


def test_ancestral_sampler_is_reproducible(client: Client) -> None:
    a = client.generate(prompt="x", seed=9, steps=3, sampler="Euler a")
    b = client.generate(prompt="x", seed=9, steps=3, sampler="Euler a")
    assert a.images == b.images


def test_high_res_fix_upscales_and_runs_a_second_pass(client: Client) -> None:
    reply = client.generate(prompt="x", seed=5, steps=4, width=64, height=128, enable_hr=True, hr_scale=1.5)
    assert _png(reply.images[0]).size == (96, 192)
    info = json.loads(reply.info)
    assert info["denoising_strength"] == pytest.approx(0.7) and info["hr_scale"] == 1.5
    assert info["output_width"] == 96 and "unet_second_pass" in info["backends"]
    names = [json.loads(e)["event"] for e in reply.events]
    assert "secondPassSampling" in names and names[-1] == "secondPassImageDecoded"
    # int(steps x strength) steps of the schedule are re-run in the second pass, as diffusers does
    assert sum(n == "secondPassSampling" for n in names) == 2
    assert "Hires upscale: 1.5" in _png(reply.images[0]).text["parameters"]


def test_restore_faces_fails_with_failed_precondition(client: Client) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        client.generate(prompt="x", restore_faces=True)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "no face-restoration model" in caught.value.details()
