#!/usr/bin/env bash
# Set up .venv and run the whole test suite (what CI runs through .ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."

bash tools/setup.sh
exec .venv/bin/python -m pytest -q "$@"
