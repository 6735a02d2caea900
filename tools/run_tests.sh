#!/usr/bin/env bash
# Set up .venv and run the whole test suite (what CI runs through .ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."

bash tools/setup.sh

# tests/deploy runs HAProxy in front of two servers and skips without it: install the
# distribution's package when we can (root or passwordless sudo, and apt-get).
install_haproxy() {
    local sudo=()
    if [ "$(id -u)" -ne 0 ]; then
        sudo -n true 2>/dev/null || return 1
        sudo=(sudo -n)
    fi
    "${sudo[@]}" apt-get update -qq &&
        "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq haproxy >/dev/null
}
if ! command -v haproxy >/dev/null 2>&1 && [ ! -x /usr/sbin/haproxy ] && command -v apt-get >/dev/null 2>&1; then
    echo "==> installing haproxy (for tests/deploy)"
    install_haproxy || echo "warning: could not install haproxy (needs apt-get as root or with passwordless" \
                            "sudo): tests/deploy will be skipped" >&2
fi

exec .venv/bin/python -m pytest -q "$@"
