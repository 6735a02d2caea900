"""Prometheus metrics (``serve --metrics-port``): what an operator needs to see the server work.

Requests by RPC and status, request latency, time per generation stage (queue wait, text
encoding, VAE encoding of img2img/inpainting inputs, sampling, decoding, image encoding),
queue depth, sampling steps per second, and which backend ran each component (engine hits, eager fallbacks by reason). The metrics
live in the process-wide registry and cost a few dictionary updates per request when no
one scrapes them.
"""

from __future__ import annotations

import re

from prometheus_client import Counter, Gauge, Histogram, start_http_server

_LATENCY_BUCKETS = (0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

REQUESTS = Counter("dts_requests_total", "RPCs answered, by method and status code", ["rpc", "status"])
REQUEST_SECONDS = Histogram("dts_request_seconds", "Time to answer an RPC", ["rpc"], buckets=_LATENCY_BUCKETS)
STAGE_SECONDS = Histogram("dts_generation_stage_seconds", "Time per generation stage", ["stage"],
                          buckets=_LATENCY_BUCKETS)
QUEUE_DEPTH = Gauge("dts_queue_depth", "Generations waiting or running", ["worker"])
STEPS_PER_SECOND = Gauge("dts_sampling_steps_per_second", "Sampling speed of the last generation", ["worker"])
COMPONENT_RUNS = Counter("dts_component_runs_total", "Generations by the backend that ran each component",
                         ["component", "backend", "reason"])

STAGES = {"queue_wait_ms": "queue_wait", "text_encode_ms": "text_encode", "vae_encode_ms": "vae_encode",
          "sampling_ms": "sampling",
          "second_pass_sampling_ms": "second_pass_sampling", "decode_ms": "decode", "encode_ms": "encode"}


BACKGROUND_BUILDS = Counter("dts_background_builds_total", "On-demand engine builds (--build-missing) by outcome: "
                            "built, failed, or why one was not queued", ["outcome"])


def observe_background_build(outcome: str) -> None:
    BACKGROUND_BUILDS.labels(outcome).inc()


def serve_metrics(port: int, address: str) -> None:
    """Expose /metrics over HTTP (plain, unauthenticated: keep it on loopback or a private network)."""
    start_http_server(port, addr=address)


def observe_request(rpc: str, status: str, seconds: float) -> None:
    REQUESTS.labels(rpc, status).inc()
    REQUEST_SECONDS.labels(rpc).observe(seconds)


def observe_generation(timings_ms: dict[str, float], steps: int, backends: dict[str, str],
                       worker: str = "default") -> None:
    for key, stage in STAGES.items():
        if key in timings_ms:
            STAGE_SECONDS.labels(stage).observe(timings_ms[key] / 1000)
    sampling = timings_ms.get("sampling_ms", 0.0) + timings_ms.get("second_pass_sampling_ms", 0.0)
    if sampling > 0:
        STEPS_PER_SECOND.labels(worker).set(steps / (sampling / 1000))
    for component, described in backends.items():
        backend, _, reason = described.partition(" (")
        COMPONENT_RUNS.labels(component, backend, _reason_kind(reason.rstrip(")"))).inc()


def _reason_kind(reason: str) -> str:
    """A short label for why a component ran eagerly (shape details would explode the label space)."""
    if not reason:
        return "none"
    for kind in ("LoRA", "stale", "unreadable", "no engine"):
        if kind in reason:
            return re.sub(r"\W+", "_", kind.lower())
    return "other"


def set_queue_depth(depth: int, worker: str = "default") -> None:
    QUEUE_DEPTH.labels(worker).set(depth)
