"""The one place where calls are authenticated, bounded, turned into statuses, and logged.

``RequestInterceptor`` wraps every RPC but gRPC health checking (which stays open
for load-balancer probes), whatever its kind (unary or streaming, either way):

- With a token configured, a call without ``authorization: Bearer <token>`` is
  answered UNAUTHENTICATED before any handler runs.
- Each request message is held to its RPC's size limit (``limits.py``) before it is
  parsed into fields; a larger one is RESOURCE_EXHAUSTED.
- A ``DtsError`` becomes its own status code and message; anything unexpected is
  logged with its traceback and answered INTERNAL without details; a cancelled
  call is CANCELLED or DEADLINE_EXCEEDED. The server keeps serving.
- Each call gets exactly one log line: method, status, time, peer, and whatever
  summary the handler recorded through ``request_log()``, with client strings
  escaped and cut short.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from typing import Any, AsyncIterator, Callable

import grpc

from dts_util.client_text import for_log
from dts_util.errors import CallCancelled, DtsError, InvalidRequest, RequestTooLarge, Unauthenticated
from dts_util.limits import (MAX_ECHO_REQUEST_BYTES, MAX_FILES_EXIST_REQUEST_BYTES, MAX_GENERATE_REQUEST_BYTES,
                             MAX_RECEIVE_MESSAGE_BYTES, MAX_UPLOAD_MESSAGE_BYTES)
from dts_util.metrics import observe_request
from dts_util.request_log import begin, line_fields, request_log  # noqa: F401 - request_log: the servicers import it here
from dts_util.security.tokens import TokenChecker

log = logging.getLogger("dts_util.requests")
OPEN_SERVICE_PREFIX = "/grpc.health.v1.Health/"
REQUEST_LIMITS = {"GenerateImage": MAX_GENERATE_REQUEST_BYTES, "GenerateImageStream": MAX_GENERATE_REQUEST_BYTES,
                  "FilesExist": MAX_FILES_EXIST_REQUEST_BYTES,
                  "Echo": MAX_ECHO_REQUEST_BYTES, "UploadFile": MAX_UPLOAD_MESSAGE_BYTES}


class _Oversized:
    """Stands in for a request message that was too large to parse."""

    def __init__(self, size: int) -> None:
        self.size = size


class _Malformed:
    """Stands in for a request message that is not valid protobuf (e.g. a string that is not UTF-8)."""


def _limited(deserialize: Callable[[bytes], Any] | None, limit: int) -> Callable[[bytes], Any]:
    """The handler's parser, refusing oversized messages before parsing and keeping parse errors for the
    handler to answer (an exception in the parser itself would reach the client as a bare INTERNAL)."""
    def parse(data: bytes) -> Any:
        if len(data) > limit:
            return _Oversized(len(data))
        try:
            return deserialize(data) if deserialize is not None else data
        except Exception:  # protobuf's DecodeError, or any parser's own error
            return _Malformed()

    return parse


class RequestInterceptor(grpc.aio.ServerInterceptor):
    """Authentication, per-RPC request limits, status mapping and one log line per call.

    Args:
        token: the bearer token calls must carry ("" = no authentication).
        scrub: turns a message into what a client may see (e.g. removes server paths).
    """

    def __init__(self, token: str = "", scrub: Callable[[str], str] = str, own_secret_prefixes: tuple[str, ...] = (),
                 method_limits: dict[str, int] | None = None) -> None:
        self._checker = TokenChecker(token) if token else None
        self._scrub = scrub
        self._own_secret_prefixes = own_secret_prefixes  # services whose servicers check their own secret
        self._method_limits = method_limits or {}  # full method path -> bytes

    async def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None or details.method.startswith(OPEN_SERVICE_PREFIX):
            return handler
        refused = None
        if self._checker is not None and not details.method.startswith(self._own_secret_prefixes):
            refused = self._checker.why_refused(details.invocation_metadata)
        limit = self._method_limits.get(details.method)
        call = _Call(details.method.rsplit("/", 1)[-1], refused, self._scrub, limit)
        # A refused call's messages are never parsed: it is answered UNAUTHENTICATED from its metadata alone.
        deserialize = (lambda data: None) if refused is not None else _limited(handler.request_deserializer,
                                                                               call.limit)
        kinds = (("unary_unary", grpc.unary_unary_rpc_method_handler, call.unary_response),
                 ("stream_unary", grpc.stream_unary_rpc_method_handler, call.unary_response),
                 ("unary_stream", grpc.unary_stream_rpc_method_handler, call.stream_response),
                 ("stream_stream", grpc.stream_stream_rpc_method_handler, call.stream_response))
        for attribute, make_handler, wrap in kinds:
            behavior = getattr(handler, attribute)
            if behavior is not None:
                return make_handler(wrap(behavior, streaming_request=attribute.startswith("stream")),
                                    deserialize, handler.response_serializer)
        return handler


class _Call:
    """Wraps one RPC method's behaviour with the interceptor's checks, status mapping and log line."""

    def __init__(self, method: str, refused: str | None, scrub: Callable[[str], str], limit: int | None = None) -> None:
        self.method, self.refused, self.scrub = method, refused, scrub
        self.limit = limit or REQUEST_LIMITS.get(method, MAX_RECEIVE_MESSAGE_BYTES)

    def unary_response(self, behavior: Callable, streaming_request: bool) -> Callable:
        async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
            async with _Outcome(self, context) as outcome:
                return await behavior(outcome.admit(request, streaming_request), context)

        return wrapped

    def stream_response(self, behavior: Callable, streaming_request: bool) -> Callable:
        async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            async with _Outcome(self, context) as outcome:
                result = behavior(outcome.admit(request, streaming_request), context)
                if inspect.isasyncgen(result):
                    async for item in result:
                        yield item
                else:  # a handler that writes with context.write()
                    await result

        return wrapped


class _Outcome:
    """The status and log line of one call: entered around the handler, it maps what it raises."""

    def __init__(self, call: _Call, context: grpc.aio.ServicerContext) -> None:
        self.call, self.context = call, context
        self.fields: dict[str, Any] = {}
        self.peer = context.peer()  # read now: a cancelled call no longer knows its peer
        self.code = grpc.StatusCode.OK

    def admit(self, request: Any, streaming_request: bool) -> Any:
        """Refuse an unauthenticated or oversized request; wrap a request stream so each message is checked."""
        if self.call.refused is not None:
            raise Unauthenticated(self.call.refused)
        if streaming_request:
            return self._checked_stream(request)
        self._check_message(request)
        return request

    async def _checked_stream(self, requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
        async for request in requests:
            self._check_message(request)
            yield request

    def _check_message(self, request: Any) -> None:
        if isinstance(request, _Malformed):
            raise InvalidRequest(f"the {self.call.method} request message is not valid protobuf (string fields "
                                 "must be UTF-8); check the client's message definitions")
        if isinstance(request, _Oversized):
            raise RequestTooLarge(f"the {self.call.method} request message is {request.size} bytes; this server "
                                  f"accepts at most {self.call.limit} bytes per {self.call.method} message")

    async def __aenter__(self) -> "_Outcome":
        begin(self.fields)
        self.start = time.perf_counter()
        return self

    async def __aexit__(self, kind: type | None, exc: BaseException | None, tb: Any) -> bool:
        try:
            return await self._map(exc)
        finally:
            self._log()

    def _cancel_code(self) -> grpc.StatusCode:
        remaining = self.context.time_remaining()
        return grpc.StatusCode.DEADLINE_EXCEEDED if remaining is not None and remaining <= 0 else \
            grpc.StatusCode.CANCELLED

    async def _map(self, exc: BaseException | None) -> bool:
        if exc is None:
            return False
        if isinstance(exc, (asyncio.CancelledError, CallCancelled, GeneratorExit)):
            self.code = self._cancel_code()  # the client is gone or out of time: nobody reads a message
            return False
        if isinstance(exc, grpc.aio.AbortError):
            self.code = self.context.code() or grpc.StatusCode.UNKNOWN
            return False
        if isinstance(exc, DtsError):
            self.code, message = grpc.StatusCode[exc.code], self.call.scrub(str(exc))
            self.fields["error"] = message
        elif isinstance(exc, Exception):  # a bug, not the client's doing: log it, answer INTERNAL, keep serving
            self.code = grpc.StatusCode.INTERNAL
            log.error("%s failed unexpectedly", self.call.method, exc_info=exc)
            message = f"internal error in {self.call.method}; the server log has the details"
        else:
            return False
        await self.context.abort(self.code, message)
        return False

    def _log(self) -> None:
        elapsed_ms = (time.perf_counter() - self.start) * 1000
        extra = line_fields(self.fields)
        log.info("%s %s %.1fms peer=%s %s", self.call.method, self.code.name, elapsed_ms, for_log(self.peer), extra)
        observe_request(self.call.method, self.code.name, elapsed_ms / 1000)
