#!/usr/bin/env python3
"""How long a gRPC client waits against how long the pipeline itself worked, in one run.

    python tools/bench_server.py                 # built-in model, 512x512 and 1024x1024, 5 runs each
    python tools/bench_server.py --model-dir M --model bench-sd15-arch --device cuda --engine-dir E \
        --sizes 512 --json out.json              # what tools/device_check.sh runs on a GPU

A real server (the same start-up as ``dts-util serve``) runs in this process on a free
port; a real client calls it over loopback. For each size it prints the median time the
client waited, the median time the pipeline spent (text encoding, sampling, decoding and
image encoding, from ``info``), and the difference as the server's overhead: queueing,
gRPC, serialization and transfer.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path


def start(model_dir: Path, engine_dir: Path, model: str = "", device: str = "cpu", engines: bool = False):
    from dts_util.config import BUILTIN_MODEL_NAME, ServerConfig
    from dts_util.grpc.bootstrap import start_server
    from dts_util.workers import WorkerPool

    config = ServerConfig(model_dir=model_dir, engine_dir=engine_dir, port=0, device=device,
                          default_model=model or BUILTIN_MODEL_NAME)
    service = WorkerPool.for_devices(config, use_engines=engines)
    service.prepare_store()
    loop = asyncio.new_event_loop()
    ready: dict = {}

    def run() -> None:
        async def boot() -> None:
            ready["server"] = await start_server(config, service)
            await asyncio.to_thread(service.warm_up)

        loop.run_until_complete(boot())
        ready["done"] = True
        loop.run_forever()

    threading.Thread(target=run, daemon=True).start()
    while "done" not in ready:
        time.sleep(0.05)
    return ready["server"].port


def measure(client, size: int, runs: int, stream: bool, steps: int) -> tuple[float, float, dict]:
    """Median client wait and pipeline time in ms, and the last run's backends."""
    waits, work = [], []
    request = dict(prompt="a lighthouse on a cliff", seed=1, width=size, height=size, steps=steps)
    info: dict = {}
    for index in range(runs + 1):
        start = time.perf_counter()
        if stream:
            _, info_text = client.generate_stream(**request)
        else:
            info_text = client.generate(**request).info
        waited = time.perf_counter() - start
        info = json.loads(info_text)
        timings = info["timings_ms"]
        if index:  # the first run warms caches and loads components
            waits.append(waited * 1000)
            work.append(timings["total"] + timings.get("encode_ms", 0.0))
    return statistics.median(waits), statistics.median(work), info.get("backends", {})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="512,1024")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--model-dir", help="model store [default: a temporary one with the built-in model]")
    parser.add_argument("--model", default="", help="model to serve [default: the built-in model]")
    parser.add_argument("--device", default="cpu", help="serve --devices value (cpu, cuda, ...)")
    parser.add_argument("--engine-dir", help="serve the engines in this folder [default: none, eager only]")
    parser.add_argument("--stream-only", action="store_true", help="time GenerateImageStream only")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args()

    from dts_util.client import Client
    from dts_util.engines.device import device_info

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(args.model_dir or Path(tmp) / "models")
        port = start(model_dir, Path(args.engine_dir or Path(tmp) / "engines"), args.model, args.device,
                     engines=args.engine_dir is not None)
        if args.device.startswith("cuda"):
            import torch

            where = f"on {torch.cuda.get_device_name(0)}"
        else:
            cpu = device_info("cpu")
            where = f"on the CPU: {os.cpu_count()} cores, {cpu['name']} ({', '.join(cpu['isa'])})"
        print(f"{args.model or 'built-in model'}, {args.steps} steps, {where}")
        print("| size | RPC | backends | client waited ms | pipeline ms | server overhead ms | overhead % |")
        print("|---|---|---|---:|---:|---:|---:|")
        with Client(f"127.0.0.1:{port}", 600) as client:
            for size in (int(s) for s in args.sizes.split(",")):
                for stream in (True,) if args.stream_only else (False, True):
                    waited, worked, backends = measure(client, size, args.runs, stream, args.steps)
                    overhead = waited - worked
                    rpc = "GenerateImageStream" if stream else "GenerateImage"
                    used = " ".join(f"{k}={v}" for k, v in backends.items())
                    print(f"| {size}x{size} | {rpc} | {used} | {waited:.1f} | {worked:.1f} | {overhead:.1f} "
                          f"| {100 * overhead / waited:.2f} |")
                    rows.append(dict(size=size, rpc=rpc, backends=backends, client_ms=waited, pipeline_ms=worked,
                                     steps=args.steps, device=args.device))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
