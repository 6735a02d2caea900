"""Echo, health checking and reflection."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from dts_util import __version__
from dts_util.client import Client


def test_echo_says_hello_with_version_and_models(client: Client) -> None:
    reply = client.echo()
    assert reply.message == "HELLO"
    assert reply.server_version == __version__
    assert list(reply.models) == ["builtin-tiny-sd"] and reply.default_model == "builtin-tiny-sd"


def test_health_is_serving_once_ready(server) -> None:
    with grpc.insecure_channel(server.target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "drawthings.ImageGenerationService"):
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_the_service(server) -> None:
    with grpc.insecure_channel(server.target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = [s.name for s in next(iter(replies)).list_services_response.service]
    assert "drawthings.ImageGenerationService" in names and "grpc.health.v1.Health" in names


def test_health_is_not_serving_until_the_default_model_is_warm(base_config) -> None:
    import asyncio

    from dts_util.grpc.bootstrap import start_server
    from dts_util.workers import WorkerPool

    async def status_before_and_after() -> tuple[int, int]:
        running = await start_server(base_config, WorkerPool.for_devices(base_config, use_engines=False))
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
                stub = health_pb2_grpc.HealthStub(channel)
                before = (await stub.Check(health_pb2.HealthCheckRequest(service=""))).status
                await running.set_serving(True)
                after = (await stub.Check(health_pb2.HealthCheckRequest(service=""))).status
        finally:
            await running.stop(0)
        return before, after

    before, after = asyncio.run(status_before_and_after())
    assert before == health_pb2.HealthCheckResponse.NOT_SERVING
    assert after == health_pb2.HealthCheckResponse.SERVING
