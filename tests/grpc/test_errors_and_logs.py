"""Errors and logs: every client-caused failure has its status and a message without server paths;
logs escape client strings; cancellations log one line; start-up failures are one line and exit 1."""

from __future__ import annotations

import gc
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
from typer.testing import CliRunner

from dts_util.cli import app
from dts_util.grpc.proto import image_generation_pb2 as pb

PRECONDITION, INVALID = grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.INVALID_ARGUMENT
runner = CliRunner()


def _error(call, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call(*args, **kwargs)
    return caught.value


def _upload(client, name: str, data: bytes = b"x") -> pb.UploadFileResponse:
    return client.stub.UploadFile(iter([pb.UploadFileRequest(filename=name, data=data)]), timeout=30)


def _no_server_paths(message: str, *roots: Path) -> bool:
    return all(str(root) not in message for root in roots) and "/tmp/" not in message


@pytest.mark.parametrize("broken,file,expected", [
    ("model_index.json", "model_index.json", "is not valid JSON"),
    ("unet/config.json", "unet/config.json", "is not valid JSON"),
    ("vae/config.json", "vae/config.json", "needs a positive sample_size"),
])
def test_malformed_model_folders_are_failed_precondition(make_server, broken, file, expected) -> None:
    server = make_server(own_store=True)
    root = server.service.store.root
    import shutil

    shutil.copytree(root / "builtin-tiny-sd", root / "broken")
    (root / "broken" / broken).write_text("" if broken != "vae/config.json" else "{}")
    with server.client() as client:
        error = _error(client.generate, prompt="x", steps=1, model="broken")
        assert error.code() == PRECONDITION
        assert expected in error.details() and (file in error.details() or "broken/" in error.details())
        assert _no_server_paths(error.details(), root)
        assert client.generate(prompt="x", steps=1, seed=1).images  # and the server keeps serving


def test_corrupt_weights_name_no_server_path(make_server) -> None:
    server = make_server(own_store=True)
    root = server.service.store.root
    import shutil

    shutil.copytree(root / "builtin-tiny-sd", root / "badweights")
    for weights in (root / "badweights/unet").glob("*.safetensors"):
        weights.write_bytes(b"not a safetensors file")
    with server.client() as client:
        error = _error(client.generate, prompt="x", steps=1, model="badweights")
    assert error.code() == PRECONDITION and "badweights" in error.details()
    assert _no_server_paths(error.details(), root)


def test_path_errors_are_client_errors(client, model_store) -> None:
    root = model_store.root
    (root / "afile.bin").write_bytes(b"x")
    (root / "loop").symlink_to("loop")
    cases = [("n" * 5000, INVALID, "too long"), ("afile.bin/below.bin", PRECONDITION, "is a file"),
             ("loop/x.bin", INVALID, "symlink loop"), ("a" * 256, INVALID, "255 bytes")]
    for name, code, words in cases:
        error = _error(_upload, client, name)
        assert error.code() == code and words in error.details(), name
        assert _no_server_paths(error.details(), root) and len(error.details()) < 500
    reply = client.files_exist([name for name, _, _ in cases] + ["afile.bin"])
    assert list(reply.exists) == [False, False, False, False, True]
    assert [bool(e) for e in reply.errors] == [True, False, True, True, False]


def test_unexpected_errors_are_internal_without_details(make_server, monkeypatch, caplog) -> None:
    server = make_server()

    def broken(*args, **kwargs):
        raise RuntimeError(f"secret detail in {server.config.model_dir}")

    monkeypatch.setattr(server.service, "run", broken)  # the device part of a generation
    with server.client() as client:
        error = _error(client.generate, prompt="x", steps=1)
        assert error.code() == grpc.StatusCode.INTERNAL and "secret" not in error.details()
        assert "server log" in error.details()
        assert client.echo().message == "HELLO"


def test_client_strings_are_escaped_in_logs(client, caplog) -> None:
    caplog.set_level(logging.INFO, logger="dts_util.requests")
    forged = "evil.bin\n2026-01-01 00:00:00 INFO dts_util.requests: UploadFile OK forged"
    _error(_upload, client, forged)
    _upload(client, "logs/" + "\u2028ok.bin")
    _error(client.generate, prompt="x", sampler="s" * 70 + "\r\n")
    lines = [r.getMessage() for r in caplog.records if r.name == "dts_util.requests"]
    assert lines and all("\n" not in line and "\r" not in line and "\u2028" not in line for line in lines)
    assert any("evil.bin\\n2026" in line for line in lines)
    assert all(len(line) < 2000 for line in lines)


@pytest.mark.parametrize("how", ["cancel", "deadline"])
def test_a_cancelled_generation_is_one_log_line_with_its_status(make_server, caplog, how: str) -> None:
    server = make_server(max_queue=0)
    caplog.set_level(logging.INFO)
    request = pb.ImageGenerationRequest(prompt="long", seed=1, steps=150, width=512, height=512)
    with server.client() as client:
        call = client.stub.GenerateImage.future(request, timeout=1.0 if how == "deadline" else 60)
        end = time.monotonic() + 10
        while server.queue.pending == 0 and time.monotonic() < end:
            time.sleep(0.01)
        if how == "cancel":
            time.sleep(0.3)
            call.cancel()
        with pytest.raises((grpc.RpcError, grpc.FutureCancelledError)):
            call.result()
        end = time.monotonic() + 10
        while server.queue.pending and time.monotonic() < end:
            time.sleep(0.05)
    time.sleep(0.2)
    gc.collect()  # "Future exception was never retrieved" is logged when the future is collected
    status = "CANCELLED" if how == "cancel" else "DEADLINE_EXCEEDED"
    # (other tests' servers share the logger: count this status only)
    lines = [r for r in caplog.records if r.getMessage().startswith(f"GenerateImage {status} ")]
    assert len(lines) == 1, [r.getMessage() for r in caplog.records if r.name == "dts_util.requests"]
    assert "peer=ipv" in lines[0].getMessage() and "peer= " not in lines[0].getMessage()
    assert not any(r.exc_info or "never retrieved" in r.getMessage() for r in caplog.records)


def _serve(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dts_util", "serve", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def _one_line_failure(result: subprocess.CompletedProcess, *words: str) -> None:
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 1, result.stderr
    assert len(errors) == 1 and all(word in errors[0] for word in words), result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.splitlines()) <= 4, result.stderr


def test_start_up_failures_are_one_line(tmp_path, model_store) -> None:
    a_file = tmp_path / "not-a-folder"
    a_file.write_text("x")
    _one_line_failure(_serve("--model-path", str(a_file)), "is a file")
    _one_line_failure(_serve("--model-path", str(tmp_path / "typo/models")), "does not exist")
    _one_line_failure(_serve("--model-path", str(model_store.root), "--default-model", "nope"), "'nope'")
    _one_line_failure(_serve("--model-path", str(model_store.root), "--device", "cuda"), "CUDA")
    created = _serve("--model-path", str(tmp_path / "new-store"), "--default-model", "nope")
    assert (tmp_path / "new-store").is_dir() and "created model store" in created.stderr


def test_a_busy_port_is_refused(model_store, tmp_path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = _serve("--model-path", str(model_store.root), "--port", str(port),
                        "--engine-dir", str(tmp_path / "e"))
    _one_line_failure(result, "already in use")


def test_a_second_server_on_the_same_port_is_refused(server, tmp_path, model_store) -> None:
    result = _serve("--model-path", str(model_store.root), "--port", str(server.running.port),
                    "--engine-dir", str(tmp_path / "e"))
    _one_line_failure(result, "already in use")


def test_help_shows_every_default() -> None:
    result = runner.invoke(app, ["serve", "--help"], env={"COLUMNS": "200"})
    for option in ("--model-path", "--engine-dir", "--address", "--auth-token-file", "--max-store-bytes",
                   "--upload-idle-timeout", "--max-loaded-models"):
        line = next(line for line in result.output.splitlines() if option in line)
        assert "default" in line, line


def test_clients_tell_network_failures_apart() -> None:
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    nothing = runner.invoke(app, ["test", "--port", str(port), "--timeout", "5"])
    assert nothing.exit_code == 1 and "nothing is listening" in nothing.output
    unknown = runner.invoke(app, ["test", "--host", "no-such-host.invalid", "--timeout", "5"])
    assert unknown.exit_code == 1 and "cannot resolve" in unknown.output
    with socket.socket() as hangs_up:  # accepts every connection and closes it at once
        hangs_up.bind(("127.0.0.1", 0))
        hangs_up.listen()
        stop = threading.Event()

        def accept_and_close() -> None:
            hangs_up.settimeout(0.2)
            while not stop.is_set():
                try:
                    connection, _ = hangs_up.accept()
                    connection.close()
                except OSError:
                    pass

        thread = threading.Thread(target=accept_and_close)
        thread.start()
        try:
            lost = runner.invoke(app, ["test", "--port", str(hangs_up.getsockname()[1]), "--timeout", "5"])
        finally:
            stop.set()
            thread.join(5)
    assert lost.exit_code == 1 and "lost mid-request" in lost.output
