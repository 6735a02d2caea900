"""The one error vocabulary of dts-util.

Every error a client can cause is one of these classes; ``grpc/interceptors.py``
turns each into its gRPC status code in one place. Messages say what was asked
for and what would be accepted, so a client knows what to change.
"""

from __future__ import annotations

import grpc


class DtsError(Exception):
    """Base class; ``code`` is the gRPC status the server answers with."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class InvalidRequest(DtsError):
    """A request parameter is out of range, malformed or inconsistent."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class InvalidPath(InvalidRequest):
    """A client path is empty, absolute, contains '..' or escapes the model store."""


class ModelNotFound(DtsError):
    """The named model is not in the model store."""

    code = grpc.StatusCode.NOT_FOUND


class ModelLoadError(DtsError):
    """The model exists but cannot be loaded (missing parts, corrupt weights)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class FeatureUnavailable(DtsError):
    """The request needs something this server does not have (e.g. a face-restoration model)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class QueueFull(DtsError):
    """Too many generations are already waiting."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class UploadTooLarge(DtsError):
    """An upload passed the configured size limit."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class UploadCorrupt(DtsError):
    """An upload's bytes do not match the size or SHA-256 the client declared."""

    code = grpc.StatusCode.DATA_LOSS


class GenerationCancelled(DtsError):
    """The client cancelled or its deadline passed; generation stopped at a step boundary."""

    code = grpc.StatusCode.CANCELLED


class BackendUnavailable(DtsError):
    """An engine backend (tensorrt, onnxruntime) cannot be imported or has no device."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class EngineBuildError(DtsError):
    """Export, validation or compilation of an engine failed."""

    code = grpc.StatusCode.INTERNAL
