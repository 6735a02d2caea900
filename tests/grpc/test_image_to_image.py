"""img2img and inpainting through a real server and channel: diffusers' semantics, the kept pixels, bad inputs.

The reference is diffusers itself: ``StableDiffusionImg2ImgPipeline`` and ``StableDiffusionInpaintPipeline`` on the
same weights, seed and scheduler give the same pixels (within 1 level of rounding), at strength 1 and below.
"""

from __future__ import annotations

import io
import json

import grpc
import numpy as np
import pytest
from PIL import Image

from dts_util.client import Client
from dts_util.grpc.proto import image_generation_pb2 as pb
from dts_util.limits import MAX_INIT_IMAGE_BYTES

WIDTH, HEIGHT = 192, 128
BOX = (40, 30, 130, 100)  # the repainted rectangle of MASK
ROUNDING = 1  # PNG levels: the same float computation, rounded once more or less


def _png(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def _noise_image(width: int = WIDTH, height: int = HEIGHT, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def _box_mask(width: int = WIDTH, height: int = HEIGHT, box: tuple = BOX) -> Image.Image:
    mask = Image.new("L", (width, height))
    mask.paste(255, box)
    return mask


def _pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


INIT, MASK = _noise_image(), _box_mask()
REQUEST = dict(prompt="a red fox", negative_prompt="blurry", steps=8, seed=5, cfg_scale=6.0)


def _error(client: Client, **fields) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        client.generate(**fields)
    return caught.value


def _diffusers(model_folder, kind: str, sampler: str, seeds: list[int], strength: float, **extra) -> list[np.ndarray]:
    import diffusers
    import torch

    from dts_util.models.loader import inspect_model
    from dts_util.pipeline.samplers import find_sampler, make_scheduler

    cls = {"img2img": diffusers.StableDiffusionImg2ImgPipeline, "inpaint": diffusers.StableDiffusionInpaintPipeline}
    pipe = cls[kind].from_pretrained(model_folder, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = make_scheduler(find_sampler(sampler), inspect_model("m", model_folder).scheduler_config)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(prompt=REQUEST["prompt"], negative_prompt=REQUEST["negative_prompt"], image=INIT,
                  strength=strength, num_inference_steps=REQUEST["steps"], guidance_scale=REQUEST["cfg_scale"],
                  generator=[torch.Generator("cpu").manual_seed(seed) for seed in seeds],
                  num_images_per_prompt=len(seeds), **extra).images
    return [np.asarray(image, dtype=np.int16) for image in images]


@pytest.mark.parametrize("sampler", ["Euler", "Euler a", "DPM++ 2M Karras"])
@pytest.mark.parametrize("strength", [0.6, 1.0])
def test_img2img_matches_diffusers(client, model_store, sampler, strength) -> None:
    reply = client.generate(**REQUEST, sampler=sampler, denoising_strength=strength, init_image=_png(INIT),
                            batch_size=2)
    expected = _diffusers(model_store.root / "builtin-tiny-sd", "img2img", sampler, [5, 6], strength)
    for image, reference in zip(reply.images, expected):
        assert np.abs(_pixels(image) - reference).max() <= ROUNDING
    info = json.loads(reply.info)
    assert info["mode"] == "img2img" and (info["width"], info["height"]) == (WIDTH, HEIGHT)
    assert info["denoising_strength"] == pytest.approx(strength) and info["backends"]["vae_encoder"] == "eager"
    assert info["init_image"]["width"] == WIDTH and not info["init_image"]["resized"]


@pytest.mark.parametrize("sampler", ["Euler", "Euler a"])
@pytest.mark.parametrize("strength", [0.6, 1.0])
def test_inpainting_without_overlay_matches_diffusers(client, model_store, sampler, strength) -> None:
    reply = client.generate(**REQUEST, sampler=sampler, denoising_strength=strength, init_image=_png(INIT),
                            mask=_png(MASK), skip_mask_overlay=True)
    (expected,) = _diffusers(model_store.root / "builtin-tiny-sd", "inpaint", sampler, [5], strength,
                             mask_image=MASK, width=WIDTH, height=HEIGHT)
    assert np.abs(_pixels(reply.images[0]) - expected).max() <= ROUNDING
    assert json.loads(reply.info)["mode"] == "inpaint"


def test_image_i_of_a_batch_is_the_single_image_of_its_seed(client) -> None:
    """Each image samples the encoded input with its own seed (diffusers' inpainting pipeline samples it once, from
    the first generator, so its later images differ from ours)."""
    fields = dict(**REQUEST, init_image=_png(INIT), mask=_png(MASK), denoising_strength=0.6)
    batch = client.generate(**fields, batch_size=2)
    single = client.generate(**{**fields, "seed": REQUEST["seed"] + 1})
    assert np.abs(_pixels(batch.images[1]) - _pixels(single.images[0])).max() <= ROUNDING


def test_strength_sets_the_steps_as_diffusers_counts_them(client) -> None:
    for strength, expected in ((1.0, 20), (0.5, 10), (0.33, 6), (0.01, 1)):  # at least one step, always
        reply = client.generate(prompt="x", steps=20, seed=1, denoising_strength=strength, init_image=_png(INIT))
        sampling = [json.loads(e) for e in reply.events if json.loads(e)["event"] == "sampling"]
        assert len(sampling) == expected and sampling[-1]["total"] == expected
        assert json.loads(reply.info)["denoising_steps"] == expected
    names = [json.loads(e)["event"] for e in reply.events]
    assert names[:2] == ["textEncoded", "imageEncoded"] and names[-1] == "imageDecoded"


def test_img2img_at_strength_one_still_sees_the_image(client) -> None:
    """The documented difference from txt2img: diffusers noises the image to the first timestep, where
    sqrt(alpha_bar) of its latents remain (about 7% for SD's schedule), and draws the encoder's sample from the seed
    first. Strength 1 is therefore not txt2img, and two input images give two results."""
    fields = dict(prompt="x", steps=6, seed=3, denoising_strength=1.0)
    txt2img = client.generate(**fields, width=WIDTH, height=HEIGHT)
    first = client.generate(**fields, init_image=_png(INIT))
    second = client.generate(**fields, init_image=_png(_noise_image(seed=9)))
    assert first.images[0] != second.images[0] and first.images[0] != txt2img.images[0]


def test_inpainting_keeps_the_unmasked_pixels(client) -> None:
    fields = dict(prompt="x", steps=6, seed=3, denoising_strength=0.8, init_image=_png(INIT))
    sharp = _pixels(client.generate(**fields, mask=_png(MASK)).images[0])
    source = np.asarray(INIT, dtype=np.int16)
    outside = np.ones((HEIGHT, WIDTH), dtype=bool)
    outside[BOX[1]:BOX[3], BOX[0]:BOX[2]] = False
    assert np.array_equal(sharp[outside], source[outside])  # no blur: every kept pixel is the input's
    assert np.abs(sharp[~outside] - source[~outside]).mean() > 10  # and the box was repainted
    blurred = _pixels(client.generate(**fields, mask=_png(MASK), mask_blur=4).images[0])
    far = np.ones((HEIGHT, WIDTH), dtype=bool)  # the blur reaches about 3 radii past the mask's edge
    far[BOX[1] - 12:BOX[3] + 12, BOX[0] - 12:BOX[2] + 12] = False
    assert np.array_equal(blurred[far], source[far])
    raw = _pixels(client.generate(**fields, mask=_png(MASK), skip_mask_overlay=True).images[0])
    assert not np.array_equal(raw[outside], source[outside])  # the VAE's own output, as diffusers returns it


def test_size_defaults_to_the_image_rounded_down_and_width_height_resize_it(client) -> None:
    odd = _png(_noise_image(101, 77))
    info = json.loads(client.generate(prompt="x", steps=1, seed=1, init_image=odd).info)
    assert (info["width"], info["height"]) == (96, 72) and info["init_image"]["resized"]
    resized = client.generate(prompt="x", steps=1, seed=1, init_image=odd, width=128, height=64)
    assert Image.open(io.BytesIO(resized.images[0])).size == (128, 64)


def test_exif_orientation_and_other_formats(client) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees: the upright image is 128 wide and 192 high
    buffer = io.BytesIO()
    INIT.save(buffer, "JPEG", exif=exif.tobytes())
    info = json.loads(client.generate(prompt="x", steps=1, seed=1, init_image=buffer.getvalue()).info)
    assert (info["width"], info["height"]) == (HEIGHT, WIDTH)
    webp = client.generate(prompt="x", steps=1, seed=1, init_image=_png(INIT.convert("RGBA"), "WEBP"),
                           mask=_png(MASK, "WEBP"))
    assert json.loads(webp.info)["mode"] == "inpaint"


def test_the_streamed_rpc_takes_an_input_image(client) -> None:
    events = []
    images, info = client.generate_stream(on_event=lambda event, _: events.append(event["event"]), prompt="x",
                                          steps=2, seed=1, init_image=_png(INIT), mask=_png(MASK))
    assert "imageEncoded" in events and json.loads(info)["mode"] == "inpaint" and len(images) == 1


def _truncated_png() -> bytes:
    data = _png(INIT)
    return data[:len(data) // 2]


def _huge_header_png() -> bytes:
    return _png(Image.new("L", (4097, 4097)))  # 16.8 MP of black: a small file, past the pixel limit


@pytest.mark.parametrize("fields, words", [
    (dict(init_image=b"not an image"), "init_image could not be decoded"),
    (dict(init_image=_truncated_png()), "init_image could not be decoded"),
    (dict(init_image=_png(INIT, "GIF")), "init_image could not be decoded as PNG, JPEG, WEBP"),
    (dict(init_image=b"\0" * (MAX_INIT_IMAGE_BYTES + 1)), f"send at most {MAX_INIT_IMAGE_BYTES}"),
    (dict(init_image=_huge_header_png()), "init_image is 4097x4097; send at most 16 megapixels"),
    (dict(init_image=_png(_noise_image(2100, 64))), "makes the output width 2096"),
    (dict(init_image=_png(_noise_image(50, 80))), "makes the output width 48"),
    (dict(init_image=_png(INIT), width=100), "width is 100"),
    (dict(mask=_png(MASK)), "mask was sent without init_image"),
    (dict(init_image=_png(INIT), mask=_png(_box_mask(96, 64))), "mask is 96x64 but init_image is 192x128"),
    (dict(init_image=_png(INIT), mask=b"garbage"), "mask could not be decoded"),
    (dict(init_image=_png(INIT), mask=_png(MASK), mask_blur=65), "mask_blur is 65"),
    (dict(init_image=_png(INIT), mask=_png(MASK), mask_blur=-1), "mask_blur is -1"),
    (dict(init_image=_png(INIT), enable_hr=True), "enable_hr (the high-res fix) is for txt2img"),
    (dict(init_image=_png(INIT), denoising_strength=1.5), "denoising_strength is 1.5"),
])
def test_bad_inputs_are_invalid_argument_saying_what_to_fix(client, fields, words) -> None:
    error = _error(client, prompt="x", steps=1, **fields)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and words in error.details()
    assert "/" not in error.details().replace("JPEG/WebP", "")  # no server path
    assert client.echo().message == "HELLO"


def test_a_request_past_the_message_limit_is_resource_exhausted(client) -> None:
    from dts_util.limits import MAX_GENERATE_REQUEST_BYTES

    error = _error(client, prompt="x", init_image=b"\0" * MAX_GENERATE_REQUEST_BYTES)
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "GenerateImage" in error.details()
    stream = pb.ImageGenerationRequest(prompt="x", init_image=b"\0" * MAX_GENERATE_REQUEST_BYTES)
    with pytest.raises(grpc.RpcError) as caught:
        list(client.stub.GenerateImageStream(stream, timeout=60))
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_png_parameters_are_readable_before_the_image_data(client) -> None:
    reply = client.generate(prompt="a lighthouse", steps=1, seed=1, init_image=_png(INIT))
    assert "Denoising strength: 0.7" in Image.open(io.BytesIO(reply.images[0])).info["parameters"]
    png = reply.images[0]
    assert png.index(b"tEXtparameters") < png.index(b"IDAT")
