"""GenerateImageStream: ordered progress, previews, images in pieces a default client accepts, cancellation."""

from __future__ import annotations

import io
import json
import time

import grpc
import pytest
from PIL import Image

from dts_util.grpc.proto import image_generation_pb2 as pb
from dts_util.grpc.proto import image_generation_pb2_grpc as pb_grpc

DEFAULT_CLIENT_LIMIT = 4 * 1024 * 1024


def _stream(target: str, **fields) -> list[pb.GenerationUpdate]:
    with grpc.insecure_channel(target) as channel:  # gRPC's default 4 MiB receive limit
        return list(pb_grpc.ImageGenerationServiceStub(channel).GenerateImageStream(
            pb.ImageGenerationRequest(**fields), timeout=300))


def test_messages_come_in_order_and_match_the_unary_call(server, client) -> None:
    request = dict(prompt="a harbour", seed=4, steps=4, width=64, height=64, batch_size=2)
    updates = _stream(server.target, **request)
    kinds = ["event" if u.event else "image" if (u.image_data or u.image_done) else "info" for u in updates]
    assert kinds[-1] == "info" and kinds.index("image") > max(i for i, k in enumerate(kinds) if k == "event")
    events = [json.loads(u.event) for u in updates if u.event]
    assert events[0]["event"] == "textEncoded" and events[-1]["event"] == "imageDecoded"
    assert [e["step"] for e in events if e["event"] == "sampling"] == [1, 2, 3, 4]
    images = {}
    for update in updates:
        if update.image_data:
            images.setdefault(update.image_index, b"")
            images[update.image_index] += update.image_data
    unary = client.generate(**request)
    assert [images[i] for i in sorted(images)] == list(unary.images)
    assert json.loads(updates[-1].info)["seeds"] == [4, 5]


def test_previews_every_n_steps(server) -> None:
    updates = _stream(server.target, prompt="x", seed=1, steps=6, width=64, height=96, preview_every=2)
    previews = [(json.loads(u.event)["step"], u.preview) for u in updates if u.preview]
    assert [step for step, _ in previews] == [2, 4, 6]
    assert Image.open(io.BytesIO(previews[0][1])).size == (8, 12)  # latent resolution


def test_a_large_image_arrives_in_pieces_through_a_default_client(server) -> None:
    updates = _stream(server.target, prompt="noise", seed=2, steps=1, width=1536, height=1536)
    pieces = [u for u in updates if u.image_data]
    png = b"".join(p.image_data for p in pieces)
    assert len(png) > DEFAULT_CLIENT_LIMIT and len(pieces) >= 2 and pieces[-1].image_done
    assert all(u.ByteSize() < DEFAULT_CLIENT_LIMIT for u in updates)
    assert Image.open(io.BytesIO(png)).size == (1536, 1536)


def test_the_unary_call_refuses_what_one_message_cannot_carry_and_names_the_stream(client) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        client.generate(prompt="x", width=2048, height=2048, batch_size=8, batch_count=16)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "GenerateImageStream" in caught.value.details()


def test_cancelling_the_stream_stops_the_generation(no_queue_server, caplog) -> None:
    import gc
    import logging

    caplog.set_level(logging.ERROR, logger="asyncio")
    with grpc.insecure_channel(no_queue_server.target) as channel:
        stub = pb_grpc.ImageGenerationServiceStub(channel)
        call = stub.GenerateImageStream(pb.ImageGenerationRequest(prompt="long", seed=1, steps=150, width=512,
                                                                  height=512), timeout=120)
        for update in call:
            if update.event and json.loads(update.event).get("step") == 2:
                call.cancel()
                break
    start = time.monotonic()
    with no_queue_server.client() as client:
        while True:  # refused while the cancelled one still runs (max_queue=0)
            try:
                client.generate(prompt="after", steps=1)
                break
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert time.monotonic() - start < 5, "the cancelled generation kept running"
                time.sleep(0.05)
    gc.collect()  # an unretrieved exception is logged when its future is collected
    assert not [r for r in caplog.records if "never retrieved" in r.getMessage()], caplog.text


def test_errors_come_back_as_statuses(server) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        _stream(server.target, prompt="x", width=100)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "width is 100" in caught.value.details()
    with pytest.raises(grpc.RpcError) as caught:
        _stream(server.target, prompt="x", preview_every=151)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_cli_generate_uses_the_stream(server, tmp_path) -> None:
    from typer.testing import CliRunner

    from dts_util.cli import app

    port = server.target.rsplit(":", 1)[1]
    result = CliRunner().invoke(app, ["generate", "a castle", "--seed", "9", "--steps", "3", "--width", "64",
                                      "--height", "64", "--port", port, "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "9.png").is_file()
