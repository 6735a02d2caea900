"""UploadFile and FilesExist: atomic writes, declared size/hash checks, path safety, index alignment."""

from __future__ import annotations

import hashlib
import threading
from typing import Iterator

import grpc
import pytest

from dts_util.client import Client
from dts_util.grpc.proto import image_generation_pb2 as pb
from dts_util.models.store import RESERVED_PREFIX


def _stream(*messages: pb.UploadFileRequest) -> Iterator[pb.UploadFileRequest]:
    yield from messages


def _upload(client: Client, *messages: pb.UploadFileRequest) -> pb.UploadFileResponse:
    return client.stub.UploadFile(_stream(*messages), timeout=30)


def _no_partials(root) -> bool:
    return not [p for p in root.rglob(f"{RESERVED_PREFIX}*")]


def test_upload_writes_file_and_reports_name_size_hash(client: Client, model_store) -> None:
    data = b"weights" * 1000
    reply = _upload(client, pb.UploadFileRequest(filename="up/ok.bin", data=data[:10]),
                    pb.UploadFileRequest(filename="up/ok.bin", data=data[10:5000]),
                    pb.UploadFileRequest(data=data[5000:]))
    digest = hashlib.sha256(data).hexdigest()
    assert reply.size == len(data) and reply.sha256 == digest
    assert "up/ok.bin" in reply.message and str(len(data)) in reply.message and digest in reply.message
    assert (model_store.root / "up/ok.bin").read_bytes() == data
    assert client.files_exist(["up/ok.bin"]).exists == [True]


def test_upload_with_matching_declared_hash_and_size(client: Client, model_store) -> None:
    data = b"abc" * 100
    reply = _upload(client, pb.UploadFileRequest(filename="up/declared.bin", sha256=hashlib.sha256(data).hexdigest(),
                                                 total_size=len(data), data=data))
    assert reply.size == 300


@pytest.mark.parametrize("declared", [dict(sha256="0" * 64), dict(total_size=5)])
def test_mismatched_upload_is_data_loss_and_keeps_nothing(client: Client, model_store, declared: dict) -> None:
    target = model_store.root / "up/existing.bin"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(b"old")
    with pytest.raises(grpc.RpcError) as caught:
        _upload(client, pb.UploadFileRequest(filename="up/existing.bin", data=b"new bytes", overwrite=True,
                                                 **declared))
    assert caught.value.code() == grpc.StatusCode.DATA_LOSS and "nothing was kept" in caught.value.details()
    assert target.read_bytes() == b"old" and _no_partials(model_store.root)


def test_filename_change_mid_stream_is_rejected(client: Client, model_store) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        _upload(client, pb.UploadFileRequest(filename="up/a.bin", data=b"1"),
                pb.UploadFileRequest(filename="up/b.bin", data=b"2"))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "one file per" in caught.value.details()
    assert not (model_store.root / "up/a.bin").exists() and _no_partials(model_store.root)


@pytest.mark.parametrize("name,message", [
    ("", "file name is empty"), ("../escape.bin", "contains '..'"), ("/etc/passwd", "is absolute"),
    ("a/../../x", "contains '..'"), ("C:\\win.bin", "is absolute"),
])
def test_unsafe_upload_names_are_invalid_argument(client: Client, model_store, name: str, message: str) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        _upload(client, pb.UploadFileRequest(filename=name, data=b"x"))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in caught.value.details()
    assert not (model_store.root.parent / "escape.bin").exists()
    assert client.echo().message == "HELLO"


def test_symlink_out_of_store_is_rejected(client: Client, model_store, tmp_path) -> None:
    (model_store.root / "link-out").symlink_to(tmp_path, target_is_directory=True)
    with pytest.raises(grpc.RpcError) as caught:
        _upload(client, pb.UploadFileRequest(filename="link-out/evil.bin", data=b"x"))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "outside" in caught.value.details()
    assert not (tmp_path / "evil.bin").exists()


def test_empty_upload_stream_is_rejected(client: Client) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        _upload(client)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "empty" in caught.value.details()


def test_upload_over_size_limit_is_resource_exhausted(client: Client, model_store) -> None:
    chunk = b"\0" * (512 * 1024)
    with pytest.raises(grpc.RpcError) as caught:
        _upload(client, *[pb.UploadFileRequest(filename="up/huge.bin", data=chunk) for _ in range(3)])
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "limit" in caught.value.details()
    assert not (model_store.root / "up/huge.bin").exists() and _no_partials(model_store.root)


def test_cancelled_upload_leaves_nothing_and_keeps_existing_file(client: Client, model_store) -> None:
    target = model_store.root / "up/keep.bin"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(b"original")
    sent, release = threading.Event(), threading.Event()

    def slow_stream() -> Iterator[pb.UploadFileRequest]:
        yield pb.UploadFileRequest(filename="up/keep.bin", data=b"partial")
        sent.set()
        release.wait(10)
        yield pb.UploadFileRequest(data=b"never sent")

    call = client.stub.UploadFile.future(slow_stream(), timeout=30)
    assert sent.wait(10)
    call.cancel()
    release.set()
    with pytest.raises(grpc.FutureCancelledError):
        call.result()
    for _ in range(50):  # the server notices the cancellation asynchronously
        if _no_partials(model_store.root):
            break
        threading.Event().wait(0.1)
    assert target.read_bytes() == b"original" and _no_partials(model_store.root)


def test_files_exist_is_index_aligned_with_per_entry_errors(client: Client, model_store) -> None:
    names = ["builtin-tiny-sd/unet/config.json", "../../etc/passwd", "missing.bin", "", "/abs", "builtin-tiny-sd"]
    reply = client.files_exist(names)
    assert list(reply.files) == names
    assert list(reply.exists) == [True, False, False, False, False, True]
    assert [bool(e) for e in reply.errors] == [False, True, False, True, True, False]
    assert "contains '..'" in reply.errors[1] and "empty" in reply.errors[3]
