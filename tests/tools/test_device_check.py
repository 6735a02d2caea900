"""tools/device_check.sh must never rot: its dry run executes every step of the GPU check on the CPU, as a smoke
run (the compiled path and AOTInductor have CPU tests of their own)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_the_gpu_check_dry_run_executes_every_step(tmp_path: Path) -> None:
    env = {**os.environ, "OUT": str(tmp_path), "DTS_PYTHON": sys.executable}
    for inherited in ("DTS_GPU_DRY_RUN", "TORCHINDUCTOR_CACHE_DIR"):  # as on a fresh machine
        env.pop(inherited, None)
    result = subprocess.run(["bash", "tools/device_check.sh", "--dry-run"], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=900)
    report = (tmp_path / "device_check.md").read_text()
    assert result.returncode == 0, report + result.stdout[-3000:]
    assert "failed steps: none" in report and "2 passed, 2 deselected" in report
    engines = json.loads((tmp_path / "bench_engines.json").read_text())
    rows = {row["backend"]: row for row in engines["rows"]}
    assert {"eager", "onnxruntime"} <= set(rows) and all("error" not in r for r in rows.values())
    grpc_rows = json.loads((tmp_path / "bench_grpc.json").read_text())
    assert grpc_rows[0]["backends"]["unet"] == "onnxruntime" and grpc_rows[0]["client_ms"] > 0
    flux = {row["variant"]: row for row in json.loads((tmp_path / "bench_flux.json").read_text())["rows"]}
    assert flux["eager bf16"]["step_ms"] > 0 and flux["torch.compile bf16"]["pixel_max_diff"] <= 255
    assert flux["fp8 (torchao)"]["skipped"] == "fp8 matmuls need a CUDA GPU"


def test_the_dit_step_runs_for_zimage_and_klein() -> None:
    """``device_check.sh --dit``'s step (bench_flux_step.py --arch zimage / flux2-klein) at toy sizes, in-process."""
    import argparse

    from tests.tools import load_tool

    bench = load_tool("bench_flux_step")
    for arch, named in (("zimage", "Z-Image"), ("flux2-klein", "FLUX.2 [klein] 4B")):
        args = argparse.Namespace(arch=arch, dry_run=True, device="cpu", size=64, steps=1, depth=(19, 38),
                                  compile_backend="eager")
        rows = {row["variant"]: row for row in bench.run(args)}
        assert rows["eager bf16"]["step_ms"] > 0 and rows["torch.compile bf16"]["pixel_max_diff"] <= 255, rows
        assert rows["fp8 (torchao)"]["skipped"] == "fp8 matmuls need a CUDA GPU"
        assert args.description.startswith(named), args.description
