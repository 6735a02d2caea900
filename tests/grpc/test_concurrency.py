"""One generation at a time, a bounded queue, fast Echo meanwhile, and cancellation at step boundaries."""

from __future__ import annotations

import time

import grpc
import pytest

from dts_util.client import Client

# ~4 s of work on 2 CPU cores with the built-in model; a request that ran to the end would be obvious.
LONG = dict(prompt="long", seed=1, steps=150, width=512, height=512)


def _wait_until_running(server, deadline: float = 10.0) -> None:
    end = time.monotonic() + deadline
    while server.queue.pending == 0 and time.monotonic() < end:
        time.sleep(0.01)
    assert server.queue.pending >= 1


def test_echo_and_files_exist_answer_while_generating(server) -> None:
    with server.client() as client:
        call = client.stub.GenerateImage.future(client_request(**LONG), timeout=120)
        _wait_until_running(server)
        start = time.monotonic()
        assert client.echo().message == "HELLO"
        assert client.files_exist(["builtin-tiny-sd"]).exists == [True]
        assert time.monotonic() - start < 1.0
        assert not call.done()
        call.cancel()


def test_full_queue_is_resource_exhausted(no_queue_server) -> None:
    with no_queue_server.client() as client:
        call = client.stub.GenerateImage.future(client_request(**LONG), timeout=120)
        _wait_until_running(no_queue_server)
        with pytest.raises(grpc.RpcError) as caught:
            client.generate(prompt="x", steps=1)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "retry later" in caught.value.details()
        call.cancel()
        assert client.echo().message == "HELLO"


@pytest.mark.parametrize("how", ["cancel", "deadline"])
def test_cancelled_generation_stops_at_next_step(no_queue_server, how: str) -> None:
    with no_queue_server.client() as client:
        timeout = 1.0 if how == "deadline" else 120
        call = client.stub.GenerateImage.future(client_request(**LONG), timeout=timeout)
        _wait_until_running(no_queue_server)
        if how == "cancel":
            time.sleep(0.3)
            call.cancel()
        else:
            with pytest.raises(grpc.RpcError) as caught:
                call.result()
            assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        start = time.monotonic()
        # With max_queue=0 this is refused while the old generation still runs, so success here
        # means the cancelled one stopped within a step or two, far before its 150 steps.
        while True:
            try:
                client.generate(prompt="after", steps=1)
                break
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert time.monotonic() - start < 2.0, "the cancelled generation kept running"
                time.sleep(0.05)


def client_request(**fields):
    from dts_util.grpc.proto import image_generation_pb2 as pb

    return pb.ImageGenerationRequest(**fields)
