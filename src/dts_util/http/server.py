"""uvicorn on the gRPC server's own event loop: HTTP/1.1 on ``--http-port`` of the same address, with the same
TLS certificate (and client CA), so the HTTP APIs share the model layer, queue and token with gRPC.

uvicorn closes idle keep-alive connections, but it waits forever for a client that sends its request head slowly,
or never reads the answer. ``GuardedH11Protocol`` gives both a deadline (``--http-timeout``): the head and body of a
request must arrive within it (the Guard middleware times the body's pieces too), and a response the client stops
reading is dropped when its write buffer has been full that long. The time the server spends generating is not
the client's: no deadline runs while the request is complete and the answer not yet written.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from dts_util.config import ServerConfig
from dts_util.errors import StartupError
from dts_util.limits import MAX_HTTP_HEADER_BYTES

log = logging.getLogger(__name__)
# Seconds open requests get to finish when the server stops (gRPC's grace is the same).
GRACE_SECONDS = 10.0


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline on the client's part of each exchange (see the module's doc)."""

    client_timeout = 60.0  # seconds; ``with_deadline`` makes a subclass with the server's own

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._read_deadline: asyncio.TimerHandle | None = None
        self._write_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_read()

    def handle_events(self) -> None:
        super().handle_events()
        if self.cycle is not None and not self.cycle.more_body and not self.cycle.response_complete:
            self._disarm_read()  # the request is in: the rest is the server's time

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._disarm_read()
        if not self.transport.is_closing():
            self._arm_read()  # the next request on this connection gets its own deadline

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._write_deadline is None:
            self._write_deadline = self.loop.call_later(self.client_timeout, self._expire, "reading the response")

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._write_deadline is not None:
            self._write_deadline.cancel()
            self._write_deadline = None

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_read()
        if self._write_deadline is not None:
            self._write_deadline.cancel()
        super().connection_lost(exc)

    def _arm_read(self) -> None:
        if self._read_deadline is None:
            self._read_deadline = self.loop.call_later(self.client_timeout, self._expire, "sending its request")

    def _disarm_read(self) -> None:
        if self._read_deadline is not None:
            self._read_deadline.cancel()
            self._read_deadline = None

    def _expire(self, doing: str) -> None:
        self._read_deadline = self._write_deadline = None
        if self.transport.is_closing():
            return
        if self.cycle is not None and self.cycle.more_body and not self.cycle.response_complete:
            return  # the body is being read: the Guard answers 408 for it
        log.info("HTTP client %s took over %g s %s; connection closed", self.client, self.client_timeout, doing)
        self.transport.abort()


def with_deadline(seconds: float) -> type[GuardedH11Protocol]:
    """The protocol class with ``seconds`` as its client deadline (uvicorn makes one instance per connection)."""
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {"client_timeout": seconds})


class HttpServer:
    """A started uvicorn server; ``stop`` lets open requests finish for a grace period, then cancels them."""

    def __init__(self, server: uvicorn.Server, port: int, ticker: asyncio.Task) -> None:
        self.server, self.port, self._ticker = server, port, ticker

    async def stop(self, grace: float = GRACE_SECONDS) -> None:
        self._ticker.cancel()
        self.server.config.timeout_graceful_shutdown = max(int(grace), 0)
        self.server.should_exit = True
        await self.server.shutdown()


def _listen(config: ServerConfig) -> socket.socket:
    """The HTTP socket on the server's address; a clear StartupError when that is impossible."""
    host = config.address.strip("[]")
    try:
        family = socket.getaddrinfo(host, config.http_port, type=socket.SOCK_STREAM)[0][0]
    except socket.gaierror as exc:
        raise StartupError(f"cannot listen on {host}: {exc.strerror}; check --address") from None
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, config.http_port))
    except OSError as exc:
        sock.close()
        raise StartupError(f"cannot serve HTTP on {host}:{config.http_port}: {exc.strerror} (another program on "
                           "that port?); choose another --http-port") from None
    sock.listen(1024)
    sock.setblocking(False)
    return sock


async def start_http(config: ServerConfig, app: Any) -> HttpServer:
    """Serve ``app`` on ``config.http_port`` (0: a free port) of the server's address, on this event loop."""
    sock = _listen(config)
    uv = uvicorn.Config(
        app, http=with_deadline(config.http_timeout), lifespan="off", access_log=False, log_config=None, server_header=False,
        timeout_keep_alive=5, h11_max_incomplete_event_size=MAX_HTTP_HEADER_BYTES,
        ssl_certfile=str(config.tls_cert) if config.tls_cert else None,
        ssl_keyfile=str(config.tls_key) if config.tls_key else None,
        ssl_ca_certs=str(config.tls_client_ca) if config.tls_client_ca else None,
        ssl_cert_reqs=ssl.CERT_REQUIRED if config.tls_client_ca else ssl.CERT_NONE)
    server = uvicorn.Server(uv)
    try:
        uv.load()
    except (OSError, ssl.SSLError) as exc:
        sock.close()
        raise StartupError(f"cannot serve HTTPS with --tls-cert/--tls-key: {exc}") from None
    server.lifespan = uv.lifespan_class(uv)
    await server.startup(sockets=[sock])
    # uvicorn's main loop only refreshes the Date header once a second here; the stop comes from ``stop``.
    ticker = asyncio.ensure_future(server.main_loop())
    return HttpServer(server, sock.getsockname()[1], ticker)
