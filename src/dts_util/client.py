"""A small client over the public gRPC API, used by the CLI's client commands and the tests."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable, Iterator

import grpc

from dts_util.grpc.proto import image_generation_pb2 as pb
from dts_util.grpc.proto import image_generation_pb2_grpc as pb_grpc
from dts_util.config import MAX_MESSAGE_BYTES

CHUNK_BYTES = 1024 * 1024


class Client:
    """Blocking client for ``drawthings.ImageGenerationService``.

    Args:
        target: "host:port".
        timeout: seconds per call (None = no deadline).
    """

    def __init__(self, target: str, timeout: float | None = None) -> None:
        self.channel = grpc.insecure_channel(target, options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                                                              ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)])
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

    def upload(self, path: Path, name: str, progress: Callable[[int], None] | None = None) -> pb.UploadFileResponse:
        """Stream ``path`` as ``name``, declaring its size and SHA-256 so the server can check them."""
        digest = hashlib.sha256()
        with path.open("rb") as fh:
            while block := fh.read(CHUNK_BYTES):
                digest.update(block)
        size = path.stat().st_size

        def chunks() -> Iterator[pb.UploadFileRequest]:
            yield pb.UploadFileRequest(filename=name, sha256=digest.hexdigest(), total_size=size)
            with path.open("rb") as fh:
                while block := fh.read(CHUNK_BYTES):
                    yield pb.UploadFileRequest(data=block)
                    if progress is not None:
                        progress(len(block))

        return self.stub.UploadFile(chunks(), timeout=self.timeout)
