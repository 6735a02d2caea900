#!/usr/bin/env bash
# Fetch the wheels in tools/device_wheels.txt into .whl/ for the GPU machine (Python 3.12, x86-64,
# no network there). Run here, once, before carrying .whl to tools/device_check.sh:
#     bash tools/download_device_wheels.sh && echo '/.whl/' >> .git/info/exclude
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${DTS_PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
mkdir -p .whl
platforms=()
for tag in manylinux_2_39 manylinux_2_35 manylinux_2_34 manylinux_2_31 manylinux_2_28 manylinux_2_27 \
           manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
    platforms+=(--platform "${tag}_x86_64")
done
grep -v '^\s*#' tools/device_wheels.txt | grep -v '^\s*$' | while read -r requirement; do
    "$PYTHON" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
        --python-version 3.12 --implementation cp "${platforms[@]}" -d .whl "$requirement"
done
ls -1 .whl
du -sh .whl
