"""OpenAI's Images API (``/v1/images/generations``, ``/v1/images/edits``, ``/v1/models``), as the ``openai``
SDK and Open WebUI call it.

A generation is GenerateImage with the same prompt, model, size and seed; an edit is inpainting at strength 1.0,
where the mask's fully transparent pixels (or, without a mask, the image's own) mark what is repainted, as
OpenAI defines it. Images come back as ``b64_json`` only: this server keeps no files to link to, so ``url`` is
refused rather than faked. ``seed``, ``negative_prompt``, ``steps``, ``guidance`` and ``sampler`` are accepted as
extra fields (the SDK's ``extra_body``); ``quality`` and ``style`` are accepted and have no effect.
"""

from __future__ import annotations

import base64
import time
from dataclasses import replace
from typing import Any, Optional

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException

from dts_util.boundary import GenerationRequest
from dts_util.client_text import quote
from dts_util.http.common import (ApiContext, HttpApi, HttpError, in_pool, invalid, png_bytes,
                                  resolve_model, run_generation)
from dts_util.limits import MAX_HTTP_IMAGE_BODY_BYTES, MAX_INIT_IMAGE_BYTES, MAX_MASK_BYTES, MAX_OPENAI_IMAGES
from dts_util.pipeline.params import MAX_BATCH_SIZE, MAX_SAMPLER_CHARS, MAX_SEED, MAX_SIZE, MIN_SIZE
from dts_util.request_log import request_log

PREFIX = "/v1"
_FORMATS = {"png": "png", "jpeg": "jpeg", "jpg": "jpeg", "webp": "webp"}
# Form fields of an edit besides its files, each bounded (a prompt may be long; the rest are short words).
_MAX_FORM_FIELDS, _MAX_FIELD_CHARS = 32, 65536


class GenerationsRequest(BaseModel):
    """OpenAI's image generation body; fields of other OpenAI models (``background``, ``moderation``, ``user``,
    ...) are accepted and ignored, as are unknown ones."""

    model_config = ConfigDict(extra="ignore")

    prompt: str
    model: Optional[str] = None
    n: Optional[int] = 1
    size: Optional[str] = None
    response_format: Optional[str] = None
    output_format: Optional[str] = None
    output_compression: Optional[int] = None
    quality: Optional[str] = None
    style: Optional[str] = None
    user: Optional[str] = None
    # dts-util's extras (extra_body).
    seed: Optional[int] = None
    negative_prompt: Optional[str] = None
    steps: Optional[int] = None
    guidance: Optional[float] = None
    sampler: Optional[str] = None


def parse_size(size: str | None) -> tuple[int, int]:
    """"WxH" as (width, height); "auto" or none is (0, 0): the model's (or the edited image's) own size."""
    if size is None or size == "auto":
        return 0, 0
    width, x, height = size.strip().lower().partition("x")
    if not x or not width.isdigit() or not height.isdigit():
        raise invalid(f"size {quote(size, 40)} is not WIDTHxHEIGHT (e.g. 1024x1024) or auto", "size")
    for name, value in (("width", int(width)), ("height", int(height))):
        if not MIN_SIZE <= value <= MAX_SIZE:
            raise invalid(f"size {size}: the {name} must be a multiple of 8 in {MIN_SIZE}..{MAX_SIZE}", "size")
    return int(width), int(height)


def batches(n: int) -> tuple[int, int]:
    """(batch_size, batch_count) for ``n`` images: the largest batch that divides ``n`` (image i is seed + i either
    way; a batch is faster on a GPU)."""
    size = max(d for d in range(1, MAX_BATCH_SIZE + 1) if n % d == 0)
    return size, n // size


def _request(body: GenerationsRequest, ctx: ApiContext) -> GenerationRequest:
    if body.response_format not in (None, "b64_json"):
        raise invalid(f"response_format {quote(body.response_format, 40)} is not available: this server keeps no "
                      "files to link to; send response_format b64_json (or leave it out)", "response_format")
    n = 1 if body.n is None else body.n
    if not 1 <= n <= MAX_OPENAI_IMAGES:
        raise invalid(f"n is {n}; it must be in 1..{MAX_OPENAI_IMAGES}", "n")
    output_format = _FORMATS.get((body.output_format or "png").lower())
    if output_format is None:
        raise invalid(f"output_format {quote(body.output_format or '', 20)} is not png, jpeg or webp", "output_format")
    if body.output_compression is not None and not 0 <= body.output_compression <= 100:
        raise invalid(f"output_compression is {body.output_compression}; it must be in 0..100", "output_compression")
    if body.seed is not None and not 0 <= body.seed <= MAX_SEED:
        raise invalid(f"seed is {body.seed}; send a value in 0..{MAX_SEED} (or leave it out for a random one)", "seed")
    if body.steps is not None and body.steps < 1:
        raise invalid(f"steps is {body.steps}; send at least 1 (or leave it out for the model's default)", "steps")
    if body.sampler is not None and len(body.sampler) > MAX_SAMPLER_CHARS:
        raise invalid(f"sampler has {len(body.sampler)} characters; send at most {MAX_SAMPLER_CHARS}", "sampler")
    width, height = parse_size(body.size)
    batch_size, batch_count = batches(n)
    model = resolve_model(ctx.generator, body.model) if body.model else ""
    return GenerationRequest(
        prompt=body.prompt, negative_prompt=body.negative_prompt or "", width=width, height=height,
        steps=body.steps or 0, cfg_scale=body.guidance or 0.0, seed=-1 if body.seed is None else body.seed,
        sampler=body.sampler or "", batch_size=batch_size, batch_count=batch_count, model=model,
        output_format=output_format, quality=max(1, body.output_compression or 0) if output_format != "png" else 0)


async def _answer(ctx: ApiContext, request: GenerationRequest, client: Request) -> dict:
    output = await run_generation(ctx.generator, request, client)
    request_log()["summary"] = output.summary
    data = await in_pool(lambda: [{"b64_json": base64.b64encode(image).decode(), "revised_prompt": None}
                                  for image in output.images])
    width, height = _output_size(output.info)
    return {"created": int(time.time()), "data": data, "output_format": request.output_format or "png",
            "size": f"{width}x{height}"}


def _output_size(info: str) -> tuple[int, int]:
    import json

    parsed = json.loads(info)
    return parsed.get("output_width", 0), parsed.get("output_height", 0)


# -- edits --------------------------------------------------------------------------------------------------------

async def _edit_request(request: Request, ctx: ApiContext) -> GenerationRequest:
    """The multipart edit as inpainting: fields checked like a generation's, then the image and its mask."""
    try:
        form = await request.form(max_files=4, max_fields=_MAX_FORM_FIELDS, max_part_size=_MAX_FIELD_CHARS)
    except (HttpError, StarletteHTTPException):
        raise  # the body's own limit or deadline
    except Exception as exc:  # noqa: BLE001 - python-multipart's and Starlette's parse errors: the client's body
        raise invalid(f"the body is not valid multipart/form-data ({getattr(exc, 'detail', type(exc).__name__)}); "
                      "send the image as a file field and the other fields as text", None) from None
    try:
        files = form.getlist("image") + form.getlist("image[]")
        masks = form.getlist("mask")
        fields = {key: value for key, value in form.multi_items() if isinstance(value, str)}
        generation = await in_pool(_request, _edit_fields(fields), ctx)  # the model lookup reads the store
        if len(files) != 1 or isinstance(files[0], str):
            raise invalid(f"send one image file as 'image' (got {len(files)}); this server edits one image at a "
                          "time", "image")
        if len(masks) > 1 or (masks and isinstance(masks[0], str)):
            raise invalid("send at most one mask file as 'mask'", "mask")
        ctx.generator.check_room(generation.model)  # a full queue refuses before any image is decoded
        image = await _read_upload(files[0], "image", MAX_INIT_IMAGE_BYTES)
        mask = await _read_upload(masks[0], "mask", MAX_MASK_BYTES) if masks else None
    finally:
        await form.close()  # spooled upload files
    init, repaint = await in_pool(edit_images, image, mask)
    # Strength 1: the masked area starts from noise, the rest is kept (OpenAI's edit).
    return replace(generation, init_image=init, mask=repaint, denoising_strength=1.0)


def _edit_fields(fields: dict[str, str]) -> GenerationsRequest:
    """Form text as the generation body's fields (numbers arrive as text in multipart)."""
    from pydantic import ValidationError

    try:
        return GenerationsRequest.model_validate(fields)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(part) for part in first["loc"]) or None
        raise HttpError(422, f"{param}: {first['msg']}", param=param, code="invalid_type") from None


async def _read_upload(upload: Any, name: str, max_bytes: int) -> bytes:
    data = await upload.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise HttpError(413, f"{name} has more than {max_bytes} bytes; send a smaller image", param=name,
                        code="too_large")
    if not data:
        raise invalid(f"{name} is empty; send an image file", name)
    return data


def edit_images(image_bytes: bytes, mask_bytes: bytes | None) -> tuple[bytes, bytes]:
    """(the image as RGB PNG, the repaint mask as PNG, white = repaint) from OpenAI's inputs: the mask's fully
    transparent pixels, or without one the image's own, are what to edit."""
    from dts_util.pipeline.images import decode_image

    image = decode_image(image_bytes, "image", MAX_INIT_IMAGE_BYTES)
    source = decode_image(mask_bytes, "mask", MAX_MASK_BYTES) if mask_bytes is not None else image
    name = "mask" if mask_bytes is not None else "image"
    if source.size != image.size:
        raise invalid(f"mask is {source.size[0]}x{source.size[1]} but image is {image.size[0]}x{image.size[1]}; "
                      "send a mask of the image's size", "mask")
    if "A" not in source.getbands() and not (source.mode == "P" and "transparency" in source.info):
        raise invalid(f"{name} has no alpha channel; " + ("send a mask PNG whose fully transparent pixels mark "
                      "what to edit" if mask_bytes is not None else "send a mask, or an image whose transparent "
                      "pixels mark what to edit"), name)
    alpha = source.convert("RGBA").getchannel("A")
    repaint = alpha.point(lambda value: 255 if value == 0 else 0)
    if not repaint.getbbox():
        raise invalid(f"{name} has no fully transparent pixel, so nothing would be edited; make the area to edit "
                      "transparent (alpha 0)", name)
    return png_bytes(image.convert("RGB")), png_bytes(repaint)


# -- routes -------------------------------------------------------------------------------------------------------

def router(ctx: ApiContext) -> APIRouter:
    routes = APIRouter(tags=["OpenAI Images (/v1)"])

    @routes.post(f"{PREFIX}/images/generations")
    async def generations(body: GenerationsRequest, request: Request) -> dict:
        generation = await in_pool(_request, body, ctx)  # the model lookup reads the store
        return await _answer(ctx, generation, request)

    @routes.post(f"{PREFIX}/images/edits")
    async def edits(request: Request) -> dict:
        return await _answer(ctx, await _edit_request(request, ctx), request)

    @routes.get(f"{PREFIX}/models")
    async def models() -> dict:
        names = await in_pool(ctx.generator.model_names)
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "dts-util"}
                                           for name in names]}

    return routes


_ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
                413: "invalid_request_error", 422: "invalid_request_error", 503: "server_error"}


def error_body(status: int, message: str, param: str | None, code: str | None) -> dict:
    """OpenAI's error JSON."""
    return {"error": {"message": message, "type": _ERROR_TYPES.get(status, "server_error" if status >= 500
                                                                  else "invalid_request_error"),
                      "param": param, "code": code}}


API = HttpApi(name="OpenAI Images", prefix=PREFIX, router=router, error_body=error_body,
              body_limits={f"{PREFIX}/images/edits": MAX_HTTP_IMAGE_BODY_BYTES}, auth_challenge="Bearer")
