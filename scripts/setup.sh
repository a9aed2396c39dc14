#!/usr/bin/env bash
# Prepare this checkout on a Debian bookworm machine (as root): system
# packages, a working CRIU, and the virtual environment at .venv/.
# Idempotent: every step is skipped when its result is already in place.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENV="$ROOT/.venv"
STAMP_DIR="$ROOT/.local/stamps"
mkdir -p "$STAMP_DIR"

log() { printf 'setup: %s\n' "$*" >&2; }

# --- system packages ---------------------------------------------------------
SYSTEM_PACKAGES=(iproute2)
missing=()
for pkg in "${SYSTEM_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then
        log "need root to install: ${missing[*]}"; exit 1
    fi
    log "installing system packages: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# --- python virtual environment ---------------------------------------------
PYTHON=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
    log "creating virtual environment at .venv"
    "$PYTHON" -m venv "$VENV"
fi
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat "$STAMP_DIR/venv" 2>/dev/null)" != "$want" ]; then
    log "installing migsgx and its dependencies into .venv"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install -q -e ".[dev]"
    echo "$want" > "$STAMP_DIR/venv"
fi
