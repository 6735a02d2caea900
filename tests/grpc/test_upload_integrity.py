"""Upload integrity: nothing half-written, nothing lost, nothing replaced by accident.

Real servers, real channels. The stress test cancels hundreds of concurrent
uploads at random points the way an asyncio client does (cancel without
half-closing) and checks that not one of them was committed.
"""

from __future__ import annotations


import asyncio
import hashlib
import os
import random
import shutil
import threading
import time
from pathlib import Path
from typing import Iterator

import grpc
import pytest

from dts_util.grpc.proto import image_generation_pb2 as pb
from dts_util.grpc.proto import image_generation_pb2_grpc as pb_grpc
from dts_util.models import store as store_module
from dts_util.models.store import RESERVED_PREFIX, TEMP_PREFIX, ModelStore


def _leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob(f"{RESERVED_PREFIX}*")]


def _wait_for(predicate, seconds: float = 10.0) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def _send(client, *messages: pb.UploadFileRequest) -> pb.UploadFileResponse:
    return client.stub.UploadFile(iter(messages), timeout=30)


async def _cancelled_uploads(target: str, count: int, seed: int) -> list[str]:
    """``count`` concurrent uploads, each cancelled at a random point without half-closing the stream."""
    rng = random.Random(seed)
    payload = rng.randbytes(100_000)
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.ImageGenerationServiceStub(channel)

        async def one(index: int) -> str:
            call = stub.UploadFile()
            name = f"stress/victim-{index % 7}.bin"
            for _ in range(rng.randint(1, 20)):
                await call.write(pb.UploadFileRequest(filename=name, data=payload[:rng.randint(1, len(payload))]))
            if rng.random() < 0.5:
                await asyncio.sleep(rng.random() * 0.01)
            call.cancel()
            try:
                await call
            except asyncio.CancelledError:
                return "CANCELLED"
            except grpc.RpcError as exc:
                return exc.code().name
            return "OK"

        return await asyncio.gather(*(one(i) for i in range(count)))


def test_hundreds_of_cancelled_uploads_commit_nothing(make_server) -> None:
    server = make_server(own_store=True, max_concurrent_uploads=400)
    root = Path(server.config.model_dir)
    originals = {}
    for index in range(7):  # some victims exist already: none may be replaced by a truncated upload
        if index % 2:
            path = root / f"stress/victim-{index}.bin"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"original %d" % index)
            originals[path] = path.read_bytes()
    for round_seed in range(4):
        outcomes = asyncio.run(_cancelled_uploads(server.target, 150, round_seed))
        assert "OK" not in outcomes
    assert _wait_for(lambda: not _leftovers(root))
    present = sorted(p.name for p in (root / "stress").iterdir())
    assert present == sorted(p.name for p in originals), "a cancelled upload was committed"
    assert all(path.read_bytes() == data for path, data in originals.items())
    assert server.service.store._active_uploads == 0 and server.service.store._inflight_bytes == 0
    with server.client() as client:  # and the server still takes a complete upload
        assert _send(client, pb.UploadFileRequest(filename="stress/after.bin", data=b"whole")).size == 5


def test_cancel_while_the_commit_runs_keeps_nothing(make_server, monkeypatch) -> None:
    """The client half-closes and then cancels while the server is still checking and syncing the file."""
    server = make_server(own_store=True)
    root = Path(server.config.model_dir)
    (root / "slow").mkdir()
    (root / "slow/keep.bin").write_bytes(b"original")
    finishing, real_finish = threading.Event(), store_module.Upload.finish

    def slow_finish(self, *args, **kwargs):
        finishing.set()
        time.sleep(0.5)
        return real_finish(self, *args, **kwargs)

    monkeypatch.setattr(store_module.Upload, "finish", slow_finish)
    with server.client() as client:
        call = client.stub.UploadFile.future(iter([pb.UploadFileRequest(filename="slow/keep.bin", data=b"new",
                                                                        overwrite=True)]), timeout=30)
        assert finishing.wait(10)
        call.cancel()
    assert _wait_for(lambda: not _leftovers(root) and server.service.store._active_uploads == 0)
    time.sleep(0.6)
    assert (root / "slow/keep.bin").read_bytes() == b"original" and not _leftovers(root)


def test_stalled_upload_is_aborted_after_the_idle_timeout(make_server) -> None:
    server = make_server(own_store=True, upload_idle_timeout=0.5)
    root = Path(server.config.model_dir)
    release = threading.Event()

    def stalls() -> Iterator[pb.UploadFileRequest]:
        yield pb.UploadFileRequest(filename="slowpoke/file.bin", data=b"first")
        release.wait(5)
        yield pb.UploadFileRequest(data=b"too late")

    start = time.monotonic()
    with server.client() as client, pytest.raises(grpc.RpcError) as caught:
        client.stub.UploadFile(stalls(), timeout=30)
    release.set()
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "no upload data for 0.5 s" in caught.value.details()
    assert time.monotonic() - start < 4
    assert not (root / "slowpoke").exists() and not _leftovers(root)


def test_slow_but_steady_upload_within_the_idle_timeout_succeeds(make_server) -> None:
    server = make_server(own_store=True, upload_idle_timeout=0.5)

    def steady() -> Iterator[pb.UploadFileRequest]:
        for index in range(4):  # 1.2 s in all, but never 0.5 s without data
            yield pb.UploadFileRequest(filename="steady.bin", data=b"%d" % index)
            time.sleep(0.3)

    with server.client() as client:
        assert client.stub.UploadFile(steady(), timeout=30).size == 4


def test_a_legal_255_byte_name_uploads(client, model_store) -> None:
    name = "long/" + "n" * 251 + ".bin"  # the last component is exactly 255 bytes
    reply = _send(client, pb.UploadFileRequest(filename=name, data=b"x"))
    assert reply.size == 1 and (model_store.root / name).read_bytes() == b"x"
    with pytest.raises(grpc.RpcError) as caught:
        _send(client, pb.UploadFileRequest(filename="long/" + "n" * 252 + ".bin", data=b"x"))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "255 bytes" in caught.value.details()


def test_reserved_temporary_names_cannot_be_named_by_clients(client, model_store) -> None:
    reserved = f"up/{TEMP_PREFIX}0123456789abcdef0123"
    with pytest.raises(grpc.RpcError) as caught:
        _send(client, pb.UploadFileRequest(filename=reserved, data=b"attacker"))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "reserved" in caught.value.details()
    reply = client.files_exist([reserved, f"{RESERVED_PREFIX}x/y"])
    assert list(reply.exists) == [False, False] and all("reserved" in e for e in reply.errors)


def test_temporary_files_are_swept_at_start_up(model_store, tmp_path, base_config) -> None:
    from dataclasses import replace

    from tests.conftest import ServerThread, fresh_store

    root = fresh_store(model_store, tmp_path)
    (root / "deep/er").mkdir(parents=True)
    leftovers = [root / f"{TEMP_PREFIX}abc", root / f"deep/er/{TEMP_PREFIX}def"]
    for path in leftovers:
        path.write_bytes(b"half")
    abandoned = root / f"{RESERVED_PREFIX}builtin-xyz"
    abandoned.mkdir()
    os.utime(abandoned, (time.time() - 3600,) * 2)  # an interrupted build, an hour old
    assert ModelStore(root).sweep_temporary_files() == 3
    assert not _leftovers(root) and (root / "deep/er").is_dir()
    # the server does the same on start-up (``serve``); here through the store it uses
    (root / f"{TEMP_PREFIX}again").write_bytes(b"half")
    with ServerThread(replace(base_config, model_dir=root)) as server:
        server.service.store.sweep_temporary_files()
    assert not _leftovers(root)


def test_a_folder_another_server_is_building_is_not_swept(model_store, tmp_path) -> None:
    from dts_util.models.store import BUILD_LOCK_FILE, publish_folder

    def fill(folder) -> None:
        os.utime(folder, (time.time() - 3600,) * 2)  # old enough that only its lock protects it
        assert ModelStore(model_store.root).sweep_temporary_files() == 0
        (folder / "model_index.json").write_text("{}")

    target = publish_folder(model_store.root / "being-built", fill)
    try:
        assert (target / "model_index.json").is_file() and not (target / BUILD_LOCK_FILE).exists()
    finally:  # the session's shared store lists its models to other tests
        shutil.rmtree(target)


def test_a_live_upload_is_not_swept_by_a_second_server(client, model_store) -> None:
    upload = model_store.open_upload("live/in-progress.bin")
    try:
        upload.write(b"data")
        assert ModelStore(model_store.root).sweep_temporary_files() == 0
        assert _leftovers(model_store.root / "live")
    finally:
        upload.abort()
    assert not (model_store.root / "live").exists()


def test_a_failed_upload_removes_the_folders_it_created(client, model_store) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        _send(client, pb.UploadFileRequest(filename="new/deep/tree/f.bin", data=b"abc", total_size=99))
    assert caught.value.code() == grpc.StatusCode.DATA_LOSS
    assert not (model_store.root / "new").exists()


def test_existing_file_needs_overwrite_and_identical_bytes_are_idempotent(client, model_store) -> None:
    data = b"model weights v1"
    first = _send(client, pb.UploadFileRequest(filename="ow/model.bin", data=data))
    again = _send(client, pb.UploadFileRequest(filename="ow/model.bin", data=data,
                                               sha256=hashlib.sha256(data).hexdigest()))
    assert again.sha256 == first.sha256 and "identical" in again.message
    for declared in ({}, {"total_size": 2}):  # refused at the end, and up front when the size says so
        with pytest.raises(grpc.RpcError) as caught:
            _send(client, pb.UploadFileRequest(filename="ow/model.bin", data=b"v2", **declared))
        assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS and "overwrite" in caught.value.details()
    assert (model_store.root / "ow/model.bin").read_bytes() == data
    replaced = _send(client, pb.UploadFileRequest(filename="ow/model.bin", data=b"v2"),
                     pb.UploadFileRequest(overwrite=True))  # any message may ask for it
    assert replaced.size == 2 and (model_store.root / "ow/model.bin").read_bytes() == b"v2"
    assert not _leftovers(model_store.root)


def _hold_uploads(stub, count: int, prefix: str) -> tuple[list, threading.Event]:
    """Start ``count`` uploads that stay open until the returned event is set."""
    release, started = threading.Event(), []

    def held(index: int) -> Iterator[pb.UploadFileRequest]:
        yield pb.UploadFileRequest(filename=f"{prefix}/{index}.bin", data=b"x")
        release.wait(10)

    calls = [stub.UploadFile.future(held(i), timeout=30) for i in range(count)]
    started.extend(calls)
    return started, release


def test_concurrent_uploads_are_limited(make_server) -> None:
    server = make_server(own_store=True, max_concurrent_uploads=2)
    with server.client() as client:
        calls, release = _hold_uploads(client.stub, 2, "held")
        assert _wait_for(lambda: server.service.store._active_uploads == 2)
        with pytest.raises(grpc.RpcError) as caught:
            _send(client, pb.UploadFileRequest(filename="third.bin", data=b"x"))
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "--max-concurrent-uploads" in caught.value.details()
        release.set()
        assert [call.result().size for call in calls] == [1, 1]
        assert _send(client, pb.UploadFileRequest(filename="third.bin", data=b"x")).size == 1


def test_store_quota_at_and_past_its_edge(make_server) -> None:
    server = make_server(own_store=True, max_store_bytes=1)  # replaced below, once the store's size is known
    used = server.service.store._used_bytes()
    server.service.store.policy = store_module.UploadPolicy(max_store_bytes=used + 1000, min_free_bytes=0)
    with server.client() as client:
        assert _send(client, pb.UploadFileRequest(filename="q/fits.bin", data=b"a" * 1000)).size == 1000
        with pytest.raises(grpc.RpcError) as caught:
            _send(client, pb.UploadFileRequest(filename="q/one-more.bin", data=b"b"))
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "quota" in caught.value.details()
        with pytest.raises(grpc.RpcError) as caught:  # a declared size is refused before any data is sent
            _send(client, pb.UploadFileRequest(filename="q/big.bin", total_size=10**6))
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert not (Path(server.config.model_dir) / "q/one-more.bin").exists()


def test_free_disk_floor_is_enforced(make_server) -> None:
    import shutil

    server = make_server(own_store=True)
    root = Path(server.config.model_dir)
    free = shutil.disk_usage(root).free
    server.service.store.policy = store_module.UploadPolicy(min_free_bytes=free + 10**9)
    with server.client() as client, pytest.raises(grpc.RpcError) as caught:
        _send(client, pb.UploadFileRequest(filename="disk/x.bin", data=b"x"))
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "free" in caught.value.details()
    assert not (root / "disk").exists()


def test_per_file_limit_at_and_past_its_edge(client) -> None:
    limit = 1024 * 1024  # base_config's max_upload_bytes
    assert _send(client, pb.UploadFileRequest(filename="edge/at.bin", data=b"\0" * limit)).size == limit
    with pytest.raises(grpc.RpcError) as caught:
        _send(client, pb.UploadFileRequest(filename="edge/past.bin", data=b"\0" * limit),
              pb.UploadFileRequest(data=b"\0"))
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max-upload-bytes" in caught.value.details()


def test_replacing_a_loaded_models_file_reloads_it(make_server) -> None:
    server = make_server(own_store=True)
    root = Path(server.config.model_dir)
    before = server.service.model("builtin-tiny-sd")
    config = (root / "builtin-tiny-sd/scheduler/scheduler_config.json").read_bytes()
    with server.client() as client:
        _send(client, pb.UploadFileRequest(filename="builtin-tiny-sd/scheduler/scheduler_config.json",
                                           data=config.replace(b"}", b',"note": 1}', 1), overwrite=True))
        assert "builtin-tiny-sd" not in server.service.loaded_models()
        assert client.generate(prompt="after", steps=1, seed=3).images
    assert server.service.model("builtin-tiny-sd") is not before


def test_two_uploads_racing_for_one_new_name_never_replace_each_other(tmp_path) -> None:
    from dts_util.errors import FileExists

    # The race itself, step by step: both pass finish()'s check while the name is free, then both publish.
    store = ModelStore(tmp_path)
    first, second = store.open_upload("race/model.bin"), store.open_upload("race/model.bin")
    first.write(b"first" * 1000)
    second.write(b"second" * 1000)
    first.finish()
    second.finish()
    first.publish()
    with pytest.raises(FileExists):
        second.publish()
    second.abort()
    assert (tmp_path / "race/model.bin").read_bytes() == b"first" * 1000 and not _leftovers(tmp_path)
    # The same bytes racing in: the loser is an idempotent re-upload, not an error.
    third, fourth = store.open_upload("race/same.bin"), store.open_upload("race/same.bin")
    for upload in (third, fourth):
        upload.write(b"same" * 1000)
        upload.finish()
    third.publish()
    fourth.publish()
    assert fourth.unchanged and (tmp_path / "race/same.bin").read_bytes() == b"same" * 1000


def test_racing_clients_get_one_ok_and_already_exists_and_every_reported_hash_is_on_disk(make_server) -> None:
    server = make_server(own_store=True)
    root = server.config.model_dir
    outcomes: list[tuple[str, str, str]] = []

    def upload(name: str, data: bytes) -> None:
        with server.client(timeout=60) as client:
            try:
                reply = _send(client, pb.UploadFileRequest(filename=name, sha256=hashlib.sha256(data).hexdigest(),
                                                           total_size=len(data)), pb.UploadFileRequest(data=data))
                outcomes.append((name, "OK", reply.sha256))
            except grpc.RpcError as exc:
                outcomes.append((name, exc.code().name, ""))

    for round_ in range(12):  # two clients at a time: the server's concurrent-upload limit is not what is tested
        pair = [threading.Thread(target=upload, args=(f"race/{round_}.bin", os.urandom(200_000))) for _ in range(2)]
        for thread in pair:
            thread.start()
        for thread in pair:
            thread.join(60)
    for round_ in range(12):
        name = f"race/{round_}.bin"
        results = sorted(outcome for n, outcome, _ in outcomes if n == name)
        assert results == ["ALREADY_EXISTS", "OK"], (name, results)
        reported = next(digest for n, outcome, digest in outcomes if n == name and outcome == "OK")
        assert hashlib.sha256((root / name).read_bytes()).hexdigest() == reported
    assert not _leftovers(root)
