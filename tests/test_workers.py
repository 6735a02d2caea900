"""One worker per device: the pool runs generations on several workers at once and picks the free one."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import replace

import pytest

from dts_util.config import resolve_devices
from dts_util.errors import StartupError
from tests.conftest import ServerThread


@pytest.fixture(scope="module")
def two_worker_server(base_config):
    with ServerThread(replace(base_config, device="cpu,cpu")) as running:
        yield running


def test_two_cpu_workers_run_two_generations_at_once(two_worker_server) -> None:
    pool = two_worker_server.pool
    assert [worker.name for worker in pool.workers] == ["cpu-0", "cpu-1"]
    spans: dict[int, list[float]] = {}
    infos: dict[int, dict] = {}

    def run(index: int) -> None:
        def on_event(event: dict, preview: bytes) -> None:
            if event.get("event") == "sampling":
                spans[index].append(time.monotonic())

        spans[index] = []
        with two_worker_server.client() as client:
            _, info = client.generate_stream(on_event=on_event, prompt=f"tower {index}", seed=index, steps=12,
                                             width=128, height=128)
        infos[index] = json.loads(info)

    threads = [threading.Thread(target=run, args=(index,)) for index in (0, 1)]
    for thread in threads:
        thread.start()
    seen_both_running = False
    while any(thread.is_alive() for thread in threads):
        seen_both_running |= all(worker.queue.pending == 1 for worker in pool.workers)
        time.sleep(0.005)
    for thread in threads:
        thread.join()
    assert seen_both_running
    assert {infos[0]["worker"], infos[1]["worker"]} == {"cpu-0", "cpu-1"}
    (first_a, last_a), (first_b, last_b) = (spans[0][0], spans[0][-1]), (spans[1][0], spans[1][-1])
    assert first_a < last_b and first_b < last_a, "the sampling steps of the two requests did not overlap"


def test_the_pool_sends_a_request_to_the_idle_worker(two_worker_server) -> None:
    pool = two_worker_server.pool
    busy, idle = pool.workers
    busy.assigned += 1
    try:
        assert pool.pick("") is idle
    finally:
        busy.assigned -= 1
    # Equally free: the worker that already holds the model wins, even when it is not the first one.
    first, second = pool.workers
    with first.service._lock:
        if "builtin-tiny-sd" in first.service._models:
            first.service._drop("builtin-tiny-sd")
    second.service.model("builtin-tiny-sd")
    assert not first.holds_model("builtin-tiny-sd") and second.holds_model("builtin-tiny-sd")
    assert pool.pick("builtin-tiny-sd") is second


@pytest.mark.parametrize("spec, expected", [("cpu", ["cpu"]), ("cpu, cpu", ["cpu", "cpu"])])
def test_device_lists(spec: str, expected: list[str]) -> None:
    assert resolve_devices(spec) == expected


def test_auto_is_every_gpu_or_the_cpu() -> None:
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    assert resolve_devices("auto") == ([f"cuda:{index}" for index in range(gpus)] or ["cpu"])


@pytest.mark.parametrize("spec, words", [("gpu", "not a device"), ("", "give auto"), ("cuda:99", "CUDA"),
                                         (",".join(["cpu"] * 17), "1 to 16")])
def test_bad_device_lists_say_what_to_write(spec: str, words: str) -> None:
    with pytest.raises(StartupError, match=words):
        resolve_devices(spec)


def test_fp8_is_refused_where_there_are_no_fp8_tensor_cores(base_config) -> None:
    from dataclasses import replace

    from dts_util.config import check_fp8
    from dts_util.workers import WorkerPool

    check_fp8(False, "cpu")  # off: nothing to check
    with pytest.raises(StartupError, match="--fp8 needs a CUDA GPU with fp8 tensor cores"):
        WorkerPool.for_devices(replace(base_config, fp8=True), use_engines=False)
