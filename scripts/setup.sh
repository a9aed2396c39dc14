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
# CRIU's build dependencies (it is built from source by install-criu.sh), the
# tools CRIU runs (iproute2, iptables) and protoc for the RPC module; the
# container engines that container migration drives (runc checkpoints with
# our CRIU; podman runs with --runtime runc and brings conmon along); libseccomp's
# own Python binding for the enclave sandbox's system-call filter.
SYSTEM_PACKAGES=(
    gcc make pkg-config libc6-dev libbsd-dev libcap-dev libgnutls28-dev libnet1-dev
    libnftables-dev libnl-3-dev libprotobuf-c-dev libprotobuf-dev protobuf-c-compiler
    protobuf-compiler uuid-dev xz-utils iproute2 iptables debian-archive-keyring
    runc podman conmon tar containerd python3-seccomp
)
installed=$(dpkg-query -W -f='${binary:Package} ${db:Status-Abbrev}\n' "${SYSTEM_PACKAGES[@]}" 2>/dev/null \
    | awk '$2 == "ii" { sub(/:.*/, "", $1); print $1 }' || true)
missing=()
for pkg in "${SYSTEM_PACKAGES[@]}"; do
    grep -qxF "$pkg" <<<"$installed" || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then
        log "need root to install: ${missing[*]}"; exit 1
    fi
    log "installing system packages: ${missing[*]}"
    apt_log="$ROOT/.local/apt-install.log"
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq --no-install-recommends "${missing[@]}"; } >"$apt_log" 2>&1; then
        tail -n 20 "$apt_log" >&2
        log "ERROR: installing system packages failed (log: .local/apt-install.log)"
        exit 1
    fi
fi

# --- python virtual environment ---------------------------------------------
PYTHON=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
    log "creating virtual environment at .venv"
    "$PYTHON" -m venv "$VENV"
    rm -f "$STAMP_DIR/venv"  # (a stamp kept from an earlier .venv says nothing of this one)
fi
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat "$STAMP_DIR/venv" 2>/dev/null)" != "$want" ]; then
    log "installing migsgx and its dependencies into .venv"
    # Wheels the project carries itself (vendor/wheels, each checked against
    # vendor/wheels/SHA256SUMS) are found first, so set-up does not depend on
    # reaching a public index for them.
    find_links=()
    if [ -d "$ROOT/vendor/wheels" ] && compgen -G "$ROOT/vendor/wheels/*.whl" >/dev/null; then
        (cd "$ROOT/vendor/wheels" && sha256sum --quiet -c SHA256SUMS) \
            || { log "ERROR: a vendored wheel does not match vendor/wheels/SHA256SUMS"; exit 1; }
        find_links=(--find-links "$ROOT/vendor/wheels")
    fi
    "$VENV/bin/python" -m pip install -q "${find_links[@]}" -e ".[dev]"
    echo "$want" > "$STAMP_DIR/venv"
fi

# --- libseccomp's binding, visible in the venv ------------------------------
# Debian's python3-seccomp is built for the system's Python 3.11 (same ABI as
# the venv's); only its one extension module is linked in, not dist-packages.
seccomp_so=$(find /usr/lib/python3/dist-packages -maxdepth 1 -name 'seccomp.cpython-311-*.so' 2>/dev/null | head -n 1)
if [ -n "$seccomp_so" ]; then
    site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["platlib"])')
    ln -sfn "$seccomp_so" "$site/$(basename "$seccomp_so")"
    "$VENV/bin/python" -c 'import seccomp' \
        || { log "ERROR: libseccomp's Python binding does not import in .venv"; exit 1; }
fi

# --- CRIU (built from source, see install-criu.sh) --------------------------
bash "$ROOT/scripts/install-criu.sh"

# Lazy pages want a pipe bigger than the default limit (root here lacks
# CAP_SYS_RESOURCE to exceed it). Not persistent across reboots: every run.
PIPE_MAX=4194304
if [ "$(id -u)" -eq 0 ] && [ "$(cat /proc/sys/fs/pipe-max-size)" -lt "$PIPE_MAX" ]; then
    echo "$PIPE_MAX" > /proc/sys/fs/pipe-max-size
fi

# --- bytecode of the project's own modules ---------------------------------
# Every process the project starts imports migsgx from src/: the tool, its
# guardian, agents, platform services, the enclave runtimes (which see src/
# through the sandbox's read-only binds) and the lab's applications in
# containers (the same binds). Where PYTHONDONTWRITEBYTECODE is set, no import
# writes a cache, and each of those starts compiled every module it imported.
# compileall writes the caches whatever that variable says; an import reads a
# cache only while the source's modification time and size still match the
# ones it records, and compiles an edited module afresh: nothing stale runs.
# Only missing or outdated caches are written, so a second run takes a moment.
# (Bytecode holds the modules' code and constants: nothing of any host's state.)
"$VENV/bin/python" -m compileall -q -j 0 --invalidation-mode timestamp "$ROOT/src" >&2 \
    || { log "ERROR: compiling src/ to bytecode failed (a module above does not compile)"; exit 1; }
