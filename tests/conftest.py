"""Shared fixtures: one built-in model per session, and real servers on free ports."""

from __future__ import annotations

import asyncio
import os
import shutil
import threading
from dataclasses import replace
from pathlib import Path
from typing import Iterator

import pytest

from dts_util.client import Client
from dts_util.config import ServerConfig
from dts_util.models.builtin import ensure_builtin_model
from dts_util.models.store import ModelStore


# tools/device_check.sh --dry-run sets this: `gpu` tests then run on the CPU with the built-in model, so
# every step of the GPU check executes in CI.
GPU_DRY_RUN = os.environ.get("DTS_GPU_DRY_RUN") == "1"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`tensorrt` tests run wherever tensorrt imports and a CUDA GPU is present, `gpu` tests wherever CUDA
    is (or in the GPU check's dry run); elsewhere they skip."""
    from dts_util.engines.backends import tensorrt_available

    skips = {}
    available, why = tensorrt_available()
    if not available:
        skips["tensorrt"] = pytest.mark.skip(reason=f"TensorRT backend unavailable: {why}")
    if not GPU_DRY_RUN:
        import torch

        if not torch.cuda.is_available():
            skips["gpu"] = pytest.mark.skip(reason="needs a CUDA GPU (tools/device_check.sh --dry-run runs it on the "
                                                   "CPU)")
    for item in items:
        for marker, skip in skips.items():
            if marker in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def model_store(tmp_path_factory: pytest.TempPathFactory) -> ModelStore:
    store = ModelStore(tmp_path_factory.mktemp("models"))
    ensure_builtin_model(store)
    return store


@pytest.fixture(scope="session")
def tiny_flux(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny seeded FLUX.1 [dev] in the diffusers layout (tools/make_tiny_flux.py), built once per session."""
    from tests.tools import load_tool

    return load_tool("make_tiny_flux").build(tmp_path_factory.mktemp("flux") / "tiny-flux-dev")


@pytest.fixture(scope="session")
def base_config(model_store: ModelStore, tmp_path_factory: pytest.TempPathFactory) -> ServerConfig:
    return ServerConfig(model_dir=model_store.root, engine_dir=tmp_path_factory.mktemp("engines"),
                        address="127.0.0.1", port=0, device="cpu", max_upload_bytes=1024 * 1024)


class ServerThread:
    """The real server (``grpc/bootstrap.py`` over a ``WorkerPool``) on its own event loop in a background
    thread. ``service`` and ``queue`` are the first worker's; ``engines`` becomes that worker's engine manager."""

    def __init__(self, config: ServerConfig, engines=None) -> None:
        from dts_util.workers import WorkerPool

        self.pool = WorkerPool.for_devices(config, use_engines=False)
        self.service = self.pool.workers[0].service
        self.service.engines = engines
        self.queue = self.pool.workers[0].queue
        self.config = config
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        from dts_util.grpc.bootstrap import start_server

        async def start() -> None:
            self.running = await start_server(self.config, self.pool)
            await asyncio.to_thread(self.pool.warm_up)
            await self.running.set_serving(True)

        self.loop.run_until_complete(start())
        self.ready.set()
        self.loop.run_forever()

    def __enter__(self) -> "ServerThread":
        self.thread.start()
        assert self.ready.wait(120), "server did not start"
        return self

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.running.port}"

    def client(self, timeout: float | None = 120, security=None) -> Client:
        return Client(self.target, timeout, security)

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.running.stop(0), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)


@pytest.fixture(scope="session")
def server(base_config: ServerConfig) -> Iterator[ServerThread]:
    with ServerThread(base_config) as running:
        yield running


@pytest.fixture(scope="session")
def client(server: ServerThread) -> Iterator[Client]:
    with server.client() as c:
        yield c


@pytest.fixture
def no_queue_server(base_config: ServerConfig) -> Iterator[ServerThread]:
    """A second server whose queue admits no waiting request."""
    with ServerThread(replace(base_config, max_queue=0)) as running:
        yield running


def write_file(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def fresh_store(model_store: ModelStore, folder: Path) -> Path:
    """A new model store holding a copy of the built-in model, for servers whose store tests change."""
    root = folder / "models"
    shutil.copytree(model_store.root / "builtin-tiny-sd", root / "builtin-tiny-sd")
    return root


@pytest.fixture
def make_server(base_config: ServerConfig, model_store: ModelStore, tmp_path: Path):
    """Start servers with their own settings (and, with ``own_store``, their own model store)."""
    started: list[ServerThread] = []

    def make(own_store: bool = False, **overrides) -> ServerThread:
        if own_store:
            overrides.setdefault("model_dir", fresh_store(model_store, tmp_path / f"s{len(started)}"))
        server = ServerThread(replace(base_config, **overrides)).__enter__()
        started.append(server)
        return server

    yield make
    for server in started:
        server.__exit__(None, None, None)
