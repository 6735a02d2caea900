"""Serving-side engine selection: the engine that exactly matches a request, or why none does.

For each (model, component, shape) the manager looks the registry up, skips
engines that are stale for this machine (with one warning each), loads the best
usable one (tensorrt before onnxruntime) and keeps a few runners resident. A
corrupt engine file is logged and skipped, never fatal. With ``build_missing``,
shapes that had no engine are queued for a background build, and the registry
picks the result up on a later request.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections import OrderedDict
from pathlib import Path

from dts_util.engines.backends import BACKENDS, available_backend_versions, get_backend
from dts_util.engines.backends.base import Runner
from dts_util.engines.device import device_fingerprint, device_info
from dts_util.engines.registry import EngineRecord, EngineRegistry
from dts_util.atomic_files import write_text_atomic
from dts_util.metrics import observe_background_build
from dts_util.models.loader import LoadedModel
from dts_util.boundary import TOKENS_PER_CHUNK, Shape

log = logging.getLogger(__name__)
PREFERENCE = {name: rank for rank, name in enumerate(BACKENDS)}  # the table's order
PRECISION_PREFERENCE = {"fp16": 0, "bf16": 1, "fp32": 2}


class EngineManager:
    """Finds, loads and caches engine runners for requests.

    Args:
        engine_dir: the engine cache root.
        build_missing: queue background builds for shapes that had no engine.
        max_resident: runners kept loaded per component (each holds its own weights).
        builds: a background builder shared with other workers' managers (overrides ``build_missing``).
    """

    def __init__(self, engine_dir: Path, build_missing: bool = False, max_resident: int = 2,
                 builds: "BackgroundBuilds | None" = None) -> None:
        self.registry = EngineRegistry(engine_dir)
        self.engine_dir = Path(engine_dir)
        self.max_resident = max_resident
        self._runners: OrderedDict[Path, Runner] = OrderedDict()
        self._broken: dict[Path, tuple[int, str]] = {}
        self._versions: dict[str, str] | None = None
        self._lock = threading.RLock()
        self.builds = builds or (BackgroundBuilds(engine_dir) if build_missing else None)

    def backend_versions(self) -> dict[str, str]:
        """Backends that can run here, with their versions (probed once)."""
        if self._versions is None:
            self._versions = available_backend_versions()
        return self._versions

    def runner_for(self, model: LoadedModel, component: str, shape: Shape) -> tuple[Runner | None, str]:
        """(runner, "") for a usable engine, else (None, why the component runs eagerly)."""
        with self._lock:
            usable, reasons = self._usable(model, component, shape)
            for record in usable:
                runner = self._load(record, model.device)
                if runner is not None:
                    return runner, ""
                reasons.append(f"engine {record.engine_path.name} unreadable")
        reason = "; ".join(dict.fromkeys(reasons)) or f"no engine for {shape.describe(model.info.vae_scale_factor)}"
        if self.builds is not None:
            why_not = self.builds.why_not(model, component, shape)
            reason += f"; {why_not}" if why_not else "; background build queued"
        return None, reason

    def _usable(self, model: LoadedModel, component: str, shape: Shape) -> tuple[list[EngineRecord], list[str]]:
        device_fp = device_fingerprint(device_info(model.device))
        usable, reasons = [], []
        for record in self.registry.matching(model.name, component, shape):
            why = EngineRegistry.unusable_reason(record, model.fingerprint, device_fp, self.backend_versions())
            if why is None:
                usable.append(record)
            else:
                self.registry.warn_once(record.manifest_path, f"engine ignored: {why}")
                reasons.append(f"{record.backend} engine stale: {why}")
        # The fastest first: backends in the table's order, then lower precision (each engine passed its
        # precision's validation when it was built).
        usable.sort(key=lambda r: (PREFERENCE.get(r.backend, len(PREFERENCE)),
                                   PRECISION_PREFERENCE.get(r.precision, len(PRECISION_PREFERENCE))))
        if usable:
            reasons.clear()
        return usable, reasons

    def _load(self, record: EngineRecord, device: str) -> Runner | None:
        path = record.engine_path
        if path in self._runners:
            self._runners.move_to_end(path)
            return self._runners[path]
        try:
            stamp = path.stat().st_mtime_ns
        except OSError:  # removed since the registry looked (engines rm, a rebuild)
            return None
        if self._broken.get(path, (None,))[0] == stamp:
            return None
        try:
            runner = get_backend(record.backend).load(path, record.input_shapes, record.output_name,
                                                      device=device).activate()
        except Exception as exc:  # corrupt or foreign file: skip it, keep serving
            self._broken[path] = (stamp, str(exc))
            log.error("engine %s could not be loaded and is skipped: %s", path, exc)
            return None
        self._runners[path] = runner
        self._evict(record.component)
        log.info("loaded %s engine %s", record.backend, path.name)
        return runner

    def _evict(self, component: str) -> None:
        same = [p for p in self._runners if p.name.startswith(f"{component}-")]
        for path in same[:-self.max_resident]:
            self._runners.pop(path).deactivate()

    def close(self) -> None:
        with self._lock:
            for runner in self._runners.values():
                runner.deactivate()
            self._runners.clear()
        if self.builds is not None:
            self.builds.stop()


# On-demand builds are bounded: how many may wait, how large a shape may be built unasked, and how long a failed
# shape waits before it is tried again (doubling each time).
MAX_QUEUED_BUILDS = 8
MAX_BUILD_PIXELS = 1024 * 1024
RETRY_AFTER_SECONDS = 300.0
MAX_RETRY_AFTER_SECONDS = 6 * 3600.0


_OUTCOMES = (("too large", "too_large"), ("background build already", "already_queued"),
             ("background build failed", "backing_off"), ("background build queue full", "queue_full"))


FAILURE_SUFFIX = ".failed.json"


def failure_record_path(engine_path: Path) -> Path:
    """Where a failed background build of ``engine_path`` is recorded (removed when a build succeeds)."""
    return engine_path.with_name(engine_path.name + FAILURE_SUFFIX)


def failed_builds(engine_dir: Path) -> list[dict]:
    """Every recorded failed background build under ``engine_dir`` (unreadable records are skipped)."""
    found = []
    for path in sorted(Path(engine_dir).rglob(f"*{FAILURE_SUFFIX}")):
        try:
            found.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    return found


class BackgroundBuilds:
    """A worker thread that builds engines for shapes requests needed but had none.

    Bounded: at most ``max_queued`` builds wait; shapes over ``max_pixels`` (width x height x batch) are not
    built on demand (``build-engines`` builds them); a build that failed is retried after a back-off that
    doubles each time. A model with LoRAs gets engines of that LoRA set, never base engines it cannot use.
    """

    def __init__(self, engine_dir: Path, max_queued: int = MAX_QUEUED_BUILDS, max_pixels: int = MAX_BUILD_PIXELS,
                 retry_after: float = RETRY_AFTER_SECONDS) -> None:
        self.engine_dir = engine_dir
        self.max_queued, self.max_pixels, self.retry_after = max_queued, max_pixels, retry_after
        self._queue: queue.Queue = queue.Queue()
        self._requested: set[tuple] = set()
        self._failures: dict[tuple, tuple[int, float]] = {}  # key -> (failed attempts, when to try again)
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._work, name="engine-builds", daemon=True)
        self._thread.start()

    def request(self, model: LoadedModel, component: str, shape: Shape) -> bool:
        """Queue a build once per (model weights, component, shape); True if newly queued."""
        return self.why_not(model, component, shape) == ""

    def why_not(self, model: LoadedModel, component: str, shape: Shape) -> str:
        """Queue the build and return "", or say why it was not queued (counted in the metrics)."""
        reason = self._queue_build(model, component, shape)
        outcome = "queued" if not reason else next(
            (label for words, label in _OUTCOMES if reason.startswith(words)), "other")
        if outcome != "already_queued":
            observe_background_build(outcome)
        return reason

    def _queue_build(self, model: LoadedModel, component: str, shape: Shape) -> str:
        key = (model.name, model.fingerprint, model.device, component, shape)
        scale = model.info.vae_scale_factor
        pixels = shape.latent_width * scale * shape.latent_height * scale * shape.batch
        if pixels > self.max_pixels:
            return "too large for a background build (build it with build-engines)"
        with self._lock:  # workers on several devices may ask for the same shape at once
            if key in self._requested:
                return "background build already queued"
            attempts, retry_at = self._failures.get(key, (0, 0.0))
            if time.monotonic() < retry_at:
                return f"background build failed {attempts}x, retried in {retry_at - time.monotonic():.0f} s"
            if self._queue.qsize() >= self.max_queued:
                return "background build queue full"
            self._requested.add(key)
        self._queue.put((key, model, component, shape))
        return ""

    def _work(self) -> None:
        while (item := self._queue.get()) is not None:
            key, model, component, shape = item
            try:
                self._build(model, component, shape)
                observe_background_build("built")
                with self._lock:
                    self._failures.pop(key, None)
            except Exception:
                observe_background_build("failed")
                log.exception("background build of %s %s failed", component, shape.describe())
                with self._lock:
                    attempts = self._failures.get(key, (0, 0.0))[0] + 1
                    delay = min(self.retry_after * 2 ** (attempts - 1), MAX_RETRY_AFTER_SECONDS)
                    self._failures[key] = (attempts, time.monotonic() + delay)
            finally:
                with self._lock:
                    self._requested.discard(key)
                self._queue.task_done()

    def _build(self, model: LoadedModel, component: str, shape: Shape) -> None:
        from dts_util.engines.builder import build, plan
        from dts_util.models.loader import load_model

        # Exports need fp32 weights on the CPU; a CPU server's model already is that. A GPU server's is loaded
        # again on the CPU, with the same LoRAs fused, so the engine serves the request that asked for it.
        source = model if model.device == "cpu" else \
            load_model(model.name, model.info.path, "cpu").with_loras(model.loras)
        scale = model.info.vae_scale_factor
        # cfg="no-cfg" makes the planned UNet batch exactly the requested one.
        jobs = plan(source, self.engine_dir, [(shape.latent_width * scale, shape.latent_height * scale)],
                    [shape.batch], components=(component,), cfg="no-cfg",
                    device=model.device if model.device.startswith("cuda") else None,
                    prompt_chunks=(max(1, shape.text_length // TOKENS_PER_CHUNK),))
        for job in jobs:
            result = build(job, source, self.engine_dir)
            failure = failure_record_path(job.paths.engine)
            if result.status == "failed":
                # Kept beside the engines so `dts-util engines list` shows it after the server's log has scrolled.
                failure.parent.mkdir(parents=True, exist_ok=True)
                write_text_atomic(failure, json.dumps({"model": model.name, "component": component,
                                                       "label": job.label, "error": result.error[:2000],
                                                       "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}))
                raise RuntimeError(result.error)
            failure.unlink(missing_ok=True)

    def wait(self) -> None:
        """Block until every queued build finished (tests, shutdown)."""
        self._queue.join()

    def stop(self) -> None:
        self._queue.put(None)
