"""The seed protocol's seed modes and SDXL conditioning fields, and the pixel-limit message, through a real client."""

from __future__ import annotations

import io
import json

import grpc
import numpy as np
import pytest
from PIL import Image

from dts_util.client import Client

REQUEST = dict(prompt="a harbour", width=128, height=128, steps=3, seed=21, sampler="UniPC AYS")


def _pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


def test_every_seed_mode_generates_and_legacy_says_what_it_used(client: Client) -> None:
    images = {}
    for mode in ("torch_cpu", "scale_alike", "nvidia_gpu", "legacy", "ScaleAlike"):
        reply = client.generate(**REQUEST, seed_mode=mode)
        info = json.loads(reply.info)
        images[mode] = _pixels(reply.images[0])
        assert info["seed_mode"] == {"ScaleAlike": "scale_alike"}.get(mode, mode)
    assert json.loads(client.generate(**REQUEST, seed_mode="legacy").info)["seed_mode_used"] == "torch_cpu"
    assert np.array_equal(images["legacy"], images["torch_cpu"])
    assert np.array_equal(images["ScaleAlike"], images["scale_alike"])
    assert not np.array_equal(images["scale_alike"], images["torch_cpu"])
    assert not np.array_equal(images["nvidia_gpu"], images["torch_cpu"])


@pytest.mark.parametrize("fields, words", [(dict(seed_mode="mersenne"), "unknown seed_mode"),
                                           (dict(original_width=9000), "original_width is 9000"),
                                           (dict(negative_crop_top=-1), "negative_crop_top is -1")])
def test_bad_seed_modes_and_sizes_are_invalid_argument(client: Client, fields, words) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        client.generate(**REQUEST, **fields)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and words in caught.value.details()


def test_a_huge_png_is_told_the_pixel_limit_and_its_size(client: Client) -> None:
    buffer = io.BytesIO()
    Image.new("L", (12000, 12000)).save(buffer, "PNG", compress_level=1)
    with pytest.raises(grpc.RpcError) as caught:
        client.generate(prompt="x", init_image=buffer.getvalue())
    details = caught.value.details()
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "12000x12000" in details and "megapixels" in details and "Decompression" not in details


def test_mask_value_4_repaints_as_2() -> None:
    from dts_util.grpc.drawthings_app.tensors import Tensor, mask_image

    values = np.array([[0, 1, 2, 3], [4, 4 | 0xF8, 2 | 0x40, 5]], dtype=np.uint8)
    mask = np.asarray(mask_image(Tensor(values.shape, values), (4, 2)))
    assert (mask == 255).tolist() == [[False, True, True, False], [True, True, True, False]]


@pytest.mark.parametrize("outset", [3, -2, 0])
def test_mask_outset_grows_or_shrinks_the_repainted_area(outset: int) -> None:
    from dts_util.pipeline.images import fit_input_images

    mask = Image.new("L", (64, 64))
    mask.paste(255, (20, 20, 40, 40))
    fitted = fit_input_images(Image.new("RGB", (64, 64)), mask, 64, 64, 0, "", outset).mask
    repainted = np.asarray(fitted) > 127
    side = 20 + 2 * outset  # the 20x20 square, grown or shrunk by `outset` on every side
    assert repainted.sum() == side * side
    assert repainted[20 - outset, 20 - outset] and not repainted[19 - outset, 20 - outset]


def test_mask_outset_through_the_server(client: Client) -> None:
    buffer, mask_buffer = io.BytesIO(), io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(buffer, "PNG")
    mask = Image.new("L", (64, 64))
    mask.paste(255, (24, 24, 40, 40))
    mask.save(mask_buffer, "PNG")
    fields = dict(prompt="x", steps=2, seed=1, init_image=buffer.getvalue(), mask=mask_buffer.getvalue())
    kept = _pixels(client.generate(**fields).images[0])
    grown = client.generate(**fields, mask_outset=6)
    assert json.loads(grown.info)["mask_outset"] == 6
    grown_pixels = _pixels(grown.images[0])
    assert np.array_equal(kept[20, 20], [200, 30, 30]) and not np.array_equal(grown_pixels[20, 20], [200, 30, 30])
    with pytest.raises(grpc.RpcError) as caught:
        client.generate(**fields, mask_outset=65)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "mask_outset" in caught.value.details()
