"""The one log line every request gets, whatever protocol carried it (gRPC or HTTP).

A handler adds fields to ``request_log()`` as it learns them (the generation's summary, a file name);
the protocol's outermost layer starts the record with ``begin()`` and writes it with ``line_fields()``.
Client strings are escaped and cut short there, so a prompt or a file name can neither forge log lines
nor blow one up.
"""

from __future__ import annotations

import contextvars
from typing import Any

from dts_util.client_text import for_log

_request_log: contextvars.ContextVar[dict[str, Any]] = contextvars.ContextVar("request_log")


def request_log() -> dict[str, Any]:
    """Fields the current request's log line will carry; handlers add to it."""
    try:
        return _request_log.get()
    except LookupError:
        return {}


def begin(fields: dict[str, Any] | None = None) -> dict[str, Any]:
    """Start the current request's record (in the request's own context) and return it."""
    fields = {} if fields is None else fields
    _request_log.set(fields)
    return fields


def line_fields(fields: dict[str, Any]) -> str:
    """The record as the tail of a log line: ``key=value`` pairs, the summary as it is, all escaped."""
    return " ".join(for_log(v) if k == "summary" else f"{k}={for_log(v)}" for k, v in fields.items())
