"""Helpers for streaming calls, shared by both protocols: a generation's progress as a response stream,
noticing a call's end, reading a client stream with an idle timeout, telling a half-close from a cancel,
and file work in threads that a cancel cannot cut short."""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator, Callable, TypeVar

import grpc

from dts_util.boundary import GenerationOutput, GenerationRequest, ImageGenerator, LatentPreview
from dts_util.errors import CallCancelled, UploadStalled
from dts_util.grpc.interceptors import request_log
from dts_util.executors import FILES

T = TypeVar("T")


class CallWatch:
    """Notices when a call ends (cancelled, deadline, connection lost) while its handler still runs."""

    def __init__(self, context: grpc.aio.ServicerContext) -> None:
        self.ended = asyncio.Event()
        loop = asyncio.get_running_loop()
        context.add_done_callback(lambda _: loop.call_soon_threadsafe(self.ended.set))


class UploadMessages:
    """The upload's request stream, read with an idle timeout and abandoned as soon as the call ends."""

    def __init__(self, requests: AsyncIterator[Any], watch: CallWatch, idle_timeout: float) -> None:
        self._requests, self._watch, self._idle_timeout = requests.__aiter__(), watch, idle_timeout

    async def next(self) -> Any:
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


async def confirm_client_finished(context: grpc.aio.ServicerContext, watch: CallWatch) -> None:
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


async def in_thread(function: Callable[..., T], *args: Any) -> T:
    """Run a file operation in a thread; if the call is cancelled meanwhile, let it end before going on,
    so the upload is never aborted under a write still in progress."""
    future = asyncio.get_running_loop().run_in_executor(FILES, function, *args)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        await asyncio.wait([future])
        if not future.cancelled():
            future.exception()  # retrieved: the call is cancelled either way
        raise


async def generation_stream(generator: ImageGenerator, request: GenerationRequest, context: grpc.aio.ServicerContext,
                            to_message: Callable[[dict, bytes | None], Any]) -> AsyncIterator[Any]:
    """Run ``request`` streamed: yields ``to_message(event, preview)`` for each progress event as it happens
    (``None`` results are skipped), then the ``GenerationOutput``. The call's end stops the generation."""
    updates: asyncio.Queue = asyncio.Queue()
    loop = asyncio.get_running_loop()

    def on_update(event: dict, preview: bytes | LatentPreview | None) -> None:  # called from the generation thread
        loop.call_soon_threadsafe(updates.put_nowait, to_message(event, preview))

    job = asyncio.ensure_future(generator.generate(request, streamed=True, on_update=on_update))
    # A call that ends early never awaits the job again: its GenerationCancelled is expected, not worth a traceback.
    job.add_done_callback(_retrieve_outcome)
    # A client that goes away while an update is being sent leaves the caller parked at its yield; the
    # call's end still stops the generation.
    context.add_done_callback(lambda _: loop.call_soon_threadsafe(job.cancel))
    try:
        while not job.done() or not updates.empty():
            next_update = asyncio.ensure_future(updates.get())
            await asyncio.wait({next_update, job}, return_when=asyncio.FIRST_COMPLETED)
            if next_update.done():
                if next_update.result() is not None:
                    yield next_update.result()
            else:
                next_update.cancel()
        output: GenerationOutput = job.result()
    except BaseException:
        job.cancel()  # the worker's queue sets the stop flag; the generation ends at its next step
        raise
    yield output


def _retrieve_outcome(task: asyncio.Future) -> None:
    """Mark a finished task's exception as seen (asyncio logs "exception was never retrieved" otherwise)."""
    if not task.cancelled():
        task.exception()


async def open_upload(store: Any, name: str, overwrite: bool, declared_size: int) -> Any:
    """``store.open_upload`` in a thread; if the call is cancelled meanwhile, abort what was opened."""
    opening = asyncio.get_running_loop().run_in_executor(FILES, store.open_upload, name, overwrite, declared_size)
    try:
        return await asyncio.shield(opening)
    except asyncio.CancelledError:
        await asyncio.wait([opening])
        if not opening.cancelled() and opening.exception() is None:
            opening.result().abort()
        raise


def uploaded(generator: ImageGenerator, upload: Any) -> None:
    """After a published upload: models loaded from a replaced file are dropped, and the log line says what came."""
    if not upload.unchanged:
        generator.files_changed(upload.target)
    request_log().update(bytes=upload.size, unchanged=upload.unchanged)
