"""A1111's /progress, /interrupt and /skip on a running job, and a vanished client freeing the device."""

from __future__ import annotations

import json
import socket
import threading
import time

import requests
import webuiapi

LONG = dict(prompt="a long job", seed=7, steps=150, width=64, height=64, cfg_scale=7, sampler_name="Euler")


def _wait_for(predicate, what: str, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _start(api: webuiapi.WebUIApi, **fields) -> dict:
    result: dict = {}

    def run() -> None:
        result["value"] = api.txt2img(**fields)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    result["thread"] = thread
    return result


def test_progress_with_preview_then_interrupt(http_server) -> None:
    api = webuiapi.WebUIApi(host="127.0.0.1", port=http_server.http_port)
    api.set_options({"show_progress_every_n_steps": 1})
    try:
        started = time.monotonic()
        job = _start(api, **LONG, n_iter=2)
        report = _wait_for(lambda: (p := api.get_progress())["state"]["sampling_step"] >= 2 and p["current_image"]
                           and p, "sampling with a preview")
        state = report["state"]
        assert state["job"] == "scripts_txt2img" and state["job_count"] == 2 and state["job_no"] == 0
        assert state["sampling_steps"] == 150 and 0 < report["progress"] < 0.6 and report["eta_relative"] > 0
        assert api.get_progress()["current_image"]  # a PNG of the latents, base64
        assert requests.get(f"{http_server.http}/sdapi/v1/progress?skip_current_image=true").json()[
            "current_image"] is None
        api.interrupt()
        job["thread"].join(60)
        result = job["value"]
        assert result.images == [] and result.info["interrupted"] is True  # A1111 answers 200 with what it has
        assert time.monotonic() - started < 60
        idle = api.get_progress()
        assert idle["state"]["job_count"] == 0 and idle["progress"] == 0
    finally:
        api.set_options({"show_progress_every_n_steps": 10})


def test_skip_ends_the_current_pass_only(http_server) -> None:
    api = webuiapi.WebUIApi(host="127.0.0.1", port=http_server.http_port)
    job = _start(api, **dict(LONG, steps=60), n_iter=2)
    _wait_for(lambda: api.get_progress()["state"]["sampling_step"] >= 1, "the first pass sampling")
    api.skip()
    job["thread"].join(120)
    result = job["value"]
    assert len(result.images) == 1 and result.info["all_seeds"] == [8]  # the second pass's image, seed + 1
    assert any("skipped" in note for note in result.info["notes"])


def test_a_vanished_client_frees_the_device(http_server) -> None:
    body = json.dumps(dict(LONG, steps=150)).encode()
    with socket.create_connection(("127.0.0.1", http_server.http_port)) as sock:
        sock.sendall(b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        _wait_for(lambda: http_server.queue.pending == 1, "the job to queue")
        time.sleep(0.5)
    left = time.monotonic()
    _wait_for(lambda: http_server.queue.pending == 0, "the device to be free", timeout=30)
    assert time.monotonic() - left < 10  # stopped at a step, not after 150 of them
