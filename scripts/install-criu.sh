#!/usr/bin/env bash
# Build a working CRIU into .local/criu/ and generate the Python RPC module.
#
# Debian bookworm's own criu (3.17) does not work on recent kernels, and 4.1
# cannot dump INET sockets on kernels >= 6.16 (see shared/ENVIRONMENT.md), so
# the upstream tarball of CRIU >= 4.2 is taken from Debian's archive (the
# source package of a newer suite, fetched through a private apt
# configuration that leaves the system's sources alone) and built here.
# The same tarball's images/rpc.proto gives src/migsgx/criu/_generated/.
#
# Called by scripts/setup.sh after the system packages and the virtual
# environment are in place. A stamp makes a second run a no-op.
#
# Environment:
#   MIGSGX_CRIU_SUITE    Debian suite to take the source from (default forky)
#   MIGSGX_DEBIAN_MIRROR archive URI (default: the one this system's apt uses)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
LOCAL="$ROOT/.local"
PREFIX="$LOCAL/criu"
BUILD="$LOCAL/build"
APT_DIR="$LOCAL/apt"
GEN_DIR="$ROOT/src/migsgx/criu/_generated"
STAMP="$LOCAL/stamps/criu"
SUITE=${MIGSGX_CRIU_SUITE:-forky}
PYTHON="$ROOT/.venv/bin/python"
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
MIN_MAJOR=4
MIN_MINOR=2

log() { printf 'setup: %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

want=$( { cat "$0"; echo "$SUITE"; } | sha256sum | cut -d' ' -f1)
if [ "$(cat "$STAMP" 2>/dev/null)" = "$want" ] \
    && [ -x "$PREFIX/bin/criu" ] \
    && [ -f "$GEN_DIR/rpc_pb2.py" ] && [ -f "$GEN_DIR/__init__.py" ]; then
    exit 0
fi
[ "$(id -u)" -eq 0 ] || die "building CRIU needs root (run scripts/setup.sh as root)"
[ -x "$PYTHON" ] || die "no virtual environment at .venv (scripts/setup.sh makes it first)"
mkdir -p "$LOCAL/stamps" "$BUILD" "$APT_DIR/lists/partial" "$APT_DIR/cache/archives/partial"

# --- a private apt configuration with only the deb-src line -----------------
mirror=${MIGSGX_DEBIAN_MIRROR:-}
if [ -z "$mirror" ]; then
    # The archive URI this system already uses for its own release.
    codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
    mirror=$(apt-get indextargets --format '$(RELEASE) $(REPO_URI)' 2>/dev/null \
        | awk -v c="$codename" '$1 == c { print $2; exit }')
fi
[ -n "$mirror" ] || die "cannot tell which Debian archive apt uses; set MIGSGX_DEBIAN_MIRROR"
[ -r "$KEYRING" ] || die "missing $KEYRING (package debian-archive-keyring)"
printf 'deb-src [signed-by=%s] %s %s main\n' "$KEYRING" "${mirror%/}" "$SUITE" \
    > "$APT_DIR/sources.list"
APT_OPTS=(
    -o "Dir::Etc::sourcelist=$APT_DIR/sources.list"
    -o "Dir::Etc::sourceparts=-"
    -o "Dir::State::Lists=$APT_DIR/lists"
    -o "Dir::Cache=$APT_DIR/cache"
    -o "APT::Sandbox::User=root"
    -o "Acquire::Languages=none"
)
log "fetching the CRIU source index from Debian's archive ($SUITE)"
apt-get "${APT_OPTS[@]}" update -qq >/dev/null \
    || die "apt-get update of the $SUITE sources failed"

# Only the upstream tarball is needed; the Debian diff is not fetched at all
# (the archive may answer 404 for it).
orig_line=$(apt-get "${APT_OPTS[@]}" source --print-uris -qq "criu/$SUITE" 2>/dev/null \
    | grep -E "^'[^']*\.orig\.tar\.[a-z0-9]+' " | head -n1) \
    || die "no criu source package in $SUITE"
uri=$(awk '{ print $1 }' <<<"$orig_line" | tr -d "'")
tarball=$(awk '{ print $2 }' <<<"$orig_line")
hash=$(awk '{ print $4 }' <<<"$orig_line")
version=${tarball#criu_}
version=${version%.orig.tar.*}
IFS=. read -r major minor _ <<<"$version"
if [ "$major" -lt "$MIN_MAJOR" ] || { [ "$major" -eq "$MIN_MAJOR" ] && [ "$minor" -lt "$MIN_MINOR" ]; }; then
    die "criu $version in $SUITE is older than $MIN_MAJOR.$MIN_MINOR"
fi
if [ ! -s "$BUILD/$tarball" ]; then
    log "downloading $tarball"
    /usr/lib/apt/apt-helper "${APT_OPTS[@]}" download-file "$uri" "$BUILD/$tarball.part" "$hash" \
        >/dev/null || die "download of $tarball failed"
    mv "$BUILD/$tarball.part" "$BUILD/$tarball"
fi

# --- build ------------------------------------------------------------------
src="$BUILD/criu-$version"
if [ ! -f "$src/Makefile" ]; then
    rm -rf "$src" "$src.unpack"
    mkdir -p "$src.unpack"
    tar -xf "$BUILD/$tarball" -C "$src.unpack" --strip-components=1
    mv "$src.unpack" "$src"
fi
log "building criu $version (make criu, about 20 s)"
if ! make -C "$src" -j"$(nproc)" criu >"$BUILD/criu-build.log" 2>&1; then
    tail -n 20 "$BUILD/criu-build.log" >&2
    die "building criu failed (full log: .local/build/criu-build.log)"
fi
install -D -m 0755 "$src/criu/criu" "$PREFIX/bin/criu"
install -D -m 0644 "$src/images/rpc.proto" "$PREFIX/share/criu/rpc.proto"

# --- the Python RPC module --------------------------------------------------
gen_tmp=$(mktemp -d)
trap 'rm -rf "$gen_tmp"' EXIT
protoc --proto_path="$src/images" --python_out="$gen_tmp" "$src/images/rpc.proto" \
    || die "protoc failed on rpc.proto"
if ! PYTHONPATH="$gen_tmp" "$PYTHON" -c \
    'import rpc_pb2; rpc_pb2.criu_req(type=rpc_pb2.CHECK).SerializeToString()' 2>"$gen_tmp/err"; then
    cat "$gen_tmp/err" >&2
    die "the generated rpc_pb2 does not import with the protobuf runtime in .venv"
fi
mkdir -p "$GEN_DIR"
install -m 0644 "$gen_tmp/rpc_pb2.py" "$GEN_DIR/rpc_pb2.py"
printf '"""Generated at set-up time from CRIU %s images/rpc.proto; not committed."""\n' \
    "$version" > "$GEN_DIR/__init__.py"

# --- check ------------------------------------------------------------------
got=$("$PREFIX/bin/criu" --version | awk '/^Version:/ { print $2 }')
[ "$got" = "$version" ] || die "built criu reports version '$got', expected $version"
if ! "$PREFIX/bin/criu" check >"$BUILD/criu-check.log" 2>&1; then
    cat "$BUILD/criu-check.log" >&2
    die "criu check failed: this kernel or machine cannot run CRIU $version"
fi
rm -rf "$APT_DIR"  # the suite's index (tens of MiB) is not needed any more
log "criu $version ready at .local/criu/bin/criu"
echo "$want" > "$STAMP"
