"""What both HTTP APIs share: errors and their statuses, base64 images, model names, and running a generation
through the server's queue so that an interrupt or a vanished client stops it at the next step.

No API's wire format lives here; ``a1111.py`` and ``openai_images.py`` shape requests and answers.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Mapping

from dts_util.boundary import GenerationOutput, GenerationRequest, ImageGenerator, UpdateCallback
from dts_util.client_text import quote
from dts_util.errors import DtsError, GenerationCancelled, InvalidRequest, ModelNotFound, QueueFull, RequestTooLarge

if TYPE_CHECKING:
    from fastapi import APIRouter, Request

    from dts_util.config import ServerConfig

# Seconds a client is told to wait before retrying a full queue (one short generation, roughly).
RETRY_AFTER_SECONDS = 5
# gRPC status names (``DtsError.code``) -> HTTP status. QueueFull and RequestTooLarge share RESOURCE_EXHAUSTED with
# other causes, so they are told apart by class first (``http_status``).
_STATUS_BY_CODE = {"INVALID_ARGUMENT": 400, "FAILED_PRECONDITION": 400, "NOT_FOUND": 404, "ALREADY_EXISTS": 409,
                   "UNAUTHENTICATED": 401, "DATA_LOSS": 400, "RESOURCE_EXHAUSTED": 503, "DEADLINE_EXCEEDED": 504,
                   "CANCELLED": 499, "INTERNAL": 500}


class HttpError(Exception):
    """A client error with its HTTP status, rendered in the shape of the API it came through.

    ``param`` names the request field to fix (OpenAI's ``param``); ``code`` is a short machine-readable kind.
    """

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = dict(headers or {})


def http_error(exc: DtsError) -> HttpError:
    """The model layer's error as an HTTP error: its status, and Retry-After on a full queue."""
    message = str(exc)
    if isinstance(exc, QueueFull):
        return HttpError(503, message, code="queue_full", headers={"Retry-After": str(RETRY_AFTER_SECONDS)})
    if isinstance(exc, RequestTooLarge):
        return HttpError(413, message, code="too_large")
    if isinstance(exc, ModelNotFound):
        return HttpError(404, message, param="model", code="model_not_found")
    status = _STATUS_BY_CODE.get(exc.code, 500)
    return HttpError(status, message if status != 500 else "internal error; the server log has the details",
                     code=exc.code.lower())


@dataclass(frozen=True)
class ApiContext:
    """What an API's routes work with: the model layer and the server's settings, shared with gRPC."""

    generator: ImageGenerator
    config: "ServerConfig"
    # Settings a client changed at run time (A1111's /options), per API.
    state: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class HttpApi:
    """One HTTP API of the server: its routes and how its errors look. ``http/__init__.py`` lists them.

    Attributes:
        name: for logs and the OpenAPI tags.
        prefix: the path prefix its routes live under (errors on unknown paths below it take its shape).
        router: builds its routes over an ``ApiContext``.
        error_body: (status, message, param, code) -> the JSON body its clients parse.
        body_limits: bytes a request body may have, by path, where larger than ``limits.MAX_HTTP_BODY_BYTES``.
        auth_challenge: the WWW-Authenticate header of its 401 answers.
    """

    name: str
    prefix: str
    router: Callable[[ApiContext], "APIRouter"]
    error_body: Callable[[int, str, str | None, str | None], dict]
    body_limits: Mapping[str, int] = field(default_factory=dict)
    auth_challenge: str = "Bearer"


# -- input -------------------------------------------------------------------------------------------------------

def base64_bytes(text: str, field_name: str, max_bytes: int) -> bytes:
    """Decode a base64 image field (plain, or a ``data:image/...;base64,`` URL), bounded before decoding."""
    if text.startswith("data:"):
        head, comma, text = text.partition(",")
        if not comma or not head.endswith(";base64"):
            raise HttpError(400, f"{field_name} is a data URL without ';base64,'; send the image as base64",
                            param=field_name, code="invalid_base64")
    text = "".join(text.split())  # line breaks of MIME-style base64
    if len(text) > (max_bytes + 2) // 3 * 4:
        raise HttpError(413, f"{field_name} holds more than {max_bytes} bytes of image; send a smaller image (or "
                             "JPEG/WebP instead of PNG)", param=field_name, code="too_large")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise HttpError(400, f"{field_name} is not valid base64; send the image file's bytes base64-encoded",
                        param=field_name, code="invalid_base64") from None
    if not data:
        raise HttpError(400, f"{field_name} is empty; send an image", param=field_name, code="invalid_image")
    return data


def png_bytes(image: Any) -> bytes:
    """A PIL image as a PNG (lossless: the model layer decodes exactly these pixels again)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def resolve_model(generator: ImageGenerator, name: str) -> str:
    """A client's model name as a store model name: exactly, or as A1111 writes it (``title [hash]``, or without
    its file suffix). Unknown names are ModelNotFound listing the models there are."""
    names = generator.model_names()
    wanted = name.strip()
    if wanted.endswith("]") and " [" in wanted:  # A1111's "name.safetensors [abc123]"
        wanted = wanted[:wanted.rindex(" [")]
    if wanted in names:
        return wanted
    stems = {_stem(model): model for model in names}
    if _stem(wanted) in stems:
        return stems[_stem(wanted)]
    raise ModelNotFound(f"model {quote(name)} is not in the model store; available models: {', '.join(names) or 'none'}")


def _stem(name: str) -> str:
    for suffix in (".safetensors", ".ckpt"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


# -- running ------------------------------------------------------------------------------------------------------

class Stopped(Exception):
    """A generation was stopped before its end: by the client going away, or by an API's interrupt."""

    def __init__(self, why: str) -> None:
        super().__init__(why)
        self.why = why


async def wait_for_disconnect(request: "Request") -> None:
    """Returns when the client closes its connection. The body has been read by then, so the next ASGI message is
    the disconnect (or, once the answer is sent, the end of the request)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def run_generation(generator: ImageGenerator, request: GenerationRequest, client: "Request",
                         on_update: UpdateCallback | None = None,
                         stop: asyncio.Event | None = None) -> GenerationOutput:
    """Queue ``request`` and wait for it. The client disconnecting, or ``stop`` being set (an interrupt), cancels
    it: the queue raises the job's stop flag and the device is free at the next step. Raises ``Stopped`` then."""
    # Not streamed: the answer is one body, so the model layer's cap on one response's images applies.
    job = asyncio.ensure_future(generator.generate(request, on_update=on_update))
    watchers = {asyncio.ensure_future(wait_for_disconnect(client)): "the client disconnected"}
    if stop is not None:
        watchers[asyncio.ensure_future(stop.wait())] = "interrupted"
    try:
        done, _ = await asyncio.wait({job, *watchers}, return_when=asyncio.FIRST_COMPLETED)
        if job in done:
            return job.result()
        why = next(watchers[w] for w in watchers if w in done)
        job.cancel()
        await asyncio.wait([job])
        if not job.cancelled() and job.exception() is None:
            return job.result()  # it finished in the same instant: the images are there
        if not job.cancelled() and not isinstance(job.exception(), GenerationCancelled):
            raise job.exception()  # type: ignore[misc]
        raise Stopped(why)
    finally:
        for watcher in watchers:
            watcher.cancel()
        if not job.done():
            job.cancel()
            await asyncio.wait([job])
        if job.done() and not job.cancelled():
            job.exception()  # seen: asyncio would log "never retrieved" otherwise


async def in_pool(function: Callable[..., Any], *args: Any) -> Any:
    """Image work (decoding a client's image, reading a mask) off the event loop, on the server's image pool."""
    from dts_util.executors import IMAGES, run_in

    return await run_in(IMAGES, function, *args)


def invalid(message: str, param: str | None = None) -> HttpError:
    return HttpError(400, message, param=param, code="invalid_value")


def checked_size(value: int | None, name: str) -> int:
    """A width or height as sent over HTTP: None is 0 (the model's or the image's size); 0 itself is out of range,
    unlike the seed protocol's 0-means-default."""
    if value is None:
        return 0
    from dts_util.pipeline.params import MAX_SIZE, MIN_SIZE

    if not MIN_SIZE <= value <= MAX_SIZE:
        raise invalid(f"{name} is {value}; send a multiple of 8 in {MIN_SIZE}..{MAX_SIZE}", name)
    return value


AsyncJob = Callable[[], Awaitable[GenerationOutput]]
__all__ = ["ApiContext", "HttpApi", "HttpError", "InvalidRequest", "Stopped", "base64_bytes", "checked_size",
           "http_error", "in_pool", "invalid", "png_bytes", "resolve_model", "run_generation", "AsyncJob"]
