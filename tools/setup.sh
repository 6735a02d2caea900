#!/usr/bin/env bash
# Create .venv and install dts-util with its test extras. Safe to re-run; used by the
# README's two commands (tools/quickstart.sh, tools/run_tests.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${DTS_PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    echo "==> creating .venv with $("$PYTHON" --version)"
    "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)
"${PIP[@]}" install --upgrade pip
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    # Pinned first: a bare "torch" requirement can resolve to a multi-GB CUDA build. On a GPU
    # host, install the CUDA build you want into .venv before running this script.
    echo "==> installing torch ${DTS_TORCH_VERSION:-2.13.0}"
    "${PIP[@]}" install "torch==${DTS_TORCH_VERSION:-2.13.0}"
fi
echo "==> installing dts-util and its dependencies"
"${PIP[@]}" install -e ".[test]"
# An independent implementation of the Draw Things app's configuration (flatc's code for its schema),
# for tests/grpc/drawthings_app. Without its dependencies: the tests load only that generated file,
# and its own pins (Pillow < 13) would downgrade ours.
"${PIP[@]}" install --no-deps "drawthings-py==0.4.0"
echo "==> ready: $(.venv/bin/dts-util --version)"
