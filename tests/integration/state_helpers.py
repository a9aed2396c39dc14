"""Shared pieces of the enclave-state migration tests: hosts, images, drivers, an adversary.

Registered as a pytest plugin by the test modules (``pytest_plugins``), so the
session fixtures exist once:

* ``world``: a deployment (provisioning CA, hosts ``a``, ``b``, ``c``, an author
  key), the example images and their variants signed by that author, and a
  running platform service per host.  Stopped and removed at the end of the
  session, also after failures.
* ``launch``: starts enclaves through a host's platform service; every enclave a
  test launched is destroyed (and, if it does not go, killed) at teardown.

Beside them, the pieces a test combines:

* :class:`DestinationDriver`: the destination host's side (``IncomingEnclave``)
  in a thread on a real TCP listener.
* :func:`start_transfer`: the source host's side (``OutgoingEnclave``) up to the
  destination's LOADED.
* :class:`TamperingProxy`: a real man in the middle on the peer connection.  It
  parses the peer wire (CBOR frames, the handshake messages inside ``hs``, and
  the chunk frames of the state stream), records every byte it reads in both
  directions, and lets a test rewrite, drop, add or hold back whatever it likes.
"""

from __future__ import annotations

import base64
import contextlib
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from migsgx import _proc
from migsgx.core import handshake
from migsgx.core.peer import PEER_FRAME_MAX
from migsgx.datapath.incoming import IncomingEnclave
from migsgx.datapath.outgoing import OutgoingEnclave
from migsgx.datapath.peerwire import DEFAULT_CHUNK, PEER
from migsgx.errors import MigSGXError
from migsgx.host.client import EnclaveClient
from migsgx.lab.hosts import Deployment, ServiceProcess, start_service
from migsgx.sgx.ca import ProvisioningCA
from migsgx.sgx.image import EnclaveImage, load_author_key, mr_signer_of, sign_image_dir
from migsgx.sgx.platform import EmulatedPlatform
from migsgx.wire import decode_body, encode

KIB = 1 << 10
MIB = 1 << 20
CHUNK_HEADER = struct.Struct(">IB")
FLAG_FINAL = 0x01
FRAME_HEADER = struct.Struct(">I")

# A probe enclave whose whole state is a page of enclave memory that it allocates
# when it starts (no structured state at all): what a destination holds in its
# memory is then directly observable through ``read``.
VAULT_SOURCE = '''
"""Test enclave: a secret kept in one page of enclave memory."""

import numpy as np

from migsgx.enclave import Enclave, EnclaveError, ecall


class Vault(Enclave):
    def __init__(self, ctx):
        super().__init__(ctx)
        self.cell = ctx.memory.array("cell", 4096, np.uint8)

    @ecall
    def write(self, data):
        if not isinstance(data, bytes) or len(data) > 4096:
            raise EnclaveError("write takes at most 4096 bytes")
        self.cell[:] = 0
        self.cell[: len(data)] = np.frombuffer(data, dtype=np.uint8)
        return len(data)

    @ecall
    def read(self):
        return self.cell.tobytes().rstrip(b"\\0")

    def export_state(self):
        return {}

    def import_state(self, state):
        pass
'''

VAULT_MANIFEST = """[enclave]
name = "vault"
entry = "vault_enclave:Vault"
memory_size = "1MiB"
thread_slots = 2
product_id = 7
svn = 1
debug = false
"""


# --- processes ---------------------------------------------------------------------------
def pid_running(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""

    return _proc.alive(pid)


def wait_gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while pid_running(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def children_of(pid: int) -> list[int]:
    """The live children of ``pid`` (from a scan: the kernel's ``children`` file may pass
    over one)."""

    return [child for child in _proc.scanned_children(pid) if _proc.alive(child)]


def kill_quietly(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signal.SIGKILL)


def close_hard(sock: socket.socket | None) -> None:
    """Shut a socket down (which wakes threads blocked on it) and close it."""

    if sock is None:
        return
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()


# --- the world ---------------------------------------------------------------------------
@dataclass
class World:
    deployment: Deployment
    services: dict[str, ServiceProcess]
    images: dict[str, Path]
    shared: set[int] = field(default_factory=set)
    """Enclaves that outlive one test (module fixtures); per-test cleanup leaves them."""

    @property
    def root(self) -> Path:
        return self.deployment.root

    def socket(self, host: str) -> Path:
        return self.services[host].socket

    def image(self, name: str) -> EnclaveImage:
        return EnclaveImage.load(self.images[name])

    def enclave_pids(self) -> set[int]:
        """Enclave processes currently running under this world's platform services."""

        pids: set[int] = set()
        for svc in self.services.values():
            if svc.process.poll() is None:
                pids.update(children_of(svc.process.pid))
        return pids


def _variant(
    dep: Deployment,
    example: str,
    name: str,
    *,
    manifest: Callable[[str], str] = lambda text: text,
    code: Callable[[str], str] | None = None,
) -> Path:
    """An example image with an edited manifest or code, signed by the deployment's author."""

    path = dep.signed_image(example, dest_name=name)
    mpath = path / "manifest.toml"
    mpath.write_text(manifest(mpath.read_text()))
    if code is not None:
        (src,) = [p for p in path.glob("*.py")]
        src.write_text(code(src.read_text()))
    sign_image_dir(path, load_author_key(dep.author_key))
    return path


def _same_signer(text: str, *, svn: int | None = None, debug: bool = False) -> str:
    if svn is not None:
        text = text.replace("svn = 1", f"svn = {svn}")
    if debug:
        text = text.replace("debug = false", "debug = true")
    return text + 'migration_policy = "same-signer"\n'


def make_vault_image(dep: Deployment) -> Path:
    path = dep.root / "images" / "vault"
    path.mkdir(parents=True, exist_ok=True)
    (path / "manifest.toml").write_text(VAULT_MANIFEST)
    (path / "vault_enclave.py").write_text(VAULT_SOURCE)
    sign_image_dir(path, load_author_key(dep.author_key))
    return path


def make_images(dep: Deployment) -> dict[str, Path]:
    def one_byte(text: str) -> str:
        assert text.startswith('"""A key-value store')
        return '"""a' + text[4:]  # one byte differs: another MRENCLAVE, same author

    return {
        "kvstore": dep.signed_image("kvstore"),
        "model": dep.signed_image("model"),
        "vault": make_vault_image(dep),
        "kv-other-code": _variant(dep, "kvstore", "kv-other-code", code=one_byte),
        "kv-other-code-signer": _variant(
            dep, "kvstore", "kv-other-code-signer", manifest=_same_signer, code=one_byte
        ),
        "kv-signer-svn2": _variant(
            dep, "kvstore", "kv-signer-svn2", manifest=lambda t: _same_signer(t, svn=2)
        ),
        "kv-signer-svn1": _variant(
            dep, "kvstore", "kv-signer-svn1", manifest=lambda t: _same_signer(t, svn=1)
        ),
        "kv-debug": _variant(
            dep, "kvstore", "kv-debug", manifest=lambda t: _same_signer(t, debug=True)
        ),
        # Builds whose measured policy also accepts peers on an out-of-date TCB.
        "kv-accept-ood": _variant(
            dep, "kvstore", "kv-accept-ood", manifest=lambda t: t + _ACCEPT_OOD
        ),
        "kv-signer-accept-ood": _variant(
            dep,
            "kvstore",
            "kv-signer-accept-ood",
            manifest=lambda t: _same_signer(t, svn=1) + _ACCEPT_OOD,
        ),
    }


_ACCEPT_OOD = 'accept_tcb = ["OutOfDate"]\n'


def add_foreign_host(world: World, name: str, *, also_trust_deployment: bool) -> Path:
    """A host whose platform was provisioned by another CA (its quotes chain to that CA).

    ``also_trust_deployment`` makes it a rogue host that accepts the deployment's
    quotes too, so that only the other end's check can stop a migration.
    """

    other = ProvisioningCA.init(world.root / f"ca-{name}", common_name="other provisioning CA")
    state = world.root / f"host-{name}"
    signer = mr_signer_of(load_author_key(world.deployment.author_key))
    EmulatedPlatform.init(state, other, host_id=name, allowed_signers=[signer])
    if also_trust_deployment:
        ours = (world.deployment.ca_dir / "ca.pem").read_bytes()
        pem = state / "ca.pem"
        pem.write_bytes(pem.read_bytes() + ours)
        # ... and reads the deployment's collateral beside its own CA's.
        toml = state / "platform.toml"
        meta = tomllib.loads(toml.read_text())
        meta["collateral"].append(str(world.deployment.ca_dir / "collateral.json"))
        toml.write_text(tomli_w.dumps(meta))
    return state


@pytest.fixture(scope="session")
def world() -> Iterator[World]:
    root = Path(tempfile.mkdtemp(prefix="migsgx-state-"))
    services: dict[str, ServiceProcess] = {}
    try:
        dep = Deployment.create(root, names=["a", "b", "c"])
        images = make_images(dep)
        for name, state in zip("abc", dep.hosts, strict=True):
            services[name] = start_service(state)
        yield World(dep, services, images)
    finally:
        for svc in services.values():
            svc.stop()
        shutil.rmtree(root, ignore_errors=True)


@dataclass
class Launcher:
    world: World
    clients: list[EnclaveClient] = field(default_factory=list)
    pids: list[int] = field(default_factory=list)

    def __call__(self, image: str, host: str = "a") -> EnclaveClient:
        client = EnclaveClient.launch(self.world.images[image], socket_path=self.world.socket(host))
        self.clients.append(client)
        self.track(client.info.pid)
        return client

    def track(self, pid: int | None) -> None:
        if pid is not None:
            self.pids.append(pid)

    def close(self) -> None:
        for client in self.clients:
            with contextlib.suppress(Exception):
                client.destroy()
        for pid in self.pids:
            if not wait_gone(pid, 3.0):
                kill_quietly(pid)
            self.world.shared.discard(pid)


@contextlib.contextmanager
def shared_launcher(world: World) -> Iterator[Launcher]:
    """A launcher for enclaves that several tests use (module fixtures)."""

    launcher = Launcher(world)
    try:
        yield launcher
    finally:
        launcher.close()


@pytest.fixture
def launch(world: World) -> Iterator[Launcher]:
    launcher = Launcher(world)
    before = world.enclave_pids()
    yield launcher
    for client in launcher.clients:
        with contextlib.suppress(Exception):
            client.destroy()
    # Whatever this test's enclaves left behind goes now, so the next test starts clean.
    leftovers = (world.enclave_pids() - before) | {p for p in launcher.pids if pid_running(p)}
    for pid in leftovers - world.shared:
        if not wait_gone(pid, 3.0):
            kill_quietly(pid)
            wait_gone(pid, 5.0)


# --- enclave content ---------------------------------------------------------------------
def fill_kvstore(client: EnclaveClient, count: int = 64, seed: int = 1) -> dict[str, bytes]:
    rnd = random.Random(seed)
    values = {f"key-{i:03d}": rnd.randbytes(rnd.randrange(1, 3000)) for i in range(count)}
    for key, value in values.items():
        client.ecall.put(key, value)
    return values


def assert_kvstore_intact(client: EnclaveClient, digest: str, values: dict[str, bytes]) -> None:
    """The enclave runs ECALLs again, with exactly its old state."""

    assert client.ecall.digest() == digest
    for key in list(values)[:5]:
        assert client.ecall.get(key) == values[key]
    assert client.ecall.stats()["keys"] == len(values)
    client.ecall.put("after", b"still running")
    assert client.ecall.get("after") == b"still running"
    client.ecall.delete("after")
    assert client.ecall.digest() == digest


# --- the destination host's driver ------------------------------------------------------
class DestinationDriver:
    """``IncomingEnclave`` on a TCP listener, in a thread: accept, receive, wait for COMMIT."""

    def __init__(
        self,
        platform_socket: Path,
        *,
        before_commit: Callable[[IncomingEnclave], None] | None = None,
        commit_timeout: float = 20.0,
        io_timeout: float = 30.0,
    ) -> None:
        self.platform_socket = platform_socket
        self.before_commit = before_commit
        self.commit_timeout = commit_timeout
        self.io_timeout = io_timeout
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address: tuple[str, int] = self.listener.getsockname()
        self.incoming: IncomingEnclave | None = None
        self.conn: socket.socket | None = None
        self.pid: int | None = None
        self.error: BaseException | None = None
        self.active = False
        self.hook_error: BaseException | None = None
        self.enclave_sock: socket.socket | None = None
        self.loaded = threading.Event()
        self.done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="test-destination", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self.listener.settimeout(self.io_timeout)
            conn, _ = self.listener.accept()
            conn.settimeout(self.io_timeout)
            self.conn = conn
            inc, offer = IncomingEnclave.accept_offer(conn, self.platform_socket)
            self.incoming = inc
            try:
                inc.receive(conn, offer)
            finally:
                if inc.info is not None:
                    self.pid = inc.info.pid
            self.loaded.set()
            if inc.refused:
                return  # (mode refuse: the enclave refused the id, nothing to wait for)
            if self.before_commit is not None:
                try:
                    self.before_commit(inc)
                except BaseException as exc:
                    self.hook_error = exc
                    raise
            self.enclave_sock = inc.wait_commit(self.commit_timeout)
            self.active = True
        except BaseException as exc:
            self.error = exc
            close_hard(self.conn)
        finally:
            self.listener.close()
            self.done.set()

    def join(self, timeout: float = 30.0) -> None:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the destination driver hangs"
        if isinstance(self.hook_error, AssertionError):
            raise self.hook_error

    def close(self) -> None:
        close_hard(self.conn)
        close_hard(self.enclave_sock)
        self.listener.close()
        if not self.active and self.incoming is not None and self.incoming.link is not None:
            with contextlib.suppress(Exception):
                self.incoming.abort()


# --- the source host's driver ------------------------------------------------------------
@dataclass
class SourceRun:
    client: EnclaveClient
    out: OutgoingEnclave
    peer: socket.socket
    error: BaseException | None = None
    stats: dict[str, Any] | None = None

    def resume(self, reason: str = "the test gives up this migration") -> None:
        """Abort (if the engine has not already) and let the application carry on."""

        self.client.reattach(self.out.abort(reason))
        close_hard(self.peer)

    def commit(self) -> None:
        try:
            self.out.commit()
        finally:
            close_hard(self.peer)


def start_transfer(
    client: EnclaveClient,
    address: tuple[str, int],
    *,
    mode: str = "pipelined",
    chunk_size: int = DEFAULT_CHUNK,
    peer_timeout: float = 20.0,
) -> SourceRun:
    """Detach the application's enclave and transfer it, up to the destination's LOADED."""

    sock = client.detach()
    out = OutgoingEnclave(
        sock,
        client.info,
        client.image_files,
        mode=mode,
        chunk_size=chunk_size,
        peer_timeout=peer_timeout,
    )
    peer = socket.create_connection(address, timeout=10)
    run = SourceRun(client, out, peer)
    try:
        run.stats = out.transfer(peer)
    except BaseException as exc:
        run.error = exc
    return run


# --- the adversary -----------------------------------------------------------------------
S2D = "s2d"
D2S = "d2s"
CUT = object()
"""Returned by a hook: cut the connection both ways at this point."""


@dataclass
class Chunk:
    """One chunk frame of the state stream, as the source sent it."""

    index: int
    final: bool
    payload: bytes

    def frame(self, *, final: bool | None = None, payload: bytes | None = None) -> bytes:
        body = self.payload if payload is None else payload
        flag = self.final if final is None else final
        return CHUNK_HEADER.pack(len(body), FLAG_FINAL if flag else 0) + body


def chunk_frame(payload: bytes, final: bool) -> bytes:
    return CHUNK_HEADER.pack(len(payload), FLAG_FINAL if final else 0) + payload


def peer_frame(msg: dict[str, Any]) -> bytes:
    return encode(msg, max_size=PEER_FRAME_MAX)


def hs_message(msg: dict[str, Any]) -> dict[str, Any] | None:
    """The handshake message carried by an ``hs`` peer frame."""

    data = msg.get("data")
    if msg.get("t") != "hs" or not isinstance(data, bytes) or len(data) < FRAME_HEADER.size:
        return None
    try:
        return decode_body(data[FRAME_HEADER.size :], handshake.SCHEMA)
    except MigSGXError:
        return None


def hs_frame(inner: dict[str, Any]) -> dict[str, Any]:
    return {"t": "hs", "data": encode(inner, max_size=handshake.MAX_HANDSHAKE_FRAME)}


FrameHook = Callable[["TamperingProxy", str, dict[str, Any], bytes], Any]
ChunkHook = Callable[["TamperingProxy", Chunk], Any]


class TamperingProxy:
    """A man in the middle between ``OutgoingEnclave`` and ``IncomingEnclave``.

    ``on_frame(proxy, direction, msg, raw)`` sees every CBOR frame and returns the
    bytes to forward (``None``: forward ``raw``; ``b""``: drop; ``CUT``: cut the
    connection).  ``on_chunk(proxy, chunk)`` does the same for every chunk frame
    of the state stream (source to destination).  ``hold_at`` holds the stream back
    before that chunk until :meth:`release`; :attr:`held` is set while it waits.
    ``delay`` slows every chunk down.  Every byte read from either end is kept in
    :attr:`captured`; decoded frames and chunks in :attr:`frames` and :attr:`chunks`.
    """

    def __init__(
        self,
        upstream: tuple[str, int],
        *,
        on_frame: FrameHook | None = None,
        on_chunk: ChunkHook | None = None,
        hold_at: int | None = None,
        delay: float = 0.0,
        keep_chunks: bool = True,
    ) -> None:
        self.upstream = upstream
        self.on_frame = on_frame
        self.on_chunk = on_chunk
        self.hold_at = hold_at
        self.delay = delay
        self.keep_chunks = keep_chunks
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address: tuple[str, int] = self.listener.getsockname()
        self.captured = {S2D: bytearray(), D2S: bytearray()}
        self.frames: list[tuple[str, dict[str, Any]]] = []
        self.chunks: list[Chunk] = []
        self.chunk_count = 0
        self.scratch: dict[str, Any] = {}  # for hooks that keep something for later
        self.held = threading.Event()
        self._release = threading.Event()
        self.cut = threading.Event()
        self.errors: list[BaseException] = []
        self._socks: dict[str, socket.socket] = {}
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._accepter = threading.Thread(target=self._accept, name="test-proxy", daemon=True)
        self._accepter.start()

    # --- control from the test --------------------------------------------------------
    def release(self) -> None:
        self.hold_at = None
        self._release.set()

    def send(self, direction: str, data: bytes) -> None:
        """Inject bytes towards the destination (``S2D``) or the source (``D2S``)."""

        target = self._socks["dst" if direction == S2D else "src"]
        with self._lock:
            target.sendall(data)

    def frames_of(self, direction: str, mtype: str) -> list[dict[str, Any]]:
        return [m for d, m in self.frames if d == direction and m.get("t") == mtype]

    def close(self) -> None:
        self.cut.set()
        self._release.set()
        for sock in self._socks.values():
            close_hard(sock)
        self.listener.close()
        for thread in self._threads:
            thread.join(5)

    def __enter__(self) -> TamperingProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- the pumps -------------------------------------------------------------------------
    def _accept(self) -> None:
        try:
            self.listener.settimeout(30)
            src, _ = self.listener.accept()
            dst = socket.create_connection(self.upstream, timeout=10)
        except OSError as exc:
            self.errors.append(exc)
            return
        for sock in (src, dst):
            sock.settimeout(None)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._socks = {"src": src, "dst": dst}
        for name, args in (("s2d", (src, dst, S2D)), ("d2s", (dst, src, D2S))):
            thread = threading.Thread(target=self._pump, args=args, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def _read(self, sock: socket.socket, n: int, direction: str) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            part = sock.recv(n - len(buf))
            if not part:
                raise EOFError
            buf += part
        self.captured[direction] += buf
        return bytes(buf)

    def _forward(self, dst: socket.socket, data: Any, raw: bytes) -> None:
        if data is CUT:
            self._cut()
            raise EOFError
        out = raw if data is None else data
        if out:
            with self._lock:
                dst.sendall(out)

    def _cut(self) -> None:
        self.cut.set()
        for sock in self._socks.values():
            close_hard(sock)

    def _pump(self, src: socket.socket, dst: socket.socket, direction: str) -> None:
        chunks = False
        try:
            while True:
                if chunks:
                    head = self._read(src, CHUNK_HEADER.size, direction)
                    length, flags = CHUNK_HEADER.unpack(head)
                    if flags & ~FLAG_FINAL or length > 64 * MIB:
                        # Not a chunk (the source broke off the stream): pass the rest on.
                        self._forward(dst, None, head)
                        self._passthrough(src, dst, direction)
                        return
                    chunk = Chunk(
                        self.chunk_count,
                        bool(flags & FLAG_FINAL),
                        self._read(src, length, direction),
                    )
                    self.chunk_count += 1
                    if self.keep_chunks:
                        self.chunks.append(chunk)
                    if self.hold_at is not None and chunk.index >= self.hold_at:
                        self.held.set()
                        self._release.wait()
                        if self.cut.is_set():
                            raise EOFError
                    if self.delay:
                        time.sleep(self.delay)
                    out = self.on_chunk(self, chunk) if self.on_chunk else None
                    self._forward(dst, out, head + chunk.payload)
                    if chunk.final:
                        chunks = False
                    continue
                head = self._read(src, FRAME_HEADER.size, direction)
                (length,) = FRAME_HEADER.unpack(head)
                if length > PEER_FRAME_MAX:
                    self._forward(dst, None, head)
                    self._passthrough(src, dst, direction)
                    return
                raw = head + self._read(src, length, direction)
                try:
                    msg = decode_body(raw[FRAME_HEADER.size :], PEER)
                except MigSGXError:
                    self._forward(dst, None, raw)
                    self._passthrough(src, dst, direction)
                    return
                self.frames.append((direction, msg))
                out = self.on_frame(self, direction, msg, raw) if self.on_frame else None
                self._forward(dst, out, raw)
                inner = hs_message(msg)
                if direction == S2D and inner is not None and inner["t"] == "source-finished":
                    chunks = True  # the state stream follows the source's last handshake message
        except EOFError:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)
        except OSError:
            self._cut()
        except BaseException as exc:
            self.errors.append(exc)
            self._cut()

    def _passthrough(self, src: socket.socket, dst: socket.socket, direction: str) -> None:
        while True:
            data = src.recv(1 << 16)
            if not data:
                raise EOFError
            self.captured[direction] += data
            with self._lock:
                dst.sendall(data)


def replay_into(platform_socket: Path, recorded: bytes) -> DestinationDriver:
    """Play the recorded source side of a migration, as the source, into a new destination."""

    dest = DestinationDriver(platform_socket)
    attacker = socket.create_connection(dest.address, timeout=10)

    def play() -> None:
        with contextlib.suppress(OSError):
            attacker.sendall(recorded)

    threading.Thread(target=play, name="test-replay", daemon=True).start()
    try:
        dest.join()
    finally:
        close_hard(attacker)
        dest.close()
    return dest


@contextlib.contextmanager
def migration_pair(
    world: World,
    dest_host: str = "b",
    *,
    proxy: dict[str, Any] | None = None,
    **dest_kwargs: Any,
) -> Iterator[tuple[DestinationDriver, TamperingProxy | None, tuple[str, int]]]:
    """A destination driver, optionally behind a proxy; everything closed at the end."""

    dest = DestinationDriver(world.socket(dest_host), **dest_kwargs)
    mitm = TamperingProxy(dest.address, **proxy) if proxy is not None else None
    try:
        yield dest, mitm, (mitm.address if mitm else dest.address)
    finally:
        if mitm is not None:
            mitm.close()
        dest.close()


# --- canary scanning ---------------------------------------------------------------------
def canary_patterns(secret: bytes) -> dict[str, bytes]:
    """Every form in which ``secret`` could show up: raw, hex, and base64 at any alignment."""

    patterns = {
        "raw": secret,
        "hex": secret.hex().encode(),
        "HEX": secret.hex().upper().encode(),
    }
    for shift in range(3):
        # Only the 4-character groups made of the secret's bytes alone are fixed.
        first, end = -(-shift // 3), (shift + len(secret)) // 3
        for name, enc in (("b64", base64.b64encode), ("b64url", base64.urlsafe_b64encode)):
            patterns[f"{name}+{shift}"] = enc(b"\0" * shift + secret)[4 * first : 4 * end]
    return patterns


def find_patterns(data: bytes | bytearray | memoryview, patterns: dict[str, bytes]) -> list[str]:
    view = bytes(data)
    return [name for name, pat in patterns.items() if pat in view]


def scan_file(path: Path, patterns: dict[str, bytes], block: int = 16 * MIB) -> list[str]:
    """Pattern names found in a file, read block by block with an overlap."""

    overlap = max(len(p) for p in patterns.values())
    hits: set[str] = set()
    try:
        with path.open("rb") as fh:
            tail = b""
            while True:
                data = fh.read(block)
                if not data:
                    break
                window = tail + data
                hits.update(find_patterns(window, patterns))
                tail = window[-overlap:]
    except OSError:
        return []
    return sorted(hits)


def regular_files(roots: Sequence[Path], *, newer_than: float | None = None) -> Iterator[Path]:
    """Every regular file (no symbolic link, none followed) below ``roots``; with
    ``newer_than``, only those modified or changed since.

    One ``scandir`` entry per file (its type from the directory, at most one ``lstat``):
    a shared ``/tmp`` holds hundreds of thousands of files, and three system calls
    for each made a canary scan outlast its test's timeout under load.
    """

    stack = [str(root) for root in reversed(roots)]
    while stack:
        try:
            entries = os.scandir(stack.pop())
        except OSError:
            continue
        with entries:
            for entry in entries:
                try:
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(entry.path)
                        continue
                    if not entry.is_file(follow_symlinks=False):
                        continue
                    if newer_than is not None:
                        st = entry.stat(follow_symlinks=False)
                        if max(st.st_mtime, st.st_ctime) < newer_than:
                            continue
                except OSError:
                    continue  # gone meanwhile
                yield Path(entry.path)


# --- a destination driver in its own process (to be killed) ---------------------------------
DRIVER_SCRIPT = """
import socket, sys
from migsgx.datapath.incoming import IncomingEnclave

listener = socket.create_server(("127.0.0.1", 0))
print(listener.getsockname()[1], flush=True)
conn, _ = listener.accept()
incoming, offer = IncomingEnclave.accept_offer(conn, sys.argv[1])
incoming.receive(conn, offer)
incoming.wait_commit(60)
print("active", flush=True)
"""


def start_driver_process(platform_socket: Path) -> tuple[subprocess.Popen[bytes], tuple[str, int]]:
    """``IncomingEnclave`` in a child process; returns it and its listening address."""

    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(
            [sys.executable, "-c", DRIVER_SCRIPT, str(platform_socket)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=err,
            start_new_session=True,
        )
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.strip().isdigit():
            proc.kill()
            proc.wait()
            proc.stdout.close()
            err.seek(0)
            raise RuntimeError(f"the driver process did not start: {err.read()[-2000:]!r}")
    return proc, ("127.0.0.1", int(line))
