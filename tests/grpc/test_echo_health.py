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
