#!/usr/bin/env python3
"""Soak one server with mixed traffic for minutes and report what leaked, if anything.

    python tools/bench_soak.py --seconds 180          # starts its own server on the built-in model

Against one `dts-util serve` (started here on a fresh store, or --target host:port of a running one),
several client loops run at once until --seconds pass: small txt2img and img2img generations, streamed
generations cancelled mid-way, uploads (and re-uploads of the same bytes), and bursts of Echo calls.
A separate loop measures Echo latency throughout. It prints requests per minute by kind and outcome,
Echo p50/p99 under load, and the server's resident memory and open file descriptors at the start (after
a warm-up round) and at the end: flat numbers mean nothing is leaking.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import io
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))

from dts_util.grpc.proto import image_generation_pb2 as pb  # noqa: E402
from dts_util.grpc.proto import image_generation_pb2_grpc as pb_grpc  # noqa: E402

OPTIONS = [("grpc.max_receive_message_length", 64 * 1024 * 1024)]


def process_stats(pid: int) -> dict[str, float]:
    """Resident memory (MB) and open file descriptors of ``pid``, from /proc."""
    rss = 0.0
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) / 1024
    return {"rss_mb": rss, "fds": len(os.listdir(f"/proc/{pid}/fd"))}


def png(seed: int) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.effect_noise((64, 64), 60 + seed % 40).convert("RGB").save(buffer, "PNG")
    return buffer.getvalue()


class Soak:
    def __init__(self, stub: pb_grpc.ImageGenerationServiceStub, until: float, seed: int) -> None:
        self.stub, self.until, self.rng = stub, until, random.Random(seed)
        self.outcomes: collections.Counter = collections.Counter()
        self.echo_ms: list[float] = []

    def running(self) -> bool:
        return time.monotonic() < self.until

    async def _call(self, kind: str, call) -> None:
        try:
            await call
            self.outcomes[(kind, "OK")] += 1
        except grpc.RpcError as exc:
            self.outcomes[(kind, exc.code().name)] += 1

    async def generations(self) -> None:
        while self.running():
            seed = self.rng.randrange(1 << 30)
            fields = dict(prompt="a lighthouse", seed=seed, steps=4, width=64, height=64)
            if self.rng.random() < 0.4:
                fields.update(init_image=png(seed), denoising_strength=0.6)
            await self._call("img2img" if "init_image" in fields else "txt2img",
                             self.stub.GenerateImage(pb.ImageGenerationRequest(**fields), timeout=120))

    async def cancels(self) -> None:
        while self.running():
            call = self.stub.GenerateImageStream(pb.ImageGenerationRequest(prompt="x", steps=40, width=128,
                                                                           height=128), timeout=120)
            try:
                async for update in call:
                    if update.event and json.loads(update.event).get("step", 0) >= 2:
                        call.cancel()
                        break
                self.outcomes[("stream cancelled at step 2", "OK")] += 1
            except (grpc.RpcError, asyncio.CancelledError):
                self.outcomes[("stream cancelled at step 2", "CANCELLED")] += 1

    async def uploads(self) -> None:
        index = 0
        while self.running():
            data = self.rng.randbytes(256 * 1024)
            name = f"soak/file-{index % 20}.bin"
            index += 1
            messages = [pb.UploadFileRequest(filename=name, overwrite=True), pb.UploadFileRequest(data=data)]
            await self._call("upload", self.stub.UploadFile(iter(messages), timeout=60))
            await asyncio.sleep(0.2)

    async def echo_bursts(self) -> None:
        while self.running():
            await asyncio.gather(*(self._call("echo burst", self.stub.Echo(pb.EchoRequest(), timeout=60))
                                   for _ in range(200)))
            await asyncio.sleep(1)

    async def echo_latency(self) -> None:
        while self.running():
            start = time.perf_counter()
            await self._call("echo probe", self.stub.Echo(pb.EchoRequest(), timeout=60))
            self.echo_ms.append((time.perf_counter() - start) * 1000)
            await asyncio.sleep(0.25)


async def soak(target: str, seconds: float, seed: int) -> Soak:
    async with grpc.aio.insecure_channel(target, options=OPTIONS) as channel:
        stub = pb_grpc.ImageGenerationServiceStub(channel)
        run = Soak(stub, time.monotonic() + seconds, seed)
        await asyncio.gather(run.generations(), run.generations(), run.cancels(), run.uploads(), run.echo_bursts(),
                             run.echo_latency())
        return run


def start_server(port: int, store: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "dts_util", "serve", "--port", str(port), "--model-path", str(store),
               "--engine-dir", str(store.parent / "engines"), "--max-upload-bytes", str(64 * 1024 * 1024)]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    server = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(300):
        try:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                pb_grpc.ImageGenerationServiceStub(channel).Echo(pb.EchoRequest(), timeout=1)
            return server
        except grpc.RpcError:
            time.sleep(1)
    server.kill()
    raise SystemExit("the server did not start")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=180.0)
    parser.add_argument("--port", type=int, default=7871)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        server = start_server(args.port, Path(folder) / "models")
        target = f"127.0.0.1:{args.port}"
        try:
            asyncio.run(soak(target, 10, args.seed))  # warm-up: every path once, then measure from here
            before = process_stats(server.pid)
            run = asyncio.run(soak(target, args.seconds, args.seed + 1))
            after = process_stats(server.pid)
        finally:
            server.terminate()
            server.wait(30)
    minutes = args.seconds / 60
    print(f"\nsoak of {args.seconds:.0f} s against one server (built-in model, 64x64 and 128x128), "
          f"{os.cpu_count()} CPU cores")
    print("| requests | outcome | count | per minute |\n|---|---|---:|---:|")
    for (kind, outcome), count in sorted(run.outcomes.items()):
        print(f"| {kind} | {outcome} | {count} | {count / minutes:.0f} |")
    echo = sorted(run.echo_ms)
    p99 = echo[min(len(echo) - 1, int(len(echo) * 0.99))]
    print(f"\nEcho latency under load: p50 {statistics.median(echo):.1f} ms, p99 {p99:.1f} ms ({len(echo)} probes)")
    print(f"server RSS {before['rss_mb']:.0f} MB -> {after['rss_mb']:.0f} MB; open file descriptors "
          f"{before['fds']} -> {after['fds']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
