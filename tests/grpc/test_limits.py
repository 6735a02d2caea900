"""Limits and canonical names: every bound at its edge and just past it, through a real server."""

from __future__ import annotations

import threading
import time

import grpc
import pytest

from dts_util.grpc.proto import image_generation_pb2 as pb
from dts_util.limits import (MAX_FILES_EXIST_ENTRIES, MAX_FILES_EXIST_REQUEST_BYTES, MAX_GENERATE_REQUEST_BYTES,
                             MAX_PATH_CHARS, MAX_PROMPT_CHARS, MAX_RECEIVE_MESSAGE_BYTES, MAX_SAMPLER_CHARS,
                             MAX_UPLOAD_MESSAGE_BYTES)

INVALID, EXHAUSTED = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED


def _error(call, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call(*args, **kwargs)
    return caught.value


def _generate_at_size(size: int) -> pb.ImageGenerationRequest:
    """A GenerateImage request whose serialized size is exactly ``size`` bytes (a padded negative prompt)."""
    request = pb.ImageGenerationRequest(prompt="p", steps=1, seed=1, negative_prompt="")
    # Measured near the target length: the field's length prefix grows with it.
    near = size - 64
    overhead = pb.ImageGenerationRequest(prompt="p", steps=1, seed=1, negative_prompt="n" * near).ByteSize() - near
    request.negative_prompt = "n" * (size - overhead)
    assert request.ByteSize() == size
    return request


@pytest.mark.parametrize("field,limit", [("prompt", MAX_PROMPT_CHARS), ("negative_prompt", MAX_PROMPT_CHARS),
                                         ("sampler", MAX_SAMPLER_CHARS), ("model", MAX_PATH_CHARS)])
def test_string_fields_at_and_past_their_limit(client, field: str, limit: int) -> None:
    fields = {"prompt": "x", "steps": 1, "seed": 1}
    past = _error(client.generate, **{**fields, field: "a" * (limit + 1)})
    assert past.code() == INVALID and f"{field} has {limit + 1} characters; send at most {limit}" in past.details()
    if field in ("sampler", "model"):  # at the limit, the value is checked as a name, not refused as too long
        at = _error(client.generate, **{**fields, field: "a" * limit})
        assert at.code() in (INVALID, grpc.StatusCode.NOT_FOUND) and "send at most" not in at.details()
        assert len(at.details()) < 1500
    else:
        assert client.generate(**{**fields, field: "a" * limit}).images


def test_generate_request_message_at_and_past_its_limit(client) -> None:
    # Past the prompt limits the fields are refused anyway, so the edge is shown with the size check alone.
    past = _error(client.stub.GenerateImage, _generate_at_size(MAX_GENERATE_REQUEST_BYTES + 1), timeout=30)
    assert past.code() == EXHAUSTED and f"at most {MAX_GENERATE_REQUEST_BYTES} bytes" in past.details()
    at = _error(client.stub.GenerateImage, _generate_at_size(MAX_GENERATE_REQUEST_BYTES), timeout=30)
    assert at.code() == INVALID and "negative_prompt has" in at.details()  # parsed, then refused field by field


def test_messages_over_the_global_limit_never_reach_python(client) -> None:
    huge = pb.ImageGenerationRequest(sampler="s" * (MAX_RECEIVE_MESSAGE_BYTES + 10))
    error = _error(client.stub.GenerateImage, huge, timeout=30)
    assert error.code() == EXHAUSTED
    assert client.echo().message == "HELLO"


def test_upload_message_at_and_past_its_limit(client, model_store) -> None:
    def message(size: int) -> pb.UploadFileRequest:
        base = pb.UploadFileRequest(filename="lim/chunk.bin", data=b"")
        overhead = pb.UploadFileRequest(filename="lim/chunk.bin", data=b"\0" * 100000).ByteSize() - 100000
        return pb.UploadFileRequest(filename=base.filename, data=b"\0" * (size - overhead), overwrite=True)

    server_limit = 1024 * 1024  # base_config's max_upload_bytes is smaller than one full message
    past = _error(client.stub.UploadFile, iter([message(MAX_UPLOAD_MESSAGE_BYTES + 1)]), timeout=30)
    assert past.code() == EXHAUSTED and str(MAX_UPLOAD_MESSAGE_BYTES) in past.details()  # said by the gRPC core
    assert client.stub.UploadFile(iter([message(server_limit)]), timeout=30).size < server_limit
    assert not (model_store.root / "lim" / "chunk.bin").stat().st_size > server_limit


def test_files_exist_entries_at_and_past_the_cap(client) -> None:
    names = [f"f{i}" for i in range(MAX_FILES_EXIST_ENTRIES)]
    assert list(client.files_exist(names).exists) == [False] * MAX_FILES_EXIST_ENTRIES
    error = _error(client.files_exist, names + ["one-more"])
    assert error.code() == INVALID and f"send at most {MAX_FILES_EXIST_ENTRIES}" in error.details()


def test_files_exist_request_message_limit(client) -> None:
    entry = "d" * 1000
    count = MAX_FILES_EXIST_REQUEST_BYTES // (len(entry) + 3) + 1
    error = _error(client.files_exist, [entry] * count)
    assert error.code() == EXHAUSTED and "FilesExist" in error.details()


def test_over_long_paths_are_entry_errors_not_failed_calls(client) -> None:
    reply = client.files_exist(["x" * 5000, "builtin-tiny-sd", "a" * 256, "ok/" + "b" * 255])
    assert list(reply.exists) == [False, True, False, False]
    assert "too long" in reply.errors[0] and "255 bytes" in reply.errors[2] and reply.errors[3] == ""
    assert len(reply.files[0]) <= MAX_PATH_CHARS and all(len(e) < 400 for e in reply.errors)


def test_files_exist_runs_off_the_event_loop(make_server, monkeypatch) -> None:
    server = make_server()
    store = server.service.store
    real_exists = store.exists

    def slow_exists(name: str) -> bool:
        time.sleep(0.005)  # a slow disk: 512 entries take ~2.5 s
        return real_exists(name)

    monkeypatch.setattr(store, "exists", slow_exists)
    with server.client() as client:
        call = client.stub.FilesExist.future(pb.FilesExistRequest(files=["x"] * MAX_FILES_EXIST_ENTRIES), timeout=60)
        time.sleep(0.2)
        start = time.monotonic()
        assert client.echo().message == "HELLO"
        assert time.monotonic() - start < 0.5 and not call.done()
        assert len(call.result().exists) == MAX_FILES_EXIST_ENTRIES


@pytest.mark.parametrize("spelling", ["builtin-tiny-sd/.", "./builtin-tiny-sd", "builtin-tiny-sd\\",
                                      "builtin-tiny-sd/", "./builtin-tiny-sd/./", "alias"])
def test_every_spelling_of_a_model_loads_it_once(make_server, spelling: str) -> None:
    server = make_server(own_store=True)
    (server.service.store.root / "alias").symlink_to("builtin-tiny-sd")
    with server.client() as client:
        info = client.generate(prompt="x", steps=1, seed=1, model=spelling).info
    assert server.service.loaded_models() == ["builtin-tiny-sd"]
    assert '"model": "builtin-tiny-sd"' in info


def test_loaded_models_are_bounded_least_recently_used_first(make_server) -> None:
    import shutil

    server = make_server(own_store=True, max_loaded_models=2)
    root = server.service.store.root
    for name in ("second", "third"):
        shutil.copytree(root / "builtin-tiny-sd", root / name)
    with server.client() as client:
        for name in ("second", "third", "builtin-tiny-sd"):
            assert client.generate(prompt="x", steps=1, seed=1, model=name).images
    assert server.service.loaded_models() == ["third", "builtin-tiny-sd"]
    with server.client() as client:  # an evicted model loads again cleanly
        assert client.generate(prompt="x", steps=1, seed=1, model="second").images
    assert server.service.loaded_models() == ["builtin-tiny-sd", "second"]


def test_a_model_generating_is_not_unloaded_by_eviction_until_its_generation_ends(base_config, model_store,
                                                                                 tmp_path) -> None:
    import shutil
    from dataclasses import replace

    from dts_util.service import ImageService
    from tests.conftest import fresh_store

    root = fresh_store(model_store, tmp_path)
    shutil.copytree(root / "builtin-tiny-sd", root / "other")
    service = ImageService(replace(base_config, model_dir=root, max_loaded_models=1))
    busy = service.model("builtin-tiny-sd")
    busy.prompt_encoders()
    with service._using(busy):  # as during its generation, on the worker's thread
        service.model("other")  # another request, prepared on another thread, evicts it from the cache
        assert service.loaded_models() == ["other"] and busy.is_loaded("text_encoders")
    assert not busy.is_loaded("text_encoders")  # freed once its generation ended


def test_a_response_that_could_not_fit_is_refused_up_front(client) -> None:
    start = time.monotonic()
    error = _error(client.generate, prompt="x", width=2048, height=2048, batch_size=8, batch_count=16)
    assert error.code() == EXHAUSTED and "more than one response may carry" in error.details()
    assert time.monotonic() - start < 5
    from dts_util.pipeline.params import GenerationRequest, resolve
    from dts_util.service import check_response_fits

    check_response_fits(resolve(GenerationRequest(width=2048, height=2048, batch_size=8, batch_count=2), "m", 256))


def test_error_messages_quote_client_strings_briefly(client) -> None:
    error = _error(client.generate, prompt="x", sampler="\n" * 60)
    assert "\n" not in error.details() and "\\n" in error.details()
    reply = client.files_exist(["q" * 900 + "/../x"])
    assert len(reply.errors[0]) < 400 and "(905 characters)" in reply.errors[0]


def test_concurrent_clients_are_served_while_a_generation_runs(server) -> None:
    results: list[str] = []

    def echo_many() -> None:
        with server.client() as client:
            results.extend(client.echo().message for _ in range(20))

    threads = [threading.Thread(target=echo_many) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert results == ["HELLO"] * 60


def test_malformed_messages_and_declarations_are_invalid_argument(client) -> None:
    not_utf8 = b"\x0a\x02\xff\xfe"  # field 1 (prompt), 2 bytes that are not UTF-8
    raw = client.channel.unary_unary("/drawthings.ImageGenerationService/GenerateImage",
                                     response_deserializer=pb.ImageGenerationResponse.FromString)
    error = _error(raw, not_utf8, timeout=30)
    assert error.code() == INVALID and "not valid protobuf" in error.details()
    for declared in (dict(total_size=-5), dict(sha256="xyz")):
        error = _error(client.stub.UploadFile, iter([pb.UploadFileRequest(filename="decl.bin", data=b"x",
                                                                          **declared)]), timeout=30)
        assert error.code() == INVALID
    echo = client.channel.unary_unary("/drawthings.ImageGenerationService/Echo",
                                      response_deserializer=pb.EchoResponse.FromString)
    assert echo(b"", timeout=30).message == "HELLO"
    assert _error(echo, b"\x0a" + bytes([200, 8]) + b"e" * 1224, timeout=30).code() == EXHAUSTED
