"""drawthings.ImageGenerationService: decode, delegate to the model layer, encode.

No ML here. Errors are raised as ``DtsError`` subclasses and turned into gRPC
statuses by ``interceptors.RequestInterceptor``; blocking work (file system,
generation) runs off the event loop so Echo and health always answer at once.
"""

from __future__ import annotations

import re
from typing import AsyncIterator

import grpc

from dts_util import __version__
from dts_util.client_text import quote
from dts_util.errors import DtsError, InvalidRequest
from dts_util.boundary import GenerationOutput, ImageGenerator
from dts_util.grpc.call_streams import (CallWatch, UploadMessages, confirm_client_finished, generation_stream,
                                        in_thread, open_upload, uploaded)
from dts_util.grpc.drawthings import convert
from dts_util.grpc.interceptors import request_log
from dts_util.grpc.proto import image_generation_pb2 as pb
from dts_util.grpc.proto import image_generation_pb2_grpc as pb_grpc
from dts_util.limits import MAX_FILES_EXIST_ENTRIES, MAX_PATH_CHARS
from dts_util.models.store import Upload
from dts_util.executors import FILES, run_in

_SHA256 = re.compile(r"[0-9a-fA-F]{64}")


class ImageGenerationServicer(pb_grpc.ImageGenerationServiceServicer):
    """The Draw Things RPCs over the model layer.

    Args:
        generator: the model layer (a ``WorkerPool``): runs generations, owns the store, whose
            policy bounds uploads.
        upload_idle_timeout: seconds an upload may go without a message before it is aborted.
    """

    def __init__(self, generator: ImageGenerator, upload_idle_timeout: float) -> None:
        self.generator, self.upload_idle_timeout = generator, upload_idle_timeout

    async def Echo(self, request: pb.EchoRequest, context: grpc.aio.ServicerContext) -> pb.EchoResponse:
        models = await run_in(FILES, self.generator.model_names)
        described = await run_in(FILES, self.generator.describe_models)
        return convert.echo_response(__version__, models, self.generator.default_model, described)

    async def FilesExist(self, request: pb.FilesExistRequest,
                         context: grpc.aio.ServicerContext) -> pb.FilesExistResponse:
        names = list(request.files)
        if len(names) > MAX_FILES_EXIST_ENTRIES:
            raise InvalidRequest(f"FilesExist got {len(names)} files; send at most {MAX_FILES_EXIST_ENTRIES} "
                                 "per call")
        request_log()["files"] = len(names)
        return convert.files_exist_response(await run_in(FILES, self._check_files, names))

    def _check_files(self, names: list[str]) -> list[tuple[str, bool, str]]:
        results = []
        for name in names:
            try:
                results.append((name, self.generator.store.exists(name), ""))
            except DtsError as exc:  # one bad path is an entry's error, not a failed call
                results.append((name[:MAX_PATH_CHARS], False, str(exc)))
        return results

    async def GenerateImage(self, request: pb.ImageGenerationRequest,
                            context: grpc.aio.ServicerContext) -> pb.ImageGenerationResponse:
        output = await self.generator.generate(convert.generation_request(request))
        request_log()["summary"] = output.summary
        return convert.generation_response(output)

    async def GenerateImageStream(self, request: pb.ImageGenerationRequest,
                                  context: grpc.aio.ServicerContext) -> AsyncIterator[pb.GenerationUpdate]:
        """GenerateImage, streamed: progress events as they happen, then images in pieces, then the info."""
        async for item in generation_stream(self.generator, convert.generation_request(request), context,
                                            convert.progress_update):
            if not isinstance(item, GenerationOutput):
                yield item
        output = item
        request_log()["summary"] = output.summary
        for update in convert.image_pieces(output.images):
            yield update
        yield pb.GenerationUpdate(info=output.info)

    async def UploadFile(self, request_iterator: AsyncIterator[pb.UploadFileRequest],
                         context: grpc.aio.ServicerContext) -> pb.UploadFileResponse:
        watch = CallWatch(context)
        messages = UploadMessages(request_iterator, watch, self.upload_idle_timeout)
        first = await messages.next()
        if first is None:
            raise InvalidRequest("the upload stream was empty; the first message must name the file")
        request_log()["file"] = first.filename
        declared = _Declared()
        declared.update(first)  # a malformed declaration is refused before anything is opened
        upload = await open_upload(self.generator.store, first.filename, first.overwrite, first.total_size)
        try:
            digest = await self._receive(upload, first, messages, declared)
            await confirm_client_finished(context, watch)
            upload.publish()  # no await since the check above: a cancel cannot land in between
        except BaseException:
            upload.abort()
            raise
        uploaded(self.generator, upload)
        return convert.upload_response(quote(first.filename), upload.size, digest, upload.unchanged)

    async def _receive(self, upload: Upload, first: pb.UploadFileRequest, messages: UploadMessages,
                       declared: "_Declared") -> str:
        """Write every chunk until the client half-closes; then check and sync. Returns the SHA-256."""
        message: pb.UploadFileRequest | None = first
        while message is not None:
            if message.filename and message.filename != first.filename:
                raise InvalidRequest(f"upload started as {quote(first.filename)} but a later message names "
                                     f"{quote(message.filename)}; send one file per UploadFile stream")
            declared.update(message)
            upload.overwrite = upload.overwrite or message.overwrite
            if message.data:
                await in_thread(upload.write, message.data)
            message = await messages.next()
        return await in_thread(upload.finish, declared.sha256, declared.size)


class _Declared:
    """The size and hash a client declared for its upload (any message may carry them)."""

    def __init__(self) -> None:
        self.sha256, self.size = "", 0

    def update(self, message: pb.UploadFileRequest) -> None:
        if message.sha256:
            if not _SHA256.fullmatch(message.sha256):
                raise InvalidRequest(f"sha256 {quote(message.sha256, 80)} is not 64 hexadecimal digits")
            self.sha256 = message.sha256
        if message.total_size < 0:
            raise InvalidRequest(f"total_size is {message.total_size}; send the file's size in bytes, or 0")
        self.size = message.total_size or self.size
