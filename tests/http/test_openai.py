"""OpenAI's Images API through the openai SDK: generations and edits with GenerateImage's pixels, models, errors."""

from __future__ import annotations

import base64
import io

import numpy as np
import openai
import pytest

from tests.http.helpers import pixels, sample_image


@pytest.fixture(scope="module")
def client(http_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{http_server.http}/v1", api_key="unused", max_retries=0)


def grpc_pixels(server, **fields) -> list[np.ndarray]:
    with server.client() as grpc_client:
        return [pixels(png) for png in grpc_client.generate(**fields).images]


def test_generate_equals_generate_image(client, http_server) -> None:
    answer = client.images.generate(prompt="a red boat", model="builtin-tiny-sd", n=3, size="64x64",
                                    response_format="b64_json", quality="hd", style="vivid",
                                    extra_body={"seed": 5, "steps": 3, "guidance": 5.0, "negative_prompt": "blur"})
    expected = grpc_pixels(http_server, prompt="a red boat", negative_prompt="blur", width=64, height=64, steps=3,
                           cfg_scale=5.0, seed=5, batch_size=3)
    assert len(answer.data) == 3
    for image, want in zip(answer.data, expected):
        assert np.array_equal(pixels(base64.b64decode(image.b64_json)), want)
    assert answer.created > 0 and answer.size == "64x64"


def test_edit_is_inpainting_at_strength_one(client, http_server) -> None:
    rgba = sample_image(64, alpha=True)
    buffer = io.BytesIO()
    rgba.save(buffer, format="PNG")
    mask = np.where(np.asarray(rgba.getchannel("A")) == 0, 255, 0).astype(np.uint8)
    rgb_png, mask_png = io.BytesIO(), io.BytesIO()
    rgba.convert("RGB").save(rgb_png, format="PNG")
    from PIL import Image

    Image.fromarray(mask).save(mask_png, format="PNG")
    want = grpc_pixels(http_server, prompt="a window", width=64, height=64, steps=3, seed=9,
                       init_image=rgb_png.getvalue(), mask=mask_png.getvalue(), denoising_strength=1.0)[0]
    # Without a mask: the image's own transparent pixels are edited.
    own_alpha = client.images.edit(image=("in.png", buffer.getvalue(), "image/png"), prompt="a window", size="64x64",
                                   extra_body={"seed": 9, "steps": 3})
    assert np.array_equal(pixels(base64.b64decode(own_alpha.data[0].b64_json)), want)
    # With a mask: its transparent pixels are edited, whatever the image's alpha.
    mask_rgba = rgba.copy()
    mask_buffer = io.BytesIO()
    mask_rgba.save(mask_buffer, format="PNG")
    masked = client.images.edit(image=("in.png", rgb_png.getvalue(), "image/png"),
                                mask=("mask.png", mask_buffer.getvalue(), "image/png"), prompt="a window",
                                extra_body={"seed": 9, "steps": 3})
    assert np.array_equal(pixels(base64.b64decode(masked.data[0].b64_json)), want)
    kept = np.asarray(rgba.getchannel("A")) == 255
    assert np.array_equal(want[kept], np.asarray(rgba.convert("RGB"))[kept])  # kept pixels are the input's


def test_models_and_errors(client, http_server) -> None:
    assert [m.id for m in client.models.list()] == http_server.service.model_names()  # the store's, as Echo
    assert "builtin-tiny-sd" in http_server.service.model_names()
    with pytest.raises(openai.BadRequestError) as url:
        client.images.generate(prompt="x", response_format="url")
    assert url.value.body["param"] == "response_format" and "b64_json" in url.value.body["message"]
    with pytest.raises(openai.NotFoundError) as model:
        client.images.generate(prompt="x", model="dall-e-3")
    assert model.value.body["code"] == "model_not_found" and "builtin-tiny-sd" in model.value.body["message"]
    with pytest.raises(openai.BadRequestError) as size:
        client.images.generate(prompt="x", size="0x64")
    assert size.value.body["param"] == "size"
    with pytest.raises(openai.BadRequestError) as opaque:
        client.images.edit(image=("in.png", _png(sample_image(64)), "image/png"), prompt="x")
    assert "transparent" in opaque.value.body["message"]
    with pytest.raises(openai.UnprocessableEntityError) as typed:
        client.images.generate(prompt="x", n="two")  # type: ignore[arg-type]
    assert typed.value.body["param"] == "n"


def _png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
