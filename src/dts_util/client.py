"""A small client over the public gRPC API, used by the CLI's client commands and the tests."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import grpc

from dts_util.grpc.proto import image_generation_pb2 as pb
from dts_util.grpc.proto import image_generation_pb2_grpc as pb_grpc
from dts_util.limits import MAX_RESPONSE_BYTES
from dts_util.security.tokens import authorization_metadata

CHUNK_BYTES = 1024 * 1024


@dataclass(frozen=True)
class Security:
    """How a client proves itself and checks the server.

    Args:
        token: bearer token to send ("" = none).
        tls: connect with TLS (implied by ``ca`` or a client certificate).
        ca: PEM file of the CA that signed the server's certificate (None = the system's roots).
        client_cert / client_key: PEM files for mutual TLS.
    """

    token: str = ""
    tls: bool = False
    ca: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None

    @property
    def uses_tls(self) -> bool:
        return self.tls or self.ca is not None or self.client_cert is not None

    def channel_credentials(self) -> grpc.ChannelCredentials:
        read = lambda path: path.read_bytes() if path is not None else None  # noqa: E731
        return grpc.ssl_channel_credentials(root_certificates=read(self.ca), private_key=read(self.client_key),
                                            certificate_chain=read(self.client_cert))


class _Metadata(grpc.UnaryUnaryClientInterceptor, grpc.StreamUnaryClientInterceptor,
                grpc.UnaryStreamClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds fixed metadata (the bearer token) to every call of a channel."""

    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self.metadata = metadata

    def _with_metadata(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        return _CallDetails(details.method, details.timeout, (*(details.metadata or ()), *self.metadata),
                            details.credentials, details.wait_for_ready, details.compression)

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._with_metadata(details), request)

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return continuation(self._with_metadata(details), request_iterator)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._with_metadata(details), request)

    def intercept_stream_stream(self, continuation, details, request_iterator):
        return continuation(self._with_metadata(details), request_iterator)


@dataclass(frozen=True)
class _CallDetails(grpc.ClientCallDetails):
    method: str
    timeout: float | None
    metadata: Any
    credentials: Any
    wait_for_ready: Any
    compression: Any


def open_channel(target: str, security: Security | None = None) -> grpc.Channel:
    """A channel to ``target`` that accepts the largest responses the server sends, with TLS and token."""
    security = security or Security()
    options = [("grpc.max_receive_message_length", MAX_RESPONSE_BYTES)]
    if security.uses_tls:
        channel = grpc.secure_channel(target, security.channel_credentials(), options=options)
    else:
        channel = grpc.insecure_channel(target, options=options)
    if security.token:
        channel = grpc.intercept_channel(channel, _Metadata(authorization_metadata(security.token)))
    return channel


class Client:
    """Blocking client for ``drawthings.ImageGenerationService``.

    Args:
        target: "host:port".
        timeout: seconds per call (None = no deadline).
        security: token and TLS settings (default: plaintext, no token).
    """

    def __init__(self, target: str, timeout: float | None = None, security: Security | None = None) -> None:
        self.channel = open_channel(target, security)
        self.stub = pb_grpc.ImageGenerationServiceStub(self.channel)
        self.timeout = timeout

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.channel.close()

    def echo(self) -> pb.EchoResponse:
        return self.stub.Echo(pb.EchoRequest(), timeout=self.timeout)

    def files_exist(self, names: list[str]) -> pb.FilesExistResponse:
        return self.stub.FilesExist(pb.FilesExistRequest(files=names), timeout=self.timeout)

    def generate(self, **fields: object) -> pb.ImageGenerationResponse:
        return self.stub.GenerateImage(pb.ImageGenerationRequest(**fields), timeout=self.timeout)

    def generate_stream(self, on_event: Callable[[dict, bytes], None] | None = None,
                        **fields: object) -> tuple[list[bytes], str]:
        """GenerateImageStream: (PNGs, info JSON); ``on_event(event, preview_png)`` sees progress as it comes."""
        import json

        pieces: dict[int, list[bytes]] = {}
        info = ""
        for update in self.stub.GenerateImageStream(pb.ImageGenerationRequest(**fields), timeout=self.timeout):
            if update.event and on_event is not None:
                on_event(json.loads(update.event), update.preview)
            if update.image_data or update.image_done:
                pieces.setdefault(update.image_index, []).append(update.image_data)
            if update.info:
                info = update.info
        return [b"".join(pieces[index]) for index in sorted(pieces)], info

    def upload(self, path: Path, name: str, progress: Callable[[int], None] | None = None,
               overwrite: bool = False) -> pb.UploadFileResponse:
        """Stream ``path`` as ``name``, declaring its size and SHA-256 so the server can check them."""
        digest = hashlib.sha256()
        with path.open("rb") as fh:
            while block := fh.read(CHUNK_BYTES):
                digest.update(block)
        size = path.stat().st_size

        def chunks() -> Iterator[pb.UploadFileRequest]:
            yield pb.UploadFileRequest(filename=name, sha256=digest.hexdigest(), total_size=size, overwrite=overwrite)
            with path.open("rb") as fh:
                while block := fh.read(CHUNK_BYTES):
                    yield pb.UploadFileRequest(data=block)
                    if progress is not None:
                        progress(len(block))

        return self.stub.UploadFile(chunks(), timeout=self.timeout)


def explain_rpc_error(exc: grpc.RpcError, target: str) -> str:
    """One line for a failed call that says what went wrong and what to try."""
    code, details = exc.code(), exc.details() or ""
    lowered = details.lower()
    if code == grpc.StatusCode.UNAVAILABLE:
        if any(word in lowered for word in ("resolving", "lookup", "dns resolution", "name or service not known")):
            return f"cannot resolve the host of {target}: check the host name"
        if any(word in lowered for word in ("handshake", "ssl", "certificate")):
            return (f"TLS with {target} failed ({details}); check --tls/--ca (and --client-cert/--client-key "
                    "for mutual TLS), and that the server's certificate names this host")
        if "connection refused" in lowered:
            return f"nothing is listening at {target} (start it with `dts-util serve`)"
        if any(word in lowered for word in ("socket closed", "reset", "goaway", "eof", "broken pipe")):
            return (f"the connection to {target} was lost mid-request ({details}); the server may have stopped, "
                    "or it speaks TLS and this client did not (try --tls)")
        return f"{target} is unavailable: {details}"
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return f"UNAUTHENTICATED: {details}"
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and "received message larger than max" in lowered:
        return (f"the answer from {target} is larger than this client accepts ({details}); request fewer or "
                "smaller images")
    return f"{code.name}: {details}"
