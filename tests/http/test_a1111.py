"""A1111's /sdapi/v1 through webuiapi (the client people use) against a live `serve --http-port`: the pixels are
GenerateImage's for the same settings, and the answers have A1111's shape."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import requests
import webuiapi
from PIL import Image

from dts_util.http.a1111 import Img2ImgRequest
from tests.http.helpers import b64_png, pixels, sample_image

SETTINGS = dict(prompt="a lighthouse at dusk", negative_prompt="fog", seed=42, steps=4, cfg_scale=6.5, width=64,
                height=64)


@pytest.fixture(scope="module")
def api(http_server) -> webuiapi.WebUIApi:
    return webuiapi.WebUIApi(host="127.0.0.1", port=http_server.http_port)


def grpc_pixels(server, **fields) -> list[np.ndarray]:
    with server.client() as client:
        return [pixels(png) for png in client.generate(**fields).images]


def test_txt2img_pixels_equal_generate_image_with_a1111s_shape(api, http_server) -> None:
    result = api.txt2img(**SETTINGS, sampler_name="DPM++ 2M", scheduler="Karras", batch_size=2, n_iter=2)
    expected = grpc_pixels(http_server, **SETTINGS, sampler="DPM++ 2M Karras", batch_size=2, batch_count=2)
    assert len(result.images) == 4
    for got, want in zip(result.images, expected):
        assert np.array_equal(np.asarray(got.convert("RGB")), want)
    info = result.info  # webuiapi parsed the info JSON string
    for key in ("prompt", "all_prompts", "negative_prompt", "seed", "all_seeds", "subseed", "width", "height",
                "sampler_name", "cfg_scale", "steps", "batch_size", "restore_faces", "sd_model_name",
                "extra_generation_params", "index_of_first_image", "infotexts", "styles", "job_timestamp",
                "clip_skip", "is_using_inpainting_conditioning", "version"):
        assert key in info, key
    assert info["all_seeds"] == [42, 43, 44, 45] and info["seed"] == 42
    assert info["sampler_name"] == "DPM++ 2M" and info["extra_generation_params"]["Schedule type"] == "Karras"
    assert (info["width"], info["height"], info["steps"]) == (64, 64, 4)
    # Every PNG carries A1111's parameters chunk, and info's infotexts are those texts.
    assert result.images[1].info["parameters"] == info["infotexts"][1]
    assert "Seed: 43" in info["infotexts"][1] and info["infotexts"][1].startswith("a lighthouse at dusk\n")
    assert result.parameters["prompt"] == SETTINGS["prompt"] and result.parameters["n_iter"] == 2


def test_img2img_and_inpainting_pixels_equal_generate_image(api, http_server) -> None:
    image = sample_image(64)
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    init_png = buffer.getvalue()
    mask_buffer = io.BytesIO()
    mask.save(mask_buffer, format="PNG")
    common = dict(SETTINGS, sampler_name="Euler a", denoising_strength=0.6)
    grpc_common = dict(SETTINGS, sampler="Euler a", denoising_strength=0.6, init_image=init_png)

    img2img = api.img2img(images=[image], **common)
    assert np.array_equal(np.asarray(img2img.image.convert("RGB")), grpc_pixels(http_server, **grpc_common)[0])

    inpainted = api.img2img(images=[image], mask_image=mask, mask_blur=2, inpainting_fill=1, inpaint_full_res=False,
                            **common)
    want = grpc_pixels(http_server, **grpc_common, mask=mask_buffer.getvalue(), mask_blur=2)[0]
    assert np.array_equal(np.asarray(inpainted.image.convert("RGB")), want)
    assert inpainted.info["is_using_inpainting_conditioning"] is False  # the built-in model is no inpainting model
    assert inpainted.parameters["init_images"] is None  # as A1111 answers without include_init_images

    # inpainting_mask_invert paints what the mask keeps: the same as sending the inverted mask.
    from PIL import ImageOps

    inverted = api.img2img(images=[image], mask_image=ImageOps.invert(mask), mask_blur=2, inpainting_mask_invert=1,
                           inpainting_fill=1, inpaint_full_res=False, **common)
    assert np.array_equal(np.asarray(inverted.image.convert("RGB")), want)


def test_listings_options_and_model_switch(api, http_server) -> None:
    assert [m["title"] for m in api.get_sd_models()] == http_server.service.model_names()  # the store's, as Echo
    assert "builtin-tiny-sd" in http_server.service.model_names()
    samplers = {s["name"]: s for s in api.get_samplers()}
    assert "Euler a" in samplers and samplers["DPM++ 2M Karras"]["options"] == {"scheduler": "karras"}
    assert {"automatic", "karras", "align_your_steps", "sgm_uniform"} <= {s["name"] for s in api.get_schedulers()}
    assert api.get_loras() == []
    assert api.get_options()["sd_model_checkpoint"] == "builtin-tiny-sd"
    api.util_set_model("builtin-tiny-sd")  # webuiapi's own model switch: POST /options
    assert api.util_get_current_model() == "builtin-tiny-sd"
    refused = requests.post(f"{http_server.http}/sdapi/v1/options", json={"sd_model_checkpoint": "no/such/model"})
    assert refused.status_code == 404 and "builtin-tiny-sd" in refused.json()["detail"]


def test_samplers_split_as_a1111_19_and_unknowns_are_told(http_server) -> None:
    url = f"{http_server.http}/sdapi/v1/txt2img"
    body = dict(SETTINGS, steps=2, send_images=False)
    ays = requests.post(url, json=dict(body, sampler_name="Euler a", scheduler="Align Your Steps")).json()
    assert json.loads(ays["info"])["dts_util"]["sampler"] == "Euler A AYS"
    legacy = requests.post(url, json=dict(body, sampler_name="DPM++ 2M Karras", scheduler="Karras")).json()
    assert json.loads(legacy["info"])["dts_util"]["sampler"] == "DPM++ 2M Karras"
    for fields, words in (({"sampler_name": "LMS"}, "unknown sampler"), ({"scheduler": "Beta"}, "scheduler"),
                          ({"sampler_name": "Heun", "scheduler": "karras"}, "no Karras schedule")):
        answer = requests.post(url, json=dict(body, **fields))
        assert answer.status_code == 400 and words in answer.json()["detail"], answer.text


def test_lora_tags_ignored_fields_and_notes(http_server) -> None:
    url = f"{http_server.http}/sdapi/v1/txt2img"
    body = dict(SETTINGS, steps=2, send_images=False)
    missing = requests.post(url, json=dict(body, prompt="x <lora:nothing-here:0.5>"))
    assert missing.status_code == 404 and "LoRA 'nothing-here'" in missing.json()["detail"]  # read as over gRPC
    answer = requests.post(url, json=dict(body, styles=["cinematic"], alwayson_scripts={"ADetailer": {"args": []}},
                                          unknown_field=123, subseed_strength=0.3))
    assert answer.status_code == 200
    notes = json.loads(answer.json()["info"])["notes"]
    assert any("styles" in n for n in notes) and any("ADetailer" in n for n in notes)
    assert any("subseed" in n for n in notes)
    assert requests.post(url, json=dict(body, script_name="x/y/z plot")).status_code == 422  # as A1111
    assert requests.post(url, json=dict(body, tiling=True)).status_code == 400


def test_base64_forms_are_accepted(http_server) -> None:
    url = f"{http_server.http}/sdapi/v1/img2img"
    raw = b64_png(sample_image(64))
    folded = "\n".join(raw[i:i + 76] for i in range(0, len(raw), 76))  # MIME line breaks
    for form in (raw, "data:image/png;base64," + raw, folded):
        answer = requests.post(url, json=dict(SETTINGS, steps=2, init_images=[form]))
        assert answer.status_code == 200, answer.text
        assert Image.open(io.BytesIO(base64.b64decode(answer.json()["images"][0]))).size == (64, 64)


def test_absent_fields_take_a1111s_defaults(http_server) -> None:
    answer = requests.post(f"{http_server.http}/sdapi/v1/txt2img", json={"prompt": "x", "steps": 1, "width": 64,
                                                                         "height": 64})
    parameters, info = answer.json()["parameters"], json.loads(answer.json()["info"])
    assert (parameters["cfg_scale"], parameters["sampler_index"], parameters["n_iter"]) == (7.0, "Euler", 1)
    assert info["sampler_name"] == "Euler" and info["cfg_scale"] == 7.0
    defaults = Img2ImgRequest()
    assert (defaults.width, defaults.height, defaults.steps, defaults.denoising_strength) == (512, 512, 50, 0.75)
