"""One generation at a time per device, behind a bounded queue.

Generations are heavy and a device runs one well at a time, so each worker's run
one after the other on that worker's own thread, while the event loop stays free for Echo and FilesExist.
When ``max_waiting`` requests already wait, a new one is refused at once
(RESOURCE_EXHAUSTED) instead of piling up. A client that cancels, or whose
deadline passes, sets its stop flag; the running generation stops at the next step.
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, TypeVar

from dts_util.errors import QueueFull
from dts_util.metrics import STAGE_SECONDS, set_queue_depth

T = TypeVar("T")


class GenerationQueue:
    """Runs blocking jobs one at a time on a worker thread.

    Args:
        max_waiting: jobs allowed to wait while one runs; more are refused with QueueFull.
        name: the worker's name, for metrics and thread names.
        thread_initializer: run once on the job thread first (e.g. to make its CUDA device current).
    """

    def __init__(self, max_waiting: int, name: str = "default",
                 thread_initializer: Callable[[], None] | None = None) -> None:
        self.max_waiting, self.name = max_waiting, name
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"generation-{name}",
                                            initializer=thread_initializer)
        self._lock = asyncio.Lock()
        self._pending = 0  # waiting + running

    @property
    def pending(self) -> int:
        return self._pending

    def check_room(self) -> None:
        """QueueFull when no more generations may wait: checked before a request's images are even decoded."""
        if self._pending > self.max_waiting:
            raise QueueFull(f"{self._pending} generations are already queued or running (limit "
                            f"{self.max_waiting} waiting); retry later")

    async def run(self, job: Callable[[], T], stop: threading.Event) -> T:
        """Run ``job`` when the device is free. On cancellation, set ``stop`` and wait for the job to end."""
        self.check_room()
        self._pending += 1
        set_queue_depth(self._pending, self.name)
        queued = time.perf_counter()
        try:
            async with self._lock:
                STAGE_SECONDS.labels("queue_wait").observe(time.perf_counter() - queued)
                future = asyncio.get_running_loop().run_in_executor(self._executor, job)
                # A call cancelled twice stops waiting below before the job ends: its GenerationCancelled is then
                # seen here, not logged as "never retrieved".
                future.add_done_callback(lambda done: done.cancelled() or done.exception())
                try:
                    return await asyncio.shield(future)
                except asyncio.CancelledError:
                    # Keep holding the device until the job notices the flag, so two
                    # generations never overlap on it.
                    stop.set()
                    await asyncio.wait([future])
                    if not future.cancelled():
                        future.exception()  # the job's GenerationCancelled: expected, not worth a traceback
                    raise
        finally:
            self._pending -= 1
            set_queue_depth(self._pending, self.name)

    def start_before_serving(self, job: Callable[[], T]) -> Future:
        """Start ``job`` on the generation thread (warm-up: compiled graphs and CUDA graphs belong to
        the thread that made them)."""
        return self._executor.submit(job)

    def shutdown(self, wait: bool = False) -> None:
        """Drop waiting jobs; with ``wait``, also wait for the running one to end."""
        self._executor.shutdown(wait=wait, cancel_futures=True)
