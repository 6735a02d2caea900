#!/usr/bin/env bash
# The prepared GPU check: run it in a `device` call on a lent H100/H200 (steps 1-3 under 7 minutes),
# `--flux` (steps 1 and 4, under 5 minutes) in a second call, and `--dit` (steps 1 and 5, under 5 minutes) in a
# third when time is left.
#
#   1. the GPU and the versions that matter;
#   2. pytest -m gpu: eager fp16 through a real server on an SD1.5-size model, the compiled path,
#      an AOTInductor engine built and served, an SDXL-size VAE decode with the upcast;
#   3. a benchmark table: SD1.5 architecture, 512x512, batch 1 (UNet batch 2 with CFG), per UNet step
#      eager vs torch.compile vs aotinductor (plain, and replayed in a CUDA graph), the VAE decode and a
#      20-step image in the pipeline; then a 20-step image end to end through gRPC on the AOTInductor
#      engine;
#   4. a full-size FLUX.1 [dev] transformer (12B, seeded random weights), 1024x1024, 28 steps: ms per step
#      in eager bf16, torch.compile and fp8 (torchao), and each one's pixel difference from eager bf16
#      (tools/bench_flux_step.py);
#   5. the same for a full-size Z-Image transformer (6B, 1024x1024, 9 steps, no CFG: Turbo's defaults) and
#      FLUX.2 [klein] 4B's (1024x1024, 4 steps).
# Markdown and JSON results go to $OUT (default /tmp/device_check); the exit status is non-zero if any
# step failed (every step still runs).
#
#   bash tools/device_check.sh --dry-run    # a smoke run of every step on the CPU, small models and sizes (CI)
#   bash tools/device_check.sh --flux       # only the FLUX.1 step (and the versions)
#   bash tools/device_check.sh --dit        # only the Z-Image and FLUX.2 [klein] steps (and the versions)
#
# The GPU machine has no network. Before the call, here: `bash tools/download_device_wheels.sh` (the
# wheels of tools/device_wheels.txt into .whl/), then call with carry [".whl"]:
#   bash tools/device_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
DRY_RUN=0 FLUX_ONLY=0 DIT_ONLY=0
[ "${1:-}" = "--dry-run" ] && DRY_RUN=1
[ "${1:-}" = "--flux" ] && FLUX_ONLY=1
[ "${1:-}" = "--dit" ] && DIT_ONLY=1
OUT="${OUT:-/tmp/device_check}"
mkdir -p "$OUT"
WORK="$(mktemp -d /tmp/dts-device-check.XXXXXX)"
trap 'rm -rf "$WORK"' EXIT
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -d .whl ] && [ "$DRY_RUN" = 0 ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" \
        .whl/*.whl || exit 1
    export PYTHONPATH="$WORK/site:$PYTHONPATH"
fi
PY="${DTS_PYTHON:-python3}"
failed=()

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.log, go on if it fails
    local name="$1" seconds="$2"
    shift 2
    echo "==> $name (limit ${seconds}s)"
    local start=$SECONDS
    timeout "$seconds" "$@" 2>&1 | tee "$OUT/$name.log"
    local status=${PIPESTATUS[0]}
    echo "<== $name: exit $status after $((SECONDS - start))s"
    [ "$status" = 0 ] || failed+=("$name")
}

if [ "$DRY_RUN" = 1 ]; then
    export DTS_GPU_DRY_RUN=1
    DEVICE=cpu MODEL_ARGS=(--arch builtin --resolution 128x128) RUNS=(--repeats 2 --e2e-steps 4)
    SERVER_ARGS=(--sizes 128 --runs 1 --steps 4) LIMITS=(300 400 120 200) FLUX_ARGS=(--dry-run) DIT_LIMIT=200
    # A smoke run: the compiled path and AOTInductor engines have CPU tests of their own in the suite;
    # here the GPU tests' other steps run, and the benchmark builds ONNX Runtime engines for bench_grpc to serve.
    GPU_TEST_ARGS=(-k "not compiled_path and not aotinductor_engine") COMPILE_ARGS=() BENCH_BACKENDS=onnxruntime
else
    DEVICE=cuda MODEL_ARGS=(--arch sd15 --resolution 512x512) RUNS=(--repeats 30 --e2e-steps 20)
    SERVER_ARGS=(--model bench-sd15-arch --sizes 512 --runs 2 --steps 20) LIMITS=(170 270 70 260) FLUX_ARGS=() DIT_LIMIT=150
    GPU_TEST_ARGS=() COMPILE_ARGS=(--torch-compile) BENCH_BACKENDS=aotinductor,aotinductor+cudagraph
fi
export DTS_GPU_MODEL_DIR="$WORK/models"
mkdir -p "$DTS_GPU_MODEL_DIR"

step versions 40 "$PY" - <<'PYTHON'
import platform, torch, diffusers, grpc, google.protobuf
from dts_util import __version__
print(f"dts-util {__version__}, python {platform.python_version()}, torch {torch.__version__} "
      f"(CUDA {torch.version.cuda}), diffusers {diffusers.__version__}, grpcio {grpc.__version__}, "
      f"protobuf {google.protobuf.__version__}")
if torch.cuda.is_available():
    index = torch.cuda.current_device()
    print(f"GPU: {torch.cuda.get_device_name(index)}, capability {torch.cuda.get_device_capability(index)}, "
          f"{torch.cuda.get_device_properties(index).total_memory / 2**30:.0f} GiB")
else:
    print("no CUDA GPU: dry run on the CPU")
PYTHON
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv \
    | tee -a "$OUT/versions.log"

if [ "$FLUX_ONLY" = 0 ] && [ "$DIT_ONLY" = 0 ]; then
step gpu_tests "${LIMITS[0]}" "$PY" -m pytest -q -m gpu tests/gpu -p no:cacheprovider "${GPU_TEST_ARGS[@]}" \
    --junitxml="$OUT/gpu_tests.xml"

step bench_engines "${LIMITS[1]}" "$PY" tools/bench_engines.py "${MODEL_ARGS[@]}" "${RUNS[@]}" \
    --device "$DEVICE" "${COMPILE_ARGS[@]}" --backends "$BENCH_BACKENDS" --engine-components unet \
    --model-dir "$DTS_GPU_MODEL_DIR" --engine-dir "$WORK/engines" --json "$OUT/bench_engines.json"

step bench_grpc "${LIMITS[2]}" "$PY" tools/bench_server.py "${SERVER_ARGS[@]}" --stream-only \
    --device "$DEVICE" --model-dir "$DTS_GPU_MODEL_DIR" --engine-dir "$WORK/engines" --json "$OUT/bench_grpc.json"

fi
if [ "$FLUX_ONLY" = 1 ] || [ "$DRY_RUN" = 1 ]; then
step bench_flux "${LIMITS[3]}" "$PY" tools/bench_flux_step.py "${FLUX_ARGS[@]}" --json "$OUT/bench_flux.json"
fi
# The dry run leaves these to tests/tools/test_device_check.py, which runs the same code in-process (quicker).
if [ "$DIT_ONLY" = 1 ]; then
for arch in zimage flux2-klein; do
    step "bench_$arch" "$DIT_LIMIT" "$PY" tools/bench_flux_step.py --arch "$arch" "${FLUX_ARGS[@]}" \
        --json "$OUT/bench_$arch.json"
done
fi

{
    echo "# dts-util GPU check$([ "$DRY_RUN" = 1 ] && echo ' (dry run on the CPU)'), $(date -u +%Y-%m-%d)"
    echo
    grep -v '^<==\|^==>' "$OUT/versions.log"
    echo
    if [ -f "$OUT/gpu_tests.log" ]; then
        echo "## pytest -m gpu"
        grep -E "passed|failed|error" "$OUT/gpu_tests.log" | tail -1
        echo
        echo "## UNet step, VAE decode, image (tools/bench_engines.py)"
        grep -E '^\||^engine variants|batch' "$OUT/bench_engines.log"
        echo
        echo "## End to end through gRPC (tools/bench_server.py)"
        grep -E '^\||steps' "$OUT/bench_grpc.log"
        echo
    fi
    for arch in flux zimage flux2-klein; do
        if [ -f "$OUT/bench_$arch.log" ]; then
            echo "## $arch transformer step (tools/bench_flux_step.py --arch $arch)"
            grep -E '^\||^FLUX|^Z-Image' "$OUT/bench_$arch.log"
            echo
        fi
    done
    echo "failed steps: ${failed[*]:-none}"
} > "$OUT/device_check.md"
cat "$OUT/device_check.md"
[ ${#failed[@]} = 0 ]
