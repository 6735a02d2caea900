"""drawthings.ImageGenerationService: decode, delegate to the model layer, encode.

No ML here. Errors are raised as ``DtsError`` subclasses and turned into gRPC
statuses by ``interceptors.RequestInterceptor``; blocking work (file system,
generation) runs off the event loop so Echo and health always answer at once.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any, AsyncIterator, Callable, TypeVar

import grpc

from dts_util import __version__
from dts_util.client_text import quote
from dts_util.errors import CallCancelled, DtsError, InvalidRequest, UploadStalled
from dts_util.boundary import ImageGenerator
from dts_util.grpc.drawthings import convert
from dts_util.grpc.interceptors import request_log
from dts_util.grpc.proto import image_generation_pb2 as pb
from dts_util.grpc.proto import image_generation_pb2_grpc as pb_grpc
from dts_util.limits import MAX_FILES_EXIST_ENTRIES, MAX_PATH_CHARS
from dts_util.models.store import Upload

T = TypeVar("T")
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
        models = await asyncio.to_thread(self.generator.model_names)
        return convert.echo_response(__version__, models, self.generator.default_model)

    async def FilesExist(self, request: pb.FilesExistRequest,
                         context: grpc.aio.ServicerContext) -> pb.FilesExistResponse:
        names = list(request.files)
        if len(names) > MAX_FILES_EXIST_ENTRIES:
            raise InvalidRequest(f"FilesExist got {len(names)} files; send at most {MAX_FILES_EXIST_ENTRIES} "
                                 "per call")
        request_log()["files"] = len(names)
        return convert.files_exist_response(await asyncio.to_thread(self._check_files, names))

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
        updates: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()

        def on_update(event: dict, preview: bytes | None) -> None:  # called from the generation thread
            loop.call_soon_threadsafe(updates.put_nowait, convert.progress_update(event, preview))

        job = asyncio.ensure_future(self.generator.generate(convert.generation_request(request), streamed=True,
                                                            on_update=on_update))
        # A client that goes away while an update is being sent leaves this generator parked at its
        # yield; the call's end still stops the generation.
        context.add_done_callback(lambda _: loop.call_soon_threadsafe(job.cancel))
        try:
            while not job.done() or not updates.empty():
                next_update = asyncio.ensure_future(updates.get())
                await asyncio.wait({next_update, job}, return_when=asyncio.FIRST_COMPLETED)
                if next_update.done():
                    yield next_update.result()
                else:
                    next_update.cancel()
            output = job.result()
        except BaseException:
            job.cancel()  # the worker's queue sets the stop flag; the generation ends at its next step
            raise
        request_log()["summary"] = output.summary
        for update in convert.image_pieces(output.images):
            yield update
        yield pb.GenerationUpdate(info=output.info)

    async def UploadFile(self, request_iterator: AsyncIterator[pb.UploadFileRequest],
                         context: grpc.aio.ServicerContext) -> pb.UploadFileResponse:
        watch = _CallWatch(context)
        messages = _UploadMessages(request_iterator, watch, self.upload_idle_timeout)
        first = await messages.next()
        if first is None:
            raise InvalidRequest("the upload stream was empty; the first message must name the file")
        request_log()["file"] = first.filename
        declared = _Declared()
        declared.update(first)  # a malformed declaration is refused before anything is opened
        upload = await self._open(first)
        try:
            digest = await self._receive(upload, first, messages, declared)
            await _confirm_client_finished(context, watch)
            upload.publish()  # no await since the check above: a cancel cannot land in between
        except BaseException:
            upload.abort()
            raise
        if not upload.unchanged:
            self.generator.files_changed(upload.target)
        request_log().update(bytes=upload.size, unchanged=upload.unchanged)
        return convert.upload_response(quote(first.filename), upload.size, digest, upload.unchanged)

    async def _open(self, first: pb.UploadFileRequest) -> Upload:
        """Open the upload in a thread; if the call is cancelled meanwhile, abort what was opened."""
        opening = asyncio.get_running_loop().run_in_executor(
            None, self.generator.store.open_upload, first.filename, first.overwrite, first.total_size)
        try:
            return await asyncio.shield(opening)
        except asyncio.CancelledError:
            await asyncio.wait([opening])
            if not opening.cancelled() and opening.exception() is None:
                opening.result().abort()
            raise

    async def _receive(self, upload: Upload, first: pb.UploadFileRequest, messages: "_UploadMessages",
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
                await _in_thread(upload.write, message.data)
            message = await messages.next()
        return await _in_thread(upload.finish, declared.sha256, declared.size)


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


class _CallWatch:
    """Notices when a call ends (cancelled, deadline, connection lost) while its handler still runs."""

    def __init__(self, context: grpc.aio.ServicerContext) -> None:
        self.ended = asyncio.Event()
        loop = asyncio.get_running_loop()
        context.add_done_callback(lambda _: loop.call_soon_threadsafe(self.ended.set))


class _UploadMessages:
    """The upload's request stream, read with an idle timeout and abandoned as soon as the call ends."""

    def __init__(self, requests: AsyncIterator[pb.UploadFileRequest], watch: _CallWatch, idle_timeout: float) -> None:
        self._requests, self._watch, self._idle_timeout = requests.__aiter__(), watch, idle_timeout

    async def next(self) -> pb.UploadFileRequest | None:
        """The next message, or None when the client half-closed the stream."""
        receive = asyncio.ensure_future(self._requests.__anext__())
        ended = asyncio.ensure_future(self._watch.ended.wait())
        try:
            done, _ = await asyncio.wait({receive, ended}, timeout=self._idle_timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            ended.cancel()
            if not receive.done():
                receive.cancel()
        if receive in done:
            try:
                return receive.result()
            except StopAsyncIteration:
                return None
        if ended in done:
            raise CallCancelled("the client went away during the upload; nothing was kept")
        raise UploadStalled(f"no upload data for {self._idle_timeout:g} s; the upload was aborted and nothing was "
                            "kept (the server's --upload-idle-timeout)")


async def _confirm_client_finished(context: grpc.aio.ServicerContext, watch: _CallWatch) -> None:
    """Make sure the end of the stream was the client's half-close, not a cancel or a lost connection.

    gRPC ends the request stream the same way for both, and reports the cancel
    a moment later. Sending the response headers goes through the gRPC core,
    which fails it on a call that is already cancelled, so once it succeeds the
    client finished its stream on purpose.
    """
    remaining = context.time_remaining()
    if remaining is not None and remaining <= 0:
        raise CallCancelled("the upload's deadline passed; nothing was kept")
    try:
        await context.send_initial_metadata(())
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # the core refused: the call is over
        raise CallCancelled("the client went away before the upload finished; nothing was kept") from exc
    if watch.ended.is_set():
        raise CallCancelled("the client went away before the upload finished; nothing was kept")


async def _in_thread(function: Callable[..., T], *args: Any) -> T:
    """Run a file operation in a thread; if the call is cancelled meanwhile, let it end before going on,
    so the upload is never aborted under a write still in progress."""
    future = asyncio.get_running_loop().run_in_executor(None, function, *args)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        await asyncio.wait([future])
        if not future.cancelled():
            future.exception()  # retrieved: the call is cancelled either way
        raise
