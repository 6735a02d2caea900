"""The FastAPI application of the HTTP APIs, with what every request goes through first (``Guard``):

- the token (``Authorization: Bearer <token>``, or HTTP basic auth with the token as the password, as A1111's
  ``--api-auth`` clients send it), compared in constant time; the OpenAPI schema and the docs stay open;
- the body's size, from Content-Length before a byte is read and counted as it arrives (413);
- how long the client may take to send its body (the server's ``--http-timeout``: 408);
- errors as the API's own clients parse them (A1111's or OpenAI's JSON), never a traceback;
- one log line per request, with the client's strings escaped, and the request metrics gRPC has.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json
import logging
import time
from typing import Any, Awaitable, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from dts_util import __version__
from dts_util.client_text import for_log
from dts_util.errors import DtsError
from dts_util.http.common import ApiContext, HttpApi, HttpError, Stopped, http_error
from dts_util.limits import MAX_HTTP_BODY_BYTES
from dts_util.metrics import observe_request
from dts_util.request_log import begin, line_fields, request_log

log = logging.getLogger("dts_util.requests")
# Open without a token: the API's shape is no secret, and the docs page fetches the schema without credentials.
OPEN_PATHS = ("/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc")
Scope, Message = dict[str, Any], dict[str, Any]
Receive, Send = Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]


class _BodyTooLarge(StarletteHTTPException):
    """Raised from ``receive`` itself: FastAPI passes HTTPExceptions of the body's reading through as they are."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body is over this endpoint's limit of {limit} bytes; send less (a "
                              "smaller image, or JPEG/WebP instead of PNG)", headers={"Connection": "close"})


class _BodyTimeout(StarletteHTTPException):
    def __init__(self, timeout: float) -> None:
        super().__init__(408, f"the request body did not arrive within {timeout:g} s (the server's --http-timeout)",
                         headers={"Connection": "close"})


def build_app(ctx: ApiContext, apis: tuple[HttpApi, ...]) -> FastAPI:
    """The application serving ``apis`` over the model layer and settings of ``ctx``."""
    app = FastAPI(title="dts-util HTTP APIs", version=__version__,
                  description="AUTOMATIC1111's /sdapi/v1 and OpenAI's Images API over the dts-util model layer.")
    endpoints: set[str] = set()
    for api in apis:
        routes = api.router(ctx)
        endpoints.update(getattr(route, "path", "") for route in routes.routes)
        app.include_router(routes)
    errors = ErrorRenderer(apis)
    app.add_exception_handler(HttpError, errors.http_error)
    app.add_exception_handler(DtsError, errors.dts_error)
    app.add_exception_handler(RequestValidationError, errors.validation_error)
    app.add_exception_handler(StarletteHTTPException, errors.starlette_error)
    app.add_middleware(Guard, token=ctx.config.auth_token, timeout=ctx.config.http_timeout, apis=apis, errors=errors,
                       endpoints=frozenset(endpoints))
    return app


class ErrorRenderer:
    """Errors in the shape of the API whose path they came in on (A1111's by default)."""

    def __init__(self, apis: tuple[HttpApi, ...]) -> None:
        self.apis = apis

    def api_for(self, path: str) -> HttpApi:
        return next((api for api in self.apis if path.startswith(api.prefix + "/")), self.apis[0])

    def response(self, path: str, error: HttpError) -> JSONResponse:
        request_log()["error"] = error.message  # the request's log line says why
        body = self.api_for(path).error_body(error.status, error.message, error.param, error.code)
        return JSONResponse(body, status_code=error.status, headers=error.headers)

    async def http_error(self, request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, HttpError)
        return self.response(request.url.path, exc)

    async def dts_error(self, request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, DtsError)
        return self.response(request.url.path, http_error(exc))

    async def validation_error(self, request: Request, exc: Exception) -> JSONResponse:
        """422 naming the field: malformed JSON, a missing field or a value of the wrong type."""
        assert isinstance(exc, RequestValidationError)
        first = exc.errors()[0] if exc.errors() else {"loc": ("body",), "msg": "invalid request"}
        location = [str(part) for part in first.get("loc", ()) if part != "body"]
        param = ".".join(location) or None
        if first.get("type") == "json_invalid":
            message, code = f"the body is not valid JSON ({first.get('ctx', {}).get('error', 'parse error')})", \
                "invalid_json"
        else:
            message, code = f"{param or 'the body'}: {first.get('msg', 'invalid value')}", "invalid_type"
        if self.api_for(request.url.path).prefix == self.apis[0].prefix:
            request_log()["error"] = message
            # A1111's clients read FastAPI's own 422 list; "error"/"errors" add its middleware's message.
            return JSONResponse({"detail": _jsonable(exc.errors()), "error": "RequestValidationError",
                                 "errors": message}, status_code=422)
        return self.response(request.url.path, HttpError(422, message, param=param, code=code))

    async def starlette_error(self, request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        message = {404: f"no such endpoint: {request.method} {request.url.path[:200]}",
                   405: f"{request.method} is not allowed on {request.url.path[:200]}"}.get(exc.status_code,
                                                                                          str(exc.detail))
        code = {404: "not_found", 405: "method_not_allowed", 408: "timeout", 413: "too_large"}.get(exc.status_code)
        return self.response(request.url.path, HttpError(exc.status_code, message, code=code,
                                                          headers=getattr(exc, "headers", None)))


def _jsonable(errors: Any) -> Any:
    """Pydantic's error list without what JSON cannot carry (exceptions inside ``ctx``), and without the input
    echoed back (it may be a 20 MB image)."""
    cleaned = []
    for error in errors:
        item = {k: v for k, v in error.items() if k not in ("input", "ctx", "url")}
        cleaned.append(json.loads(json.dumps(item, default=str)))
    return cleaned


class Guard:
    """Pure ASGI middleware: authentication, body limits and timeouts, error mapping, the log line."""

    def __init__(self, app: Any, token: str, timeout: float, apis: tuple[HttpApi, ...], errors: ErrorRenderer,
                 endpoints: frozenset[str] = frozenset()) -> None:
        self.app, self.timeout, self.errors, self.endpoints = app, timeout, errors, endpoints
        self._bearer = ("Bearer " + token).encode() if token else None
        self._token = token.encode()
        self._limits = {path: limit for api in apis for path, limit in api.body_limits.items()}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        record = _Record(scope)
        begin(record.fields)
        try:
            refused = self._refusal(scope)
            if refused is not None:
                await self._send_error(scope, send, record, refused)
                return
            receive = self._bounded(scope, receive, record)
            await self.app(scope, receive, record.watch(send))
        except StarletteHTTPException as exc:  # the body's limit or deadline, met outside a route's own reading
            await self._send_error(scope, send, record, HttpError(exc.status_code, str(exc.detail),
                                                                  headers=exc.headers))
        except (Stopped, ClientDisconnect):
            record.status = 499  # the client went away: nobody reads an answer
        except asyncio.CancelledError:
            record.status = 499  # the server is stopping
            raise
        except Exception:  # a bug: logged once here with its traceback, answered 500 without details
            log.exception("HTTP %s %s failed unexpectedly", scope["method"], for_log(scope["path"]))
            await self._send_error(scope, send, record, HttpError(500, "internal error; the server log has the "
                                                                       "details", code="internal_error"))
        finally:
            record.log(self.endpoints)

    def _limit(self, path: str) -> int:
        return self._limits.get(path, MAX_HTTP_BODY_BYTES)

    def _refusal(self, scope: Scope) -> HttpError | None:
        """Why the request is refused before it is read (token, declared size), or None."""
        path = scope["path"]
        if self._bearer is not None and path not in OPEN_PATHS:
            why = self._token_refusal(_header(scope, b"authorization"))
            if why is not None:
                challenge = self.errors.api_for(path).auth_challenge
                return HttpError(401, why, code="invalid_api_key", headers={"WWW-Authenticate": challenge})
        declared = _header(scope, b"content-length")
        if declared is not None:
            if not declared.isdigit():
                return HttpError(400, "Content-Length is not a number", code="invalid_header")
            if int(declared) > self._limit(path):
                return HttpError(413, f"the request body is {int(declared)} bytes; this endpoint accepts at most "
                                      f"{self._limit(path)} (a smaller image, or JPEG/WebP instead of PNG)",
                                 code="too_large", headers={"Connection": "close"})
        return None

    def _token_refusal(self, value: bytes | None) -> str | None:
        """None when ``value`` carries the token (bearer, or basic auth with it as the password), else why not
        (without echoing what was sent)."""
        if value is None:
            return ("this server needs a token: send `Authorization: Bearer <token>`, or HTTP basic auth with the "
                    "token as the password")
        if value[:6].lower() == b"basic ":
            try:
                _, _, password = base64.b64decode(value[6:].strip(), validate=True).partition(b":")
            except (binascii.Error, ValueError):
                password = b""
            ok = hmac.compare_digest(password, self._token)
        else:
            ok = hmac.compare_digest(value, self._bearer or b"")
        return None if ok else "the token is not valid for this server"

    def _bounded(self, scope: Scope, receive: Receive, record: "_Record") -> Receive:
        """``receive`` counting the body against its limit and timing each piece; after the last piece it passes
        messages through (the wait for a disconnect lasts as long as the generation)."""
        limit, state = self._limit(scope["path"]), {"received": 0, "done": False}

        async def bounded() -> Message:
            if state["done"]:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.timeout)
            except asyncio.TimeoutError:
                raise _BodyTimeout(self.timeout) from None
            if message["type"] == "http.request":
                state["received"] += len(message.get("body", b""))
                record.received = state["received"]
                if state["received"] > limit:
                    raise _BodyTooLarge(limit)
                state["done"] = not message.get("more_body", False)
            else:
                state["done"] = True
            return message

        return bounded

    async def _send_error(self, scope: Scope, send: Send, record: "_Record", error: HttpError) -> None:
        record.fields["error"] = error.message
        if record.started:
            return  # the answer is on its way already; the connection is closed by the server
        response = self.errors.response(scope["path"], error)
        await response(scope, _no_receive, record.watch(send))


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}


def _header(scope: Scope, name: bytes) -> bytes | None:
    values = [value for key, value in scope["headers"] if key == name]
    return values[0] if values else None


class _Record:
    """The request's log line: method, path, status, time, peer, bytes in and out, and the handler's fields."""

    def __init__(self, scope: Scope) -> None:
        self.method, self.path = scope["method"], scope["path"]
        client = scope.get("client") or ("?", 0)
        self.peer = f"{client[0]}:{client[1]}"
        self.route = scope["path"]
        self.start = time.perf_counter()
        self.status, self.received, self.sent, self.started = 0, 0, 0, False
        self.fields: dict[str, Any] = {}

    def watch(self, send: Send) -> Send:
        async def watched(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.status, self.started = message["status"], True
            elif message["type"] == "http.response.body":
                self.sent += len(message.get("body", b""))
            await send(message)

        return watched

    def log(self, endpoints: frozenset[str]) -> None:
        elapsed = time.perf_counter() - self.start
        status = self.status or 499
        log.info("HTTP %s %s %d %.1fms peer=%s in=%dB out=%dB %s", self.method, for_log(self.path, 120), status,
                 elapsed * 1000, for_log(self.peer), self.received, self.sent, line_fields(self.fields))
        # Metrics by endpoint, never by raw path (clients choose paths: the label set must stay bounded).
        known = self.path in endpoints and self.method in ("GET", "POST")
        observe_request(f"HTTP {self.method} {self.path}" if known else "HTTP other", str(status),
                        elapsed)
