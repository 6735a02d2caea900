#!/usr/bin/env bash
# Fresh machine to first image: set up .venv, start the server on the built-in model,
# generate a PNG through the gRPC client, check the server with `dts-util test`, stop it.
set -euo pipefail
cd "$(dirname "$0")/.."

bash tools/setup.sh
PORT="${DTS_PORT:-7859}"
OUT_DIR="${DTS_OUT:-out}"
LOG=serve.log
DTS=.venv/bin/dts-util

echo "==> starting dts-util serve on port $PORT (log: $LOG)"
"$DTS" serve --port "$PORT" >"$LOG" 2>&1 &
SERVER=$!
trap 'kill "$SERVER" 2>/dev/null; wait "$SERVER" 2>/dev/null || true' EXIT

for _ in $(seq 1 180); do
    if "$DTS" test --port "$PORT" --timeout 2 >/dev/null 2>&1; then break; fi
    if ! kill -0 "$SERVER" 2>/dev/null; then echo "server exited; see $LOG:"; tail -20 "$LOG"; exit 1; fi
    sleep 1
done

echo "==> generating an image through gRPC"
"$DTS" generate "a lighthouse on a cliff at sunset" --seed 42 --port "$PORT" --out "$OUT_DIR"
echo "==> checking the server"
"$DTS" test --port "$PORT"
echo "==> done: the PNG is in $OUT_DIR/42.png; server log in $LOG"
