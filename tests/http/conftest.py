"""Live servers with the HTTP APIs on (``serve --http-port``), shared by the tests of this folder.

``http_server``: no token, plaintext, a short client deadline (so the slow-client tests are quick). ``secure_server``:
a token, TLS, and no room to wait in its queue (the 503 test). Both serve the built-in model.
"""

from __future__ import annotations

import socket
from dataclasses import replace
from typing import Iterator

import pytest

from dts_util.config import ServerConfig
from dts_util.security.tls import create_tls_files
from tests.conftest import ServerThread

TOKEN = "http-token-for-tests-0123456789abc"
CLIENT_TIMEOUT_S = 2.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class HttpServerThread(ServerThread):
    @property
    def http(self) -> str:
        scheme = "https" if self.config.tls_cert else "http"
        return f"{scheme}://127.0.0.1:{self.running.http_port}"

    @property
    def http_port(self) -> int:
        return self.running.http_port


@pytest.fixture(scope="session")
def http_server(base_config: ServerConfig) -> Iterator[HttpServerThread]:
    config = replace(base_config, http_port=free_port(), http_timeout=CLIENT_TIMEOUT_S)
    with HttpServerThread(config) as running:
        yield running


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory):
    return create_tls_files(tmp_path_factory.mktemp("http-tls"), ["localhost", "127.0.0.1"])


@pytest.fixture(scope="session")
def secure_server(base_config: ServerConfig, tls_files) -> Iterator[HttpServerThread]:
    config = replace(base_config, http_port=free_port(), auth_token=TOKEN, tls_cert=tls_files.server_cert,
                     tls_key=tls_files.server_key, max_queue=0)
    with HttpServerThread(config) as running:
        yield running
