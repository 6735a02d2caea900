"""drawthings.ImageGenerationService: decode, delegate to the model layer, encode.

No ML here. Errors are raised as ``DtsError`` subclasses and turned into gRPC
statuses by ``interceptors.RequestInterceptor``.
"""

from __future__ import annotations

import asyncio
import threading
from typing import AsyncIterator

import grpc

from dts_util import __version__
from dts_util.errors import DtsError, InvalidRequest
from dts_util.grpc import convert
from dts_util.grpc.interceptors import request_log
from dts_util.grpc.proto import image_generation_pb2 as pb
from dts_util.grpc.proto import image_generation_pb2_grpc as pb_grpc
from dts_util.service import ImageService
from dts_util.work_queue import GenerationQueue


class ImageGenerationServicer(pb_grpc.ImageGenerationServiceServicer):
    """The Draw Things RPCs over an ``ImageService``.

    Args:
        service: the model layer.
        queue: runs generations one at a time; bounds how many may wait.
        max_upload_bytes: the largest file UploadFile keeps.
    """

    def __init__(self, service: ImageService, queue: GenerationQueue, max_upload_bytes: int) -> None:
        self.service, self.queue, self.max_upload_bytes = service, queue, max_upload_bytes

    async def Echo(self, request: pb.EchoRequest, context: grpc.aio.ServicerContext) -> pb.EchoResponse:
        models = await asyncio.to_thread(self.service.model_names)
        return convert.echo_response(__version__, models, self.service.config.default_model)

    async def FilesExist(self, request: pb.FilesExistRequest,
                         context: grpc.aio.ServicerContext) -> pb.FilesExistResponse:
        results = []
        for name in request.files:
            try:
                results.append((name, self.service.store.exists(name), ""))
            except DtsError as exc:  # one bad path is an entry's error, not a failed call
                results.append((name, False, str(exc)))
        request_log()["files"] = len(results)
        return convert.files_exist_response(results)

    async def GenerateImage(self, request: pb.ImageGenerationRequest,
                            context: grpc.aio.ServicerContext) -> pb.ImageGenerationResponse:
        model, resolved = await asyncio.to_thread(self.service.prepare, convert.generation_request(request))
        stop = threading.Event()
        output = await self.queue.run(lambda: self.service.generate(model, resolved, stop.is_set), stop)
        request_log()["summary"] = output.summary
        return convert.generation_response(output)

    async def UploadFile(self, request_iterator: AsyncIterator[pb.UploadFileRequest],
                         context: grpc.aio.ServicerContext) -> pb.UploadFileResponse:
        upload, name, expected_sha, expected_size = None, "", "", 0
        try:
            async for chunk in request_iterator:
                if upload is None:
                    name = chunk.filename
                    request_log()["file"] = name
                    upload = self.service.store.open_upload(name, self.max_upload_bytes)
                elif chunk.filename and chunk.filename != name:
                    raise InvalidRequest(f"upload started as {name!r} but a later message names "
                                         f"{chunk.filename!r}; send one file per UploadFile stream")
                expected_sha = chunk.sha256 or expected_sha
                expected_size = chunk.total_size or expected_size
                if chunk.data:
                    await asyncio.to_thread(upload.write, chunk.data)
            if upload is None:
                raise InvalidRequest("the upload stream was empty; the first message must name the file")
            digest = await asyncio.to_thread(upload.commit, expected_sha, expected_size)
        except BaseException:
            if upload is not None:
                upload.abort()
            raise
        request_log()["bytes"] = upload.size
        return convert.upload_response(name, upload.size, digest)
