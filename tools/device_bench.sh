#!/usr/bin/env bash
# One prepared GPU benchmark for the lent H100/H200 (one `device` call, under 8 minutes).
#
# SD1.5-architecture UNet at 512x512, batch 1 (UNet batch 2 with CFG), fp16 on CUDA:
# eager PyTorch vs --torch-compile (CUDA graphs) vs any engine backend available there
# (TensorRT if it imports; onnxruntime only with its CUDA provider).
#
# The device image has torch (CUDA), accelerate, transformers, safetensors, grpcio and onnxruntime
# (CPU only) but not diffusers or polygraphy; carry them as wheels (pure Python, so no platform flags):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl \
#       diffusers==0.42.1 importlib_metadata polygraphy==0.53.6
# (polygraphy is needed only when an engine backend is present there to build with.)
# then run, with carry [".whl"]:  bash tools/device_bench.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/device_bench}"
mkdir -p "$OUT"
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:$PWD/src"
else
    export PYTHONPATH="$PWD/src"
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))" | tee -a "$OUT/gpu.txt"
timeout 420 python3 tools/bench_engines.py --arch sd15 --resolution 512x512 --device cuda --torch-compile \
    --repeats 30 --e2e-steps 20 --model-dir /tmp/dts-models --engine-dir /tmp/dts-engines 2>&1 \
    | tee "$OUT/device_bench.md"
