"""One worker per device, and the pool that hands each request to one of them.

A ``Worker`` owns what belongs to one device: its loaded models, its engine
runners (each pinned to that device) and its queue, whose single thread runs the
worker's generations one after another with the device made current. The
``WorkerPool`` sends each request to the worker that can start it soonest and is
the ``ImageGenerator`` every protocol serves; the model store and the engine
cache are shared by all workers.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from dts_util.boundary import GenerationOutput, GenerationRequest, UpdateCallback
from dts_util.config import ServerConfig, check_dtype, check_fp8, resolve_devices
from dts_util.errors import GenerationTimedOut
from dts_util.models.store import ModelStore
from dts_util.work_queue import GenerationQueue
from dts_util.executors import IMAGES, run_in

if TYPE_CHECKING:
    from dts_util.pipeline.generation import GenerationResult
    from dts_util.engines.manager import BackgroundBuilds

log = logging.getLogger(__name__)


def _pin_device(device: str) -> Callable[[], None] | None:
    """A thread initializer making ``device`` current, so every CUDA call of the worker lands on its GPU."""
    if not device.startswith("cuda"):
        return None

    def pin() -> None:
        import torch

        torch.cuda.set_device(device)

    return pin


def _stop_check(stop: threading.Event, cap: float) -> Callable[[], bool]:
    """What the pipeline polls between steps: the call ended (``stop``), or, past ``cap`` seconds from the start
    of the generation, GenerationTimedOut."""
    started = time.monotonic()

    def should_stop() -> bool:
        if stop.is_set():
            return True
        if cap and time.monotonic() - started > cap:
            raise GenerationTimedOut(f"the generation ran past this server's limit of {cap:g} s per generation "
                                     "(--max-generation-seconds) and was stopped; ask for fewer steps, a smaller "
                                     "size or fewer images")
        return False

    return should_stop


class Worker:
    """Runs generations on one device.

    Args:
        name: the worker's name in logs and metrics (its device, numbered when several share one).
        device: "cpu" or "cuda:N".
        config: the server configuration (its device field is replaced by ``device``).
        store: the model store shared by the pool.
        use_engines: look up built engines for requests (else everything runs eagerly).
        builds: the pool's background engine builder, if ``--build-missing``.
    """

    def __init__(self, name: str, device: str, config: ServerConfig, store: ModelStore, use_engines: bool = True,
                 builds: "BackgroundBuilds | None" = None) -> None:
        from dts_util.service import ImageService

        self.name, self.device = name, device
        engines = None
        if use_engines:
            from dts_util.engines.manager import EngineManager

            engines = EngineManager(config.engine_dir, builds=builds)
        self.service = ImageService(replace(config, device=device), engines, store, worker=name)
        self.queue = GenerationQueue(config.max_queue, name, _pin_device(device))
        self.assigned = 0  # requests handed to this worker and not finished: preparing, waiting or running

    async def generate(self, request: GenerationRequest, streamed: bool,
                       on_update: UpdateCallback | None) -> GenerationOutput:
        self.queue.check_room()  # a full queue refuses before the request's images are decoded
        model, resolved = await run_in(IMAGES, self.service.prepare, request, streamed)  # decodes the images
        stop = threading.Event()
        cap = self.service.config.max_generation_seconds

        def job() -> "GenerationResult":
            return self.service.run(model, resolved, _stop_check(stop, cap), on_update)

        result = await self.queue.run(job, stop)
        # Encoding the images is the CPU's work: the device takes the next request meanwhile.
        return await run_in(IMAGES, self.service.encode, model, resolved, result)

    def holds_model(self, name: str) -> bool:
        return self.service.holds_model(name)

    def close(self) -> None:
        """Let the running generation end first: engines must not be released under its last step."""
        self.queue.shutdown(wait=True)
        if self.service.engines is not None:
            self.service.engines.close()


class WorkerPool:
    """The workers of one server, behind the ``ImageGenerator`` interface protocols use.

    A request goes to the worker with the fewest requests assigned (so an idle device
    is always picked first); among equals, to one that already holds the model, so a
    second GPU does not load a model another one could serve just as soon.
    """

    def __init__(self, config: ServerConfig, workers: list[Worker], store: ModelStore) -> None:
        self.config, self.workers, self.store = config, workers, store
        self.default_model = config.default_model

    @classmethod
    def for_devices(cls, config: ServerConfig, use_engines: bool = True) -> "WorkerPool":
        """One worker per device of ``config.device`` ("auto", "cpu", "cuda:0,cuda:1", ...)."""
        devices = resolve_devices(config.device)
        for device in set(devices):
            check_dtype(config.dtype, device)
            check_fp8(config.fp8, device)
        store = ModelStore(config.model_dir, config.upload_policy)
        builds = None
        if use_engines and config.build_missing:
            from dts_util.engines.manager import BackgroundBuilds

            builds = BackgroundBuilds(config.engine_dir)
        workers = [Worker(_worker_name(devices, index), device, config, store, use_engines, builds)
                   for index, device in enumerate(devices)]
        log.info("%d worker(s): %s", len(workers), ", ".join(worker.name for worker in workers))
        return cls(config, workers, store)

    def model_names(self) -> list[str]:
        return self.store.model_names()

    def describe_models(self) -> list:
        return self.workers[0].service.describe_models()

    def files_changed(self, path: Path) -> None:
        for worker in self.workers:
            worker.service.files_changed(path)

    def pick(self, model: str) -> Worker:
        """The worker that can start a request for ``model`` soonest."""
        name = model or self.default_model
        return min(self.workers, key=lambda worker: (worker.assigned, not worker.holds_model(name)))

    def check_room(self, model: str) -> None:
        """QueueFull when a request for ``model`` could not wait now: a protocol that must decode images itself
        before ``generate`` (the HTTP APIs' alpha masks) asks first, as ``generate`` does."""
        self.pick(model).queue.check_room()

    async def generate(self, request: GenerationRequest, *, streamed: bool = False,
                       on_update: UpdateCallback | None = None) -> GenerationOutput:
        worker = self.pick(request.model)
        worker.assigned += 1  # before the first await: concurrent requests see it
        try:
            return await worker.generate(request, streamed, on_update)
        finally:
            worker.assigned -= 1

    def prepare_store(self) -> None:
        from dts_util.atomic_files import sweep_partials

        self.store.sweep_temporary_files()
        swept = sweep_partials(self.config.engine_dir)  # files and exports of builds that were killed
        if swept:
            log.info("removed %d abandoned temporary file(s) from the engine dir", swept)
        first = self.workers[0].service
        first.ensure_default_model()
        first.model("")  # a default model that cannot be served stops start-up with one clear line

    def warm_up(self) -> None:
        """Every worker loads the default model's text encoders (and hashes its weights once), and with
        ``--torch-compile`` compiles its shapes, on its own generation thread; all workers at once."""
        for started in [worker.queue.start_before_serving(worker.service.warm_up) for worker in self.workers]:
            started.result()

    def close(self) -> None:
        for worker in self.workers:
            worker.close()


def _worker_name(devices: list[str], index: int) -> str:
    device = devices[index]
    return device if devices.count(device) == 1 else f"{device}-{devices[:index].count(device)}"
