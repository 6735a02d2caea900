"""Scale-out: HAProxy, configured by tools/deploy/haproxy.cfg, in front of two `dts-util serve`
replicas that share one model store and one engine cache.

The balancer's active health check speaks grpc.health.v1.Health/Check over HTTP/2 and only
passes a replica that answers SERVING. Skipped where `haproxy` is not installed
(tools/run_tests.sh installs it with apt-get when it can).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from concurrent import futures
from pathlib import Path
from typing import Callable, Iterator

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from dts_util.grpc.proto import image_generation_pb2 as pb
from dts_util.grpc.proto import image_generation_pb2_grpc as pb_grpc

REPO = Path(__file__).resolve().parents[2]
HAPROXY_CFG = REPO / "tools" / "deploy" / "haproxy.cfg"
# Debian installs it in /usr/sbin, which is not on every user's PATH.
HAPROXY = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin:/usr/local/sbin")
BACKEND = "dts_replicas"
REPLICAS = ("replica1", "replica2")
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

pytestmark = pytest.mark.skipif(HAPROXY is None, reason="haproxy is not on PATH (apt-get install haproxy; "
                                                         "tools/run_tests.sh installs it when it can)")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _wait_for(what: str, condition: Callable[[], bool], timeout: float, logs: tuple[Path, ...] = ()) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            details = "\n".join(f"--- {log.name}:\n{_tail(log)}" for log in logs)
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}\n{details}")
        time.sleep(0.2)


class Processes:
    """Subprocesses started by a test, each logging to its own file; all stopped at teardown."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.running: list[tuple[subprocess.Popen, object]] = []

    def start(self, name: str, args: list[str], env: dict[str, str]) -> tuple[subprocess.Popen, Path]:
        log_path = self.folder / f"{name}.log"
        log = log_path.open("wb")
        process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env)
        self.running.append((process, log))
        return process, log_path

    @staticmethod
    def stop(process: subprocess.Popen, grace: float = 15) -> None:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(grace)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)

    def stop_all(self) -> None:
        for process, log in reversed(self.running):
            self.stop(process)
            log.close()


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    started = Processes(tmp_path)
    yield started
    started.stop_all()


class Balancer:
    """haproxy -f tools/deploy/haproxy.cfg in the foreground, its addresses set through the
    environment variables the file reads."""

    def __init__(self, processes: Processes, replica_ports: tuple[int, int]) -> None:
        # A unix socket path must stay short (108 bytes): not under pytest's tmp_path.
        self.socket_dir = tempfile.mkdtemp(prefix="dts-lb-")
        self.stats_socket = os.path.join(self.socket_dir, "stats.sock")
        self.port = _free_port()
        env = {**os.environ, "DTS_LB_BIND": f"127.0.0.1:{self.port}",
               "DTS_REPLICA1": f"127.0.0.1:{replica_ports[0]}", "DTS_REPLICA2": f"127.0.0.1:{replica_ports[1]}",
               "DTS_LB_STATS_SOCKET": self.stats_socket, "DTS_LB_CHECK_INTER": "500ms"}
        check = subprocess.run([HAPROXY, "-c", "-f", str(HAPROXY_CFG)], env=env, capture_output=True, text=True,
                               timeout=30)
        assert check.returncode == 0, f"haproxy -c rejected {HAPROXY_CFG}:\n{check.stdout}{check.stderr}"
        self.process, self.log = processes.start("haproxy", [HAPROXY, "-f", str(HAPROXY_CFG), "-db"], env)
        _wait_for("haproxy's stats socket", self._answers, 20, (self.log,))

    def _answers(self) -> bool:
        assert self.process.poll() is None, f"haproxy exited:\n{_tail(self.log)}"
        try:
            self.servers()
            return True
        except OSError:
            return False

    def command(self, line: str) -> str:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(5)
            sock.connect(self.stats_socket)
            sock.sendall(line.encode() + b"\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def servers(self) -> dict[str, dict[str, str]]:
        """`show stat` for the backend's servers: {name: {column: value}} (status, check_status, stot...)."""
        header, *rows = [line for line in self.command("show stat").splitlines() if line]
        columns = header.lstrip("# ").split(",")
        table = [dict(zip(columns, row.split(","))) for row in rows]
        return {row["svname"]: row for row in table if row["pxname"] == BACKEND and row["svname"] in REPLICAS}

    def state(self) -> dict[str, tuple[str, str]]:
        return {name: (row["status"], row["check_status"]) for name, row in self.servers().items()}

    def wait_for_state(self, expected: dict[str, tuple[str, str]], timeout: float = 20) -> None:
        """Wait until the named servers have the given (status, last check) pairs, e.g. ("UP", "L7OK"):
        a server counts as UP before its first check, so only a passed check proves it healthy."""
        def reached() -> bool:
            state = self.state()
            return all(state.get(name) == value for name, value in expected.items())

        _wait_for(f"haproxy servers {expected} (now {self.state()})", reached, timeout, (self.log,))

    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def close(self) -> None:
        shutil.rmtree(self.socket_dir, ignore_errors=True)


@pytest.fixture
def balancer_for(processes: Processes) -> Iterator[Callable[[tuple[int, int]], Balancer]]:
    made: list[Balancer] = []

    def make(replica_ports: tuple[int, int]) -> Balancer:
        made.append(Balancer(processes, replica_ports))
        return made[-1]

    yield make
    for balancer in made:
        balancer.close()


def _health(target: str) -> int | None:
    """The replica's overall health status, or None while it does not answer."""
    with grpc.insecure_channel(target) as channel:
        try:
            return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2).status
        except grpc.RpcError:
            return None


def _start_replicas(processes: Processes, store: Path, engines: Path) -> list[tuple[subprocess.Popen, int]]:
    """Two `dts-util serve` processes on one empty model store and engine cache, started together as a
    Deployment starts its pods: both race to create the built-in model, and each sweeps the store for
    leftovers while the other may be building it."""
    env = {**os.environ, "DTS_AUTH_TOKEN": "", "PYTHONUNBUFFERED": "1"}
    started = []
    for name in REPLICAS:
        port = _free_port()
        process, log = processes.start(name, [
            sys.executable, "-m", "dts_util", "serve", "--address", "127.0.0.1", "--port", str(port),
            "--model-path", str(store), "--engine-dir", str(engines), "--devices", "cpu"], env)
        started.append((name, process, log, port))
    for name, process, log, port in started:
        def serving() -> bool:
            assert process.poll() is None, f"dts-util serve exited with {process.returncode}:\n{_tail(log)}"
            return _health(f"127.0.0.1:{port}") == SERVING

        _wait_for(f"{name} (port {port}) to report SERVING", serving, 120, (log,))
    return [(process, port) for _, process, _, port in started]


def _echo(stub: pb_grpc.ImageGenerationServiceStub) -> None:
    assert stub.Echo(pb.EchoRequest(), timeout=20).message == "HELLO"


def _generate(stub: pb_grpc.ImageGenerationServiceStub, seed: int) -> None:
    reply = stub.GenerateImage(pb.ImageGenerationRequest(prompt="a lighthouse", width=64, height=64, steps=2,
                                                         seed=seed), timeout=120)
    assert len(reply.images) == 1 and reply.images[0].startswith(b"\x89PNG\r\n\x1a\n")


def _upload(stub: pb_grpc.ImageGenerationServiceStub, name: str, data: bytes) -> pb.UploadFileResponse:
    digest = hashlib.sha256(data).hexdigest()

    def messages() -> Iterator[pb.UploadFileRequest]:
        yield pb.UploadFileRequest(filename=name, sha256=digest, total_size=len(data))
        for start in range(0, len(data), 64 * 1024):
            yield pb.UploadFileRequest(data=data[start:start + 64 * 1024])

    reply = stub.UploadFile(messages(), timeout=60)
    assert reply.size == len(data) and reply.sha256 == digest
    return reply


def test_two_replicas_behind_haproxy_share_the_store_and_survive_a_replica_stopping(
        processes: Processes, balancer_for, tmp_path: Path) -> None:
    shared = tmp_path / "shared"  # the volume both replicas mount; the store inside is created by them
    shared.mkdir()
    store, engines = shared / "models", shared / "engines"
    (first, first_port), (second, second_port) = _start_replicas(processes, store, engines)
    balancer = balancer_for((first_port, second_port))
    balancer.wait_for_state({"replica1": ("UP", "L7OK"), "replica2": ("UP", "L7OK")})

    with grpc.insecure_channel(balancer.target()) as channel:
        stub = pb_grpc.ImageGenerationServiceStub(channel)
        # (a) Echo and a small generation through the balancer; calls spread over both replicas.
        for _ in range(6):
            _echo(stub)
        _generate(stub, seed=1)
        served = {name: int(row["stot"]) for name, row in balancer.servers().items()}
        assert all(count > 0 for count in served.values()), f"calls per replica: {served}"
        assert health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status \
            == SERVING

        # (b) An upload through the balancer lands in the shared store: both replicas see it.
        data = os.urandom(300 * 1024)
        _upload(stub, "uploads/through-lb.bin", data)
        assert (store / "uploads" / "through-lb.bin").read_bytes() == data
        for port in (first_port, second_port):
            with grpc.insecure_channel(f"127.0.0.1:{port}") as direct:
                reply = pb_grpc.ImageGenerationServiceStub(direct).FilesExist(
                    pb.FilesExistRequest(files=["uploads/through-lb.bin", "uploads/missing.bin"]), timeout=10)
                assert list(reply.exists) == [True, False], f"replica on port {port}: {reply}"

        # (c) Stop one replica (SIGTERM, as an orchestrator would). Its checks are held first, so
        # HAProxy still counts it UP: calls sent its way fail to connect and are retried on the
        # other replica (retries + redispatch), and none reaches the client as an error.
        balancer.command(f"disable health {BACKEND}/replica1")
        Processes.stop(first)
        assert first.returncode is not None
        for _ in range(6):
            _echo(stub)
        _generate(stub, seed=2)
        stopped = balancer.servers()["replica1"]  # status "no check" while checks are held: not DOWN
        assert "DOWN" not in stopped["status"] and int(stopped["wredis"]) > 0, \
            f"no call was redispatched from the stopped replica: {stopped}"
        # Once checking again, HAProxy marks it DOWN (connection refused) and stops trying it.
        balancer.command(f"enable health {BACKEND}/replica1")
        balancer.wait_for_state({"replica1": ("DOWN", "L4CON"), "replica2": ("UP", "L7OK")})
        for _ in range(3):
            _echo(stub)
        _generate(stub, seed=3)
    assert second.poll() is None


class _HealthServer:
    """A bare gRPC server with only the health service, whose answer the test sets."""

    def __init__(self) -> None:
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def set(self, status: int) -> None:
        self.health.set("", status)


@pytest.fixture
def health_servers() -> Iterator[tuple[_HealthServer, _HealthServer]]:
    servers = (_HealthServer(), _HealthServer())
    yield servers
    for server in servers:
        server.server.stop(0)


def test_health_check_passes_only_serving(balancer_for, health_servers) -> None:
    """The check in haproxy.cfg needs the answer SERVING: NOT_SERVING (warming up, shutting down)
    takes a replica out at once, and SERVING brings it back."""
    one, two = health_servers
    one.set(SERVING)
    two.set(NOT_SERVING)
    balancer = balancer_for((one.port, two.port))
    balancer.wait_for_state({"replica1": ("UP", "L7OK"), "replica2": ("DOWN", "L7RSP")})
    with grpc.insecure_channel(balancer.target()) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == SERVING  # only the SERVING server gets traffic
    two.set(SERVING)
    balancer.wait_for_state({"replica1": ("UP", "L7OK"), "replica2": ("UP", "L7OK")})
    one.set(NOT_SERVING)
    balancer.wait_for_state({"replica1": ("DOWN", "L7RSP"), "replica2": ("UP", "L7OK")})
