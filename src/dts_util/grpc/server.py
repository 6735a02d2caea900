"""Server start-up: gRPC server, interceptor, health, reflection, signals, graceful stop."""

from __future__ import annotations

import asyncio
import logging
import signal

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from dts_util.config import MAX_MESSAGE_BYTES, ServerConfig
from dts_util.grpc.interceptors import RequestInterceptor
from dts_util.grpc.proto import image_generation_pb2 as pb
from dts_util.grpc.proto import image_generation_pb2_grpc as pb_grpc
from dts_util.grpc.servicer import ImageGenerationServicer
from dts_util.service import ImageService
from dts_util.work_queue import GenerationQueue

log = logging.getLogger(__name__)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ImageGenerationService"].full_name
# Seconds in-flight RPCs get to finish on SIGTERM/SIGINT before they are cancelled.
GRACE_SECONDS = 10.0


class RunningServer:
    """A started server: its port, health servicer and queue, for tests and ``serve``."""

    def __init__(self, server: grpc.aio.Server, port: int, health_servicer: health.aio.HealthServicer,
                 queue: GenerationQueue, service: ImageService) -> None:
        self.server, self.port, self.health, self.queue, self.service = server, port, health_servicer, queue, service

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    async def stop(self, grace: float | None = GRACE_SECONDS) -> None:
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
        self.queue.shutdown()


async def start_server(config: ServerConfig, service: ImageService) -> RunningServer:
    """Bind, register services and start; health says NOT_SERVING until ``set_serving(True)``."""
    options = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
               ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]
    server = grpc.aio.server(interceptors=[RequestInterceptor()], options=options)
    queue = GenerationQueue(config.max_queue)
    pb_grpc.add_ImageGenerationServiceServicer_to_server(
        ImageGenerationServicer(service, queue, config.max_upload_bytes), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server)
    host = f"[{config.address}]" if ":" in config.address else config.address
    port = server.add_insecure_port(f"{host}:{config.port}")
    if port == 0:
        raise OSError(f"cannot listen on {config.address}:{config.port} (address in use?)")
    await server.start()
    running = RunningServer(server, port, health_servicer, queue, service)
    await running.set_serving(False)
    return running


async def serve(config: ServerConfig, service: ImageService) -> None:
    """Run until SIGINT/SIGTERM: listen (Echo answers at once), then warm up the default model."""
    # The built-in model is written before listening, so no request can race its creation.
    await asyncio.to_thread(service.ensure_default_model)
    running = await start_server(config, service)
    log.info("listening on %s:%d (model store %s, engines %s)", config.address, running.port,
             config.model_dir, config.engine_dir)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await asyncio.to_thread(service.warm_up)
        await running.set_serving(True)
        log.info("ready: health is SERVING")
        await stop.wait()
    finally:
        log.info("shutting down (grace %.0fs)", GRACE_SECONDS)
        await running.stop()
        if service.engines is not None:
            service.engines.close()
