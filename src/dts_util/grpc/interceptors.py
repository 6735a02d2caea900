"""The one place where exceptions become gRPC statuses, and where each request is logged.

Every drawthings RPC passes through ``RequestInterceptor``: a ``DtsError`` becomes
its own status code and message; anything unexpected is logged with its
traceback and answered INTERNAL, and the server keeps serving. Each request then
gets exactly one log line with its method, status, time and whatever summary the
handler recorded through ``request_log()`` (size, backends, ...).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from typing import Any, Awaitable, Callable

import grpc

from dts_util.errors import DtsError

log = logging.getLogger("dts_util.requests")
_request_log: contextvars.ContextVar[dict[str, Any]] = contextvars.ContextVar("request_log")
SERVICE_PREFIX = "/drawthings."


def request_log() -> dict[str, Any]:
    """Fields the current request's log line will carry; handlers add to it."""
    try:
        return _request_log.get()
    except LookupError:
        return {}


class RequestInterceptor(grpc.aio.ServerInterceptor):
    """Maps errors to status codes and logs one line per drawthings request."""

    async def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None or not details.method.startswith(SERVICE_PREFIX):
            return handler
        method = details.method.rsplit("/", 1)[-1]
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                _wrap(method, handler.unary_unary), handler.request_deserializer, handler.response_serializer)
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                _wrap(method, handler.stream_unary), handler.request_deserializer, handler.response_serializer)
        return handler


def _wrap(method: str, behavior: Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]) -> Callable:
    async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
        fields: dict[str, Any] = {}
        _request_log.set(fields)
        start = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            return await behavior(request, context)
        except DtsError as exc:
            code = exc.code
            fields["error"] = str(exc)
            await context.abort(exc.code, str(exc))
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except grpc.aio.AbortError:
            code = context.code() or grpc.StatusCode.UNKNOWN
            raise
        except Exception as exc:  # a bug, not the client's doing: log it, answer INTERNAL, keep serving
            code = grpc.StatusCode.INTERNAL
            log.exception("%s failed unexpectedly", method)
            await context.abort(grpc.StatusCode.INTERNAL,
                                f"internal error in {method}: {type(exc).__name__}: {exc}; see the server log")
        finally:
            elapsed_ms = (time.perf_counter() - start) * 1000
            extra = " ".join(f"{k}={v}" if k != "summary" else str(v) for k, v in fields.items())
            log.info("%s %s %.1fms peer=%s %s", method, code.name, elapsed_ms, context.peer(), extra)

    return wrapped
