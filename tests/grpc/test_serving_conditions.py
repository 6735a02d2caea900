"""Serving under real conditions: a client that vanishes without closing its connection, a generation past its
time cap, and a flood of calls on one connection."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import grpc
import pytest

from dts_util.grpc.proto import image_generation_pb2 as pb
from dts_util.grpc.proto import image_generation_pb2_grpc as pb_grpc

LONG = dict(prompt="long", seed=1, steps=150, width=512, height=512)


class FreezingRelay:
    """A TCP relay that can stop forwarding while keeping both connections open: to the server, a client that
    vanished without a FIN or RST (a phone leaving Wi-Fi)."""

    def __init__(self, target_port: int) -> None:
        self.target_port, self.frozen = target_port, threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(source, sink), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket) -> None:
        while not self.frozen.is_set():
            try:
                data = source.recv(65536)
            except OSError:
                return
            if not data:
                return
            if not self.frozen.is_set():
                sink.sendall(data)
        # Frozen: hold both sockets open and silent.


def _device_freed_within(server, seconds: float) -> float:
    """Seconds until a one-step request is admitted (max_queue=0: refused while another one still runs)."""
    start = time.monotonic()
    with server.client() as client:
        while True:
            try:
                client.generate(prompt="after", steps=1)
                return time.monotonic() - start
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc.details()
                assert time.monotonic() - start < seconds, "the vanished client's generation kept the device"
                time.sleep(0.1)


def test_a_client_that_vanishes_without_closing_frees_the_device(make_server) -> None:
    server = make_server(max_queue=0, keepalive_seconds=1.0)
    relay = FreezingRelay(server.running.port)
    started = threading.Event()

    def generate() -> None:
        with grpc.insecure_channel(f"127.0.0.1:{relay.port}") as channel:
            stub = pb_grpc.ImageGenerationServiceStub(channel)
            try:
                for update in stub.GenerateImageStream(pb.ImageGenerationRequest(**LONG), timeout=300):
                    if update.event:
                        started.set()
            except grpc.RpcError:
                pass

    threading.Thread(target=generate, daemon=True).start()
    assert started.wait(60)
    relay.frozen.set()
    # Keepalive: a ping after 1 s of silence, unanswered for 1 s more, drops the connection and stops the
    # generation at its next step; the default (20 s + 20 s) stays under a minute.
    assert _device_freed_within(server, 30) < 30


def test_a_generation_past_the_time_cap_is_deadline_exceeded_and_the_device_freed(make_server) -> None:
    server = make_server(max_generation_seconds=0.5)
    with server.client() as client:
        with pytest.raises(grpc.RpcError) as caught:
            client.generate(**LONG)
        error = caught.value
        assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "--max-generation-seconds" in error.details()
        assert client.generate(prompt="after", steps=1, width=64, height=64).images


def test_a_flood_of_calls_on_one_connection_is_answered_not_cancelled(server) -> None:
    # gRPC's own server cancelled calls past 1000 waiting for a handler, without a word; the server raises that.
    async def flood() -> list[str]:
        async with grpc.aio.insecure_channel(server.target) as channel:
            stub = pb_grpc.ImageGenerationServiceStub(channel)

            async def one() -> str:
                try:
                    await stub.Echo(pb.EchoRequest(), timeout=120)
                    return "OK"
                except grpc.RpcError as exc:
                    return exc.code().name

            return await asyncio.gather(*(one() for _ in range(3000)))

    outcomes = asyncio.run(flood())
    assert outcomes.count("OK") == len(outcomes), {o: outcomes.count(o) for o in set(outcomes)}


def test_running_out_of_gpu_memory_is_resource_exhausted_and_the_server_keeps_serving(make_server,
                                                                                    monkeypatch) -> None:
    import torch

    from dts_util.pipeline.components import EagerUNet

    server = make_server()
    real_call = EagerUNet.__call__
    failures = iter([True])

    def call(self, **inputs):
        if next(failures, False):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_call(self, **inputs)

    monkeypatch.setattr(EagerUNet, "__call__", call)
    with server.client() as client:
        with pytest.raises(grpc.RpcError) as caught:
            client.generate(prompt="x", steps=2, width=64, height=64)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "ran out of GPU memory" in caught.value.details() and "Traceback" not in caught.value.details()
        assert client.generate(prompt="x", steps=2, width=64, height=64).images  # the model stayed loaded
