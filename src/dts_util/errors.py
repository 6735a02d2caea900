"""The one error vocabulary of dts-util.

Every error a client can cause is one of these classes; ``grpc/interceptors.py``
turns each into its gRPC status code in one place. Messages say what was asked
for and what would be accepted, so a client knows what to change.
"""

from __future__ import annotations


class DtsError(Exception):
    """Base class; ``code`` names the gRPC status the server answers with (a ``grpc.StatusCode`` member).

    A name rather than the enum keeps this module free of grpc, so the model layer and the
    boundary types import it without pulling a protocol in.
    """

    code: str = "INTERNAL"


class InvalidRequest(DtsError):
    """A request parameter is out of range, malformed or inconsistent."""

    code = "INVALID_ARGUMENT"


class InvalidPath(InvalidRequest):
    """A client path is empty, absolute, contains '..' or escapes the model store."""


class PathConflict(DtsError):
    """A client path collides with what is in the store (a folder where a file should go, a file as a parent)."""

    code = "FAILED_PRECONDITION"


class FileExists(DtsError):
    """An upload would replace an existing, different file without ``overwrite``."""

    code = "ALREADY_EXISTS"


class ModelNotFound(DtsError):
    """The named model is not in the model store."""

    code = "NOT_FOUND"


class ModelLoadError(DtsError):
    """The model exists but cannot be loaded (missing parts, corrupt weights)."""

    code = "FAILED_PRECONDITION"


class FeatureUnavailable(DtsError):
    """The request needs something this server does not have (e.g. a face-restoration model)."""

    code = "FAILED_PRECONDITION"


class QueueFull(DtsError):
    """Too many generations are already waiting."""

    code = "RESOURCE_EXHAUSTED"


class UploadTooLarge(DtsError):
    """An upload passed the configured size limit."""

    code = "RESOURCE_EXHAUSTED"


class StoreFull(DtsError):
    """An upload would pass the store quota or the free-disk floor, or too many run at once."""

    code = "RESOURCE_EXHAUSTED"


class RequestTooLarge(DtsError):
    """A request message is larger than its RPC accepts, or its answer could not fit in one message."""

    code = "RESOURCE_EXHAUSTED"


class UploadStalled(DtsError):
    """No upload data arrived within the idle timeout."""

    code = "DEADLINE_EXCEEDED"


class Unauthenticated(DtsError):
    """The request carries no valid bearer token."""

    code = "UNAUTHENTICATED"


class UploadCorrupt(DtsError):
    """An upload's bytes do not match the size or SHA-256 the client declared."""

    code = "DATA_LOSS"


class CallCancelled(DtsError):
    """The client cancelled, went away, or its deadline passed; the work was stopped and nothing kept."""

    code = "CANCELLED"


class GenerationCancelled(CallCancelled):
    """The client cancelled or its deadline passed; generation stopped at a step boundary."""


class DeviceOutOfMemory(DtsError):
    """The GPU ran out of memory for this request; the server keeps serving."""

    code = "RESOURCE_EXHAUSTED"


class GenerationTimedOut(DtsError):
    """One generation ran past the server's --max-generation-seconds; it stopped at a step boundary."""

    code = "DEADLINE_EXCEEDED"


class BackendUnavailable(DtsError):
    """An engine backend (tensorrt, onnxruntime) cannot be imported or has no device."""

    code = "FAILED_PRECONDITION"


class EngineBuildError(DtsError):
    """Export, validation or compilation of an engine failed."""

    code = "INTERNAL"


class StartupError(Exception):
    """The server cannot start (port in use, no CUDA, bad store path, no default model).

    Not a ``DtsError``: no client caused it. The CLI prints it as one line and exits non-zero.
    """
