"""The Prometheus endpoint: requests by RPC and status, stage latencies, queue depth, backends used."""

from __future__ import annotations

import socket
import urllib.request

import grpc
import pytest

from dts_util.metrics import serve_metrics


@pytest.fixture(scope="module")
def metrics_url() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    serve_metrics(port, "127.0.0.1")
    return f"http://127.0.0.1:{port}/metrics"


def _scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()


def _value(text: str, prefix: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix))


def test_requests_stages_and_backends_are_counted(metrics_url, client) -> None:
    before = _scrape(metrics_url)
    client.generate(prompt="x", steps=3, width=64, height=64, seed=1)
    with pytest.raises(grpc.RpcError):
        client.generate(prompt="x", width=100)
    after = _scrape(metrics_url)
    ok = 'dts_requests_total{rpc="GenerateImage",status="OK"}'
    bad = 'dts_requests_total{rpc="GenerateImage",status="INVALID_ARGUMENT"}'
    assert _value(after, ok) == _value(before, ok) + 1 and _value(after, bad) == _value(before, bad) + 1
    for stage in ("queue_wait", "text_encode", "sampling", "decode", "encode"):
        assert _value(after, f'dts_generation_stage_seconds_count{{stage="{stage}"}}') >= 1
    assert _value(after, 'dts_component_runs_total{backend="eager",component="unet",reason="none"}') >= 1
    assert "dts_queue_depth" in after and "dts_sampling_steps_per_second" in after
    assert _value(after, 'dts_request_seconds_count{rpc="GenerateImage"}') >= 2


def test_the_vae_encoder_of_img2img_is_counted(metrics_url, client) -> None:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), "white").save(buffer, "PNG")
    encoder_runs = 'dts_component_runs_total{backend="eager",component="vae_encoder",reason="none"}'
    before = _value(_scrape(metrics_url), encoder_runs)
    client.generate(prompt="x", steps=2, seed=1, init_image=buffer.getvalue())
    after = _scrape(metrics_url)
    assert _value(after, encoder_runs) == before + 1
    assert _value(after, 'dts_generation_stage_seconds_count{stage="vae_encode"}') >= 1


def test_serve_exposes_metrics(model_store, tmp_path) -> None:
    import os
    import subprocess
    import sys
    import time

    ports = []
    for _ in range(2):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            ports.append(probe.getsockname()[1])
    server = subprocess.Popen([sys.executable, "-m", "dts_util", "serve", "--port", str(ports[0]), "--metrics-port",
                               str(ports[1]), "--model-path", str(model_store.root), "--engine-dir",
                               str(tmp_path / "engines")], stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "DTS_AUTH_TOKEN": ""})
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                text = _scrape(f"http://127.0.0.1:{ports[1]}/metrics")
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, "the server did not start"
                time.sleep(0.5)
        assert "dts_requests_total" in text
    finally:
        server.terminate()
        server.wait(30)
