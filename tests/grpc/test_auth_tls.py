"""Authentication and TLS: bearer tokens, the loopback-only default, TLS and mutual TLS, end to end."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from typer.testing import CliRunner

from dts_util.cli import app
from dts_util.client import Security, open_channel
from dts_util.config import ServerConfig
from dts_util.errors import StartupError
from dts_util.grpc.proto import image_generation_pb2 as pb
from dts_util.security.tls import create_tls_files
from dts_util.security.tokens import read_token_file, server_token, write_new_token

TOKEN = "s3cret-token-for-tests-0123456789"
runner = CliRunner()


@pytest.fixture
def auth_server(make_server):
    return make_server(auth_token=TOKEN)


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    return create_tls_files(tmp_path_factory.mktemp("tls"), ["localhost", "127.0.0.1", "::1"], client=True)


def _refused(call, *args) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call(*args)
    return caught.value


@pytest.mark.parametrize("token", ["", "wrong-token-0123456789", TOKEN + "x"])
def test_every_rpc_needs_the_token(auth_server, token: str) -> None:
    with auth_server.client(security=Security(token=token)) as client:
        calls = [(client.echo,), (client.files_exist, ["builtin-tiny-sd"]), (lambda: client.generate(prompt="x"),),
                 (lambda: client.stub.UploadFile(iter([pb.UploadFileRequest(filename="a.bin", data=b"x")])),)]
        for call, *args in calls:
            error = _refused(call, *args)
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED
            assert ("needs a token" if not token else "not valid") in error.details()
            assert TOKEN not in error.details() and (not token or token not in error.details())
    assert not (Path(auth_server.config.model_dir) / "a.bin").exists()


def test_the_right_token_is_accepted(auth_server) -> None:
    with auth_server.client(security=Security(token=TOKEN)) as client:
        assert client.echo().message == "HELLO"
        assert client.generate(prompt="with a token", steps=1, seed=1).images


def test_health_stays_open_and_reflection_is_guarded(auth_server) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(auth_server.target) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        with pytest.raises(grpc.RpcError) as caught:
            list(responses)
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_without_a_token_only_loopback_is_allowed(tmp_path) -> None:
    base = dict(model_dir=tmp_path, engine_dir=tmp_path)
    for address in ("127.0.0.1", "::1", "localhost"):
        ServerConfig(**base, address=address)
    with pytest.raises(ValueError, match="without authentication"):
        ServerConfig(**base, address="0.0.0.0")
    ServerConfig(**base, address="0.0.0.0", allow_no_auth=True)
    ServerConfig(**base, address="0.0.0.0", auth_token=TOKEN)


def test_serve_refuses_all_interfaces_without_a_token(tmp_path) -> None:
    result = subprocess.run([sys.executable, "-m", "dts_util", "serve", "--address", "0.0.0.0", "--model-path",
                             str(tmp_path)], env={**os.environ, "DTS_AUTH_TOKEN": ""}, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 1 and "--no-auth" in result.stderr and "Traceback" not in result.stderr


def test_token_file_must_be_private(tmp_path, monkeypatch) -> None:
    path = tmp_path / "token"
    token = write_new_token(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and read_token_file(path) == token
    path.chmod(0o644)
    with pytest.raises(StartupError, match="chmod 600"):
        read_token_file(path)
    path.chmod(0o600)
    path.write_text("short")
    with pytest.raises(StartupError, match="16 to"):
        read_token_file(path)
    monkeypatch.setenv("DTS_AUTH_TOKEN", TOKEN)
    assert server_token(None) == TOKEN


def test_tls_server_with_a_token(make_server, tls_files) -> None:
    server = make_server(auth_token=TOKEN, tls_cert=tls_files.server_cert, tls_key=tls_files.server_key)
    target = f"localhost:{server.running.port}"
    with open_channel(target, Security(token=TOKEN, ca=tls_files.ca_cert)) as channel:
        assert channel.unary_unary("/drawthings.ImageGenerationService/Echo",
                                   request_serializer=pb.EchoRequest.SerializeToString,
                                   response_deserializer=pb.EchoResponse.FromString)(pb.EchoRequest(),
                                                                                     timeout=10).message == "HELLO"
    with open_channel(target, Security(token=TOKEN)) as plaintext:  # a plaintext client cannot talk to it
        echo = plaintext.unary_unary("/drawthings.ImageGenerationService/Echo",
                                     request_serializer=pb.EchoRequest.SerializeToString,
                                     response_deserializer=pb.EchoResponse.FromString)
        assert _refused(echo, pb.EchoRequest()).code() == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_needs_a_client_certificate(make_server, tls_files) -> None:
    server = make_server(tls_cert=tls_files.server_cert, tls_key=tls_files.server_key,
                         tls_client_ca=tls_files.ca_cert)
    target = f"localhost:{server.running.port}"
    from dts_util.client import Client

    with Client(target, 10, Security(ca=tls_files.ca_cert, client_cert=tls_files.client_cert,
                                     client_key=tls_files.client_key)) as client:
        assert client.echo().message == "HELLO"
    with Client(target, 10, Security(ca=tls_files.ca_cert)) as client:
        assert _refused(client.echo).code() == grpc.StatusCode.UNAVAILABLE


def test_cli_clients_with_token_and_tls(make_server, tls_files) -> None:
    server = make_server(auth_token=TOKEN, tls_cert=tls_files.server_cert, tls_key=tls_files.server_key)
    port = str(server.running.port)
    ok = runner.invoke(app, ["test", "--port", port, "--ca", str(tls_files.ca_cert)], env={"DTS_AUTH_TOKEN": TOKEN})
    assert ok.exit_code == 0 and "HELLO" in ok.output
    no_token = runner.invoke(app, ["test", "--port", port, "--ca", str(tls_files.ca_cert)],
                             env={"DTS_AUTH_TOKEN": ""})
    assert no_token.exit_code == 1 and "UNAUTHENTICATED" in no_token.output
    no_tls = runner.invoke(app, ["files-exist", "builtin-tiny-sd", "--port", port, "--token", TOKEN])
    assert no_tls.exit_code == 1 and "error" in no_tls.output and "Traceback" not in no_tls.output


def test_tls_init_writes_private_keys(tmp_path) -> None:
    result = runner.invoke(app, ["tls", "init", "--dir", str(tmp_path), "--host", "gpu-box.lan", "--client"])
    assert result.exit_code == 0, result.output
    for name in ("ca.pem", "server.pem", "client.pem"):
        assert b"BEGIN CERTIFICATE" in (tmp_path / name).read_bytes()
    for name in ("ca-key.pem", "server-key.pem", "client-key.pem"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600
    from cryptography import x509

    cert = x509.load_pem_x509_certificate((tmp_path / "server.pem").read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
    assert "gpu-box.lan" in names and "localhost" in names
    again = runner.invoke(app, ["tls", "init", "--dir", str(tmp_path)])
    assert again.exit_code == 1 and "--force" in again.output


def test_install_creates_a_private_token_and_says_how_to_use_it(tmp_path, model_store) -> None:
    env = {"DTS_CONFIG_DIR": str(tmp_path / "config"), "DTS_ENGINE_DIR": str(tmp_path / "engines")}
    result = runner.invoke(app, ["install", "--no-service", "--model-path", str(model_store.root)], env=env)
    assert result.exit_code == 0, result.output
    token_file = tmp_path / "config/auth-token"
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert "DTS_AUTH_TOKEN=$(cat" in result.output and "--auth-token-file" in result.output


def test_install_rolls_back_when_the_service_cannot_start(tmp_path, model_store) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "systemctl"  # a systemctl whose user session is missing, as in containers
    fake.write_text("#!/bin/sh\necho 'Failed to connect to bus: No medium found' >&2\nexit 1\n")
    fake.chmod(0o755)
    env = {"DTS_CONFIG_DIR": str(tmp_path / "config"), "DTS_ENGINE_DIR": str(tmp_path / "engines"),
           "XDG_CONFIG_HOME": str(tmp_path / "xdg"), "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    result = subprocess.run([sys.executable, "-m", "dts_util", "install", "--model-path", str(model_store.root)],
                            env={**os.environ, **env}, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "No medium found" in result.stderr and "removed again" in result.stderr
    assert not (tmp_path / "xdg/systemd/user/dts-util.service").exists()
    assert (tmp_path / "config/auth-token").exists()  # the printed manual command needs it
