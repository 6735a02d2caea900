"""Server start-up: one gRPC server for a list of protocol services, with the interceptor, TLS,
health (overall and per service), reflection, signals and a graceful stop. No ML: the model
layer arrives as an ``ImageGenerator``."""

from __future__ import annotations

import asyncio
import errno
import logging
import signal
import socket
from pathlib import Path
from typing import Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from dts_util.boundary import ImageGenerator
from dts_util.config import ServerConfig, is_loopback
from dts_util.errors import StartupError
from dts_util.grpc import drawthings, drawthings_app
from dts_util.grpc.interceptors import RequestInterceptor
from dts_util.grpc.protocol import ProtocolService
from dts_util.limits import MAX_RECEIVE_MESSAGE_BYTES, MAX_RESPONSE_BYTES

log = logging.getLogger(__name__)
# The protocols a server speaks; a new one is a package under grpc/ and an entry here.
PROTOCOLS: tuple[ProtocolService, ...] = (drawthings.SERVICE, drawthings_app.SERVICE)
# Seconds in-flight RPCs get to finish on SIGTERM/SIGINT before they are cancelled.
GRACE_SECONDS = 10.0


class RunningServer:
    """A started server: its port, health servicer, services and model layer, for tests and ``serve``."""

    def __init__(self, server: grpc.aio.Server, port: int, health_servicer: health.aio.HealthServicer,
                 generator: ImageGenerator, service_names: list[str]) -> None:
        self.server, self.port, self.health = server, port, health_servicer
        self.generator, self.service_names = generator, service_names
        self.http = None  # the HTTP APIs' server (``--http-port``), when they are on

    @property
    def http_port(self) -> int:
        return self.http.port if self.http is not None else 0

    async def set_serving(self, serving: bool, service: str | None = None) -> None:
        """Health of one service, or of the server ("") and every service when ``service`` is None."""
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ([service] if service is not None else ["", *self.service_names]):
            await self.health.set(name, status)

    async def stop(self, grace: float | None = GRACE_SECONDS) -> None:
        await self.health.enter_graceful_shutdown()
        if self.http is not None:  # both protocols' open requests finish within the one grace period
            await asyncio.gather(self.http.stop(grace or 0), self.server.stop(grace))
        else:
            await self.server.stop(grace)
        await asyncio.to_thread(self.generator.close)


def path_scrubber(config: ServerConfig) -> Callable[[str], str]:
    """Removes the server's own absolute paths from messages clients will read."""
    replacements = [(str(Path(config.model_dir).resolve()), "<model store>"),
                    (str(Path(config.engine_dir).resolve()), "<engine dir>"),
                    (str(Path(config.model_dir)), "<model store>"), (str(Path(config.engine_dir)), "<engine dir>"),
                    (str(Path.home()), "~")]
    replacements.sort(key=lambda pair: -len(pair[0]))  # longest first: a root inside home stays whole

    def scrub(message: str) -> str:
        for path, placeholder in replacements:
            if len(path) > 1:
                message = message.replace(path, placeholder)
        return message

    return scrub


def _check_port_free(host: str, port: int) -> None:
    """Bind a plain socket first: its error says why (in use, not our address) without gRPC's log noise."""
    try:
        infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise StartupError(f"cannot listen on {host}: {exc.strerror}; check --address") from None
    for family, kind, proto, _, sockaddr in infos:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(sockaddr)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise StartupError(f"port {port} on {host} is already in use (another dts-util serve?); stop "
                                       "that program or choose another --port") from None
                if exc.errno == errno.EADDRNOTAVAIL:
                    raise StartupError(f"{host} is not an address of this machine; check --address") from None
                raise StartupError(f"cannot listen on {host}:{port}: {exc.strerror}") from None


def _bind(server: grpc.aio.Server, config: ServerConfig) -> int:
    """Listen on the configured address; a clear StartupError when that is impossible."""
    host = f"[{config.address}]" if ":" in config.address and not config.address.startswith("[") else config.address
    address = f"{host}:{config.port}"
    if config.port:
        _check_port_free(host, config.port)
    try:
        if config.tls_cert is not None:
            from dts_util.security.tls import server_credentials

            port = server.add_secure_port(address, server_credentials(config.tls_cert, config.tls_key,
                                                                      config.tls_client_ca))
        else:
            port = server.add_insecure_port(address)
    except RuntimeError:
        port = 0
    if port == 0:
        raise StartupError(f"cannot listen on {address}: the port is in use (another dts-util serve?) or the "
                           "address is not on this machine; stop the other program or choose --port/--address")
    return port


MAX_PENDING_CALLS = 20_000


def keepalive_options(seconds: float) -> list[tuple[str, int]]:
    """Ping every connection after ``seconds`` without traffic and close it when the ping goes unanswered for as
    long again: its calls are cancelled, so a vanished client's generation stops at its next step. Clients may
    ping every 10 s (gRPC's default server policy would answer frequent pings with GOAWAY)."""
    milliseconds = int(seconds * 1000)
    return [("grpc.keepalive_time_ms", milliseconds), ("grpc.keepalive_timeout_ms", milliseconds),
            ("grpc.keepalive_permit_without_calls", 1), ("grpc.http2.max_pings_without_data", 0),
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000)]


async def start_server(config: ServerConfig, generator: ImageGenerator,
                       protocols: tuple[ProtocolService, ...] = PROTOCOLS) -> RunningServer:
    """Bind, register ``protocols`` over ``generator`` and start; health says NOT_SERVING until
    ``set_serving(True)``."""
    # A little over the largest per-method limit, so each method's own limit answers with its own message.
    largest = max([MAX_RECEIVE_MESSAGE_BYTES, *(limit + 64 * 1024 for p in protocols
                                                for limit in p.request_limits.values())])
    options = [("grpc.max_receive_message_length", largest),
               ("grpc.max_send_message_length", MAX_RESPONSE_BYTES),
               # gRPC sets SO_REUSEPORT by default: a second server on a busy port would "start" and
               # share its clients with the first. One server per port.
               ("grpc.so_reuseport", 0),
               # Advertised to clients (SETTINGS_MAX_CONCURRENT_STREAMS): a flood of calls queues in the client.
               ("grpc.max_concurrent_streams", config.max_concurrent_streams),
               # Calls accepted by the transport and waiting for a handler: past gRPC's default of 1000 (hard 3000)
               # a flood's calls are cancelled without a word; a queue this deep costs memory, not the device.
               ("grpc.server.max_pending_requests", MAX_PENDING_CALLS),
               ("grpc.server.max_pending_requests_hard_limit", 2 * MAX_PENDING_CALLS),
               *keepalive_options(config.keepalive_seconds)]
    interceptor = RequestInterceptor(
        config.auth_token, path_scrubber(config),
        own_secret_prefixes=tuple(p.method_prefix for p in protocols if p.checks_own_secret),
        method_limits={method: limit for p in protocols for method, limit in p.request_limits.items()})
    server = grpc.aio.server(interceptors=[interceptor], options=options)
    for protocol in protocols:
        protocol.register(server, generator, config)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = [protocol.name for protocol in protocols]
    reflection.enable_server_reflection(
        (*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server)
    port = _bind(server, config)
    await server.start()
    running = RunningServer(server, port, health_servicer, generator, names)
    await running.set_serving(False)
    if config.http_port:
        await _start_http(running, config, generator)
    return running


async def _start_http(running: RunningServer, config: ServerConfig, generator: ImageGenerator) -> None:
    """The HTTP APIs beside gRPC, on the same loop, address, token and certificate; a gRPC server already
    listening is stopped again when HTTP cannot start."""
    from dts_util import http

    try:
        running.http = await http.start(config, generator)
    except BaseException:
        await running.server.stop(0)
        raise


def _describe_security(config: ServerConfig) -> str:
    auth = "bearer token required" if config.auth_token else "NO authentication"
    tls = ("mutual TLS" if config.tls_client_ca else "TLS") if config.tls_cert else "plaintext (no TLS)"
    return f"{auth}, {tls}"


async def serve(config: ServerConfig, generator: ImageGenerator) -> None:
    """Run until SIGINT/SIGTERM: listen (Echo answers at once), then warm up the default model."""
    # Before listening: no request can race the built-in model's creation, and a default model that
    # cannot be served stops start-up with one clear line rather than failing every request.
    await asyncio.to_thread(generator.prepare_store)
    running = await start_server(config, generator)
    if config.metrics_port:
        from dts_util.metrics import serve_metrics

        try:
            serve_metrics(config.metrics_port, config.metrics_address)
        except OSError as exc:
            raise StartupError(f"cannot serve metrics on {config.metrics_address}:{config.metrics_port}: "
                               f"{exc.strerror}") from None
        log.info("metrics on http://%s:%d/metrics", config.metrics_address, config.metrics_port)
    log.info("listening on %s:%d (%s; model store %s, engines %s)", config.address, running.port,
             _describe_security(config), config.model_dir, config.engine_dir)
    if running.http is not None:
        scheme = "https" if config.tls_cert else "http"
        log.info("HTTP APIs on %s://%s:%d (A1111 /sdapi/v1, OpenAI /v1/images; docs at /docs)", scheme,
                 config.address, running.http_port)
    if not config.auth_token and not is_loopback(config.address):
        log.warning("authentication is OFF (--no-auth) on %s: anyone who can reach port %d can generate and "
                    "write to the model store", config.address, running.port)
    elif config.auth_token and not config.tls_cert and not is_loopback(config.address):
        log.warning("the token travels in plaintext: add --tls-cert/--tls-key (see `dts-util tls init`)")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    advertiser = None
    try:
        advertiser = await _advertise(config, running.port)
        await asyncio.to_thread(generator.warm_up)
        if not stop.is_set():  # a SIGTERM during warm-up: never report SERVING on the way out
            await running.set_serving(True)
            log.info("ready: health is SERVING")
            await stop.wait()
    finally:
        log.info("shutting down (grace %.0fs)", GRACE_SECONDS)
        if advertiser is not None:
            await advertiser.stop()
        await running.stop()


async def _advertise(config: ServerConfig, port: int):
    """With ``--advertise``, announce the server over mDNS so the Draw Things app lists it."""
    if not config.advertise:
        return None
    from dts_util.grpc.drawthings_app.advertise import Advertiser

    if is_loopback(config.address):
        log.warning("--advertise: the server listens on loopback only, so the app on another device could not "
                    "reach it; listen on the network (a token, or --no-auth) to be found")
    advertiser = Advertiser(config.advertise_name, port, config.tls_cert is not None, config.address)
    try:
        await advertiser.start()
    except Exception as exc:  # noqa: BLE001 - zeroconf's name errors are not OSErrors
        await advertiser.stop()
        raise StartupError(f"cannot announce the server over mDNS: {exc}; check --advertise-name (one DNS label "
                           "of at most 63 bytes, not used by another server)") from None
    return advertiser
