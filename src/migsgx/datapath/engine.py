"""The untrusted side of one enclave's migration: its two ends and their wire.

:class:`OutgoingEnclave` runs on the source host beside the enclave (in the
application, or in the migration tool that took over the enclave's
connection); :class:`IncomingEnclave` runs on the destination host (in the
agent).  They talk over one plain TCP connection per enclave: the enclave
stream is end to end encrypted and authenticated by the enclaves, so the
ends only move opaque bytes, and nothing they could do (drop, reorder,
replay, tamper) gets past the enclaves unnoticed.

Wire (``docs/spec/channels.md``, "peer connection"): CBOR frames (``PEER``
schema) for the control steps, and in between the state itself as chunk
frames (``u32 length | u8 flags | payload``, :mod:`.transport`), one per ring
slot.  Steps::

    S -> D  offer {files, chunk_size, slots, mode}
    D -> S  accept {pid}                 (a fresh enclave of that image runs)
    S <-> D hs {data} ...                (the enclaves' handshake)
    S -> D  chunk frames ... final       (pipelined: while the enclave seals)
    D -> S  loaded {frame}               (authenticated by the destination enclave)
    S -> D  commit {token} | abort {frame}
    D -> S  active {} | aborted {}

Pipelined mode overlaps the enclave's sealing, the TCP transfer and the
destination's opening, with a few ring slots in flight on each side.
Sequential mode (the design pipelining improves on) dumps everything into a
staging buffer, then sends it, then loads it: same code, same enclave calls.
"""

from __future__ import annotations

import contextlib
import mmap
import select
import socket
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.commit import CommitError
from ..core.handshake import Role
from ..core.peer import MODES, PEER_FRAME_MAX, SCHEMA, PeerProtocol, check_offer
from ..core.stream import TAG_SIZE
from ..errors import (
    ConnectionClosedError,
    EnclaveLostError,
    FrameError,
    MigrationError,
    MigSGXError,
    ProtocolError,
    ReplayError,
    StreamError,
    error_from_wire,
)
from ..host.client import EnclaveInfo, launch_enclave
from ..limits import DEFAULT_CHUNK_SIZE, DEFAULT_SLOTS
from ..sgx.image import EnclaveImage
from ..wire import recv_frame, send_frame
from .ring import RingRole, ShmRing, send_ring_fds
from .transport import (
    CHUNK_HEADER,
    read_chunk_header,
    recv_exactly_into,
    ring_to_socket,
    send_chunk,
    socket_to_ring,
    tune_socket,
)

DEFAULT_CHUNK = DEFAULT_CHUNK_SIZE
PEER = SCHEMA
_STAGING_SLACK = 16 << 20

# Each end's view of its peer connection (migsgx.core.peer), by socket: every
# frame sent or received on a bound connection is checked against the table.
_WIRES: weakref.WeakKeyDictionary[socket.socket, PeerProtocol] = weakref.WeakKeyDictionary()


def bind_wire(sock: socket.socket, role: Role) -> PeerProtocol:
    """Hold the frames on ``sock`` to the peer protocol's table for ``role``."""

    wire = _WIRES.get(sock)
    if wire is None or wire.role is not role:
        wire = _WIRES[sock] = PeerProtocol(role)
    return wire


def _check_received(sock: socket.socket, msg: dict[str, Any]) -> None:
    wire = _WIRES.get(sock)
    if wire is not None:
        wire.received(msg)


def _send(sock: socket.socket, msg: dict[str, Any]) -> None:
    wire = _WIRES.get(sock)
    if wire is not None:
        wire.sent(msg)
    try:
        send_frame(sock, msg, max_size=PEER_FRAME_MAX)
    except OSError as exc:
        raise MigrationError(f"the peer connection failed: {exc}") from exc


def _recv(sock: socket.socket, *expect: str) -> dict[str, Any]:
    try:
        msg = recv_frame(sock, PEER, max_size=PEER_FRAME_MAX)
    except TimeoutError as exc:
        raise MigrationError(f"the peer did not answer in time (waiting for {expect})") from exc
    except OSError as exc:
        raise MigrationError(f"the peer connection failed: {exc}") from exc
    if msg["t"] in expect or msg["t"] == "abort":
        _check_received(sock, msg)
    if msg["t"] == "abort":
        raise MigrationError(f"the peer aborted: [{msg['code']}] {msg['message']}")
    if msg["t"] not in expect:
        raise ProtocolError(f"expected {' or '.join(expect)} from the peer, got {msg['t']!r}")
    return msg


class EnclaveLink:
    """Runtime calls (``__mig_*``) on an enclave's ECALL connection, one at a time.

    The end (outgoing or incoming) owns the connection outright while it migrates the enclave, so
    requests and replies simply alternate.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._ids = 1 << 40
        self._lock = threading.Lock()

    def call(self, name: str, *args: Any) -> Any:
        from ..channel import ECALL, ECALL_FRAME_MAX

        with self._lock:
            self._ids += 1
            call_id = self._ids
            try:
                send_frame(
                    self.sock,
                    {"t": "ecall", "id": call_id, "fn": name, "args": list(args)},
                    max_size=ECALL_FRAME_MAX,
                )
                while True:
                    msg = recv_frame(self.sock, ECALL, max_size=ECALL_FRAME_MAX)
                    if msg.get("id") in (call_id, 0):
                        break
            except (OSError, ConnectionClosedError) as exc:
                raise EnclaveLostError(f"the enclave went away during {name}") from exc
        if msg["t"] == "err":
            raise error_from_wire(msg["code"], msg["message"])
        if msg["t"] != "ret":
            raise ProtocolError(f"unexpected {msg['t']!r} from the enclave during {name}")
        return msg["value"]

    def give_ring(self, ring: ShmRing) -> None:
        """Hand the enclave its end of ``ring`` (descriptors follow the call frame)."""

        from ..channel import ECALL, ECALL_FRAME_MAX

        with self._lock:
            self._ids += 1
            call_id = self._ids
            send_frame(self.sock, {"t": "ecall", "id": call_id, "fn": "__mig_ring", "args": []})
            send_ring_fds(self.sock, ring)
            msg = recv_frame(self.sock, ECALL, max_size=ECALL_FRAME_MAX)
        if msg["t"] == "err":
            raise error_from_wire(msg["code"], msg["message"])


@dataclass
class _Staging:
    """Sequential mode's whole-state buffer, with the record boundaries."""

    buffer: mmap.mmap
    lengths: list[int] = field(default_factory=list)
    used: int = 0

    @classmethod
    def for_memory(cls, memory_size: int, chunk_size: int) -> _Staging:
        size = memory_size + (memory_size // chunk_size + 16) * (TAG_SIZE + 512) + _STAGING_SLACK
        return cls(mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS))

    def drain(self, ring: ShmRing, timeout: float | None) -> None:
        view = memoryview(self.buffer)
        try:
            while True:
                index, slot, final = ring.next(timeout)
                n = len(slot)
                if self.used + n > len(view):
                    raise MigrationError("the state is larger than the staging buffer")
                view[self.used : self.used + n] = slot
                ring.release(index)
                self.used += n
                self.lengths.append(n)
                if final:
                    return
        finally:
            view.release()

    def send(self, sock: socket.socket) -> None:
        view = memoryview(self.buffer)
        try:
            pos = 0
            for i, n in enumerate(self.lengths):
                send_chunk(sock, view[pos : pos + n], final=i == len(self.lengths) - 1)
                pos += n
        finally:
            view.release()

    def receive(self, sock: socket.socket, cap: int) -> None:
        header = bytearray(CHUNK_HEADER.size)
        view = memoryview(self.buffer)
        try:
            while True:
                n, final = read_chunk_header(sock, header, cap)
                if self.used + n > len(view):
                    raise MigrationError("the state is larger than the staging buffer")
                recv_exactly_into(sock, view[self.used : self.used + n])
                self.used += n
                self.lengths.append(n)
                if final:
                    return
        finally:
            view.release()

    def fill(self, ring: ShmRing, timeout: float | None) -> None:
        view = memoryview(self.buffer)
        try:
            pos = 0
            for i, n in enumerate(self.lengths):
                index, slot = ring.acquire(timeout)
                slot[:n] = view[pos : pos + n]
                ring.publish(index, n, final=i == len(self.lengths) - 1)
                pos += n
        finally:
            view.release()

    def close(self) -> None:
        with contextlib.suppress(BufferError):
            self.buffer.close()


class _Worker:
    """A thread whose exception is re-raised by :meth:`join`.

    On failure it closes ``ring``, so that the enclave at the ring's other end
    sees the doorbell go dead at once instead of waiting for a slot.
    """

    def __init__(self, target: Callable[[], Any], name: str, ring: ShmRing) -> None:
        self.error: BaseException | None = None
        self._target = target
        self._ring = ring
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._target()
        except BaseException as exc:
            self.error = exc
            with contextlib.suppress(Exception):
                self._ring.close()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)
        if self.error is not None:
            raise self.error


def _call_beside(link: EnclaveLink, worker: _Worker, name: str, *args: Any) -> Any:
    """A runtime call while ``worker`` moves the ring's slots.

    A failing worker closes the ring, so the enclave then fails too, with "the
    ring's peer is gone": then the worker's own error is the cause to report.
    (If the enclave itself is gone, that is the cause.)
    """

    try:
        return link.call(name, *args)
    except EnclaveLostError:
        raise
    except MigSGXError as exc:
        if isinstance(worker.error, MigSGXError):
            raise worker.error from exc
        raise


def _bytes_waiting(sock: socket.socket) -> bool:
    """Whether bytes wait on ``sock`` now (end of file is not bytes); never blocks."""

    poller = select.poll()
    poller.register(sock, select.POLLIN)
    try:
        if not poller.poll(0):
            return False
        return bool(sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
    except OSError:
        return False


def _slot_size(chunk_size: int) -> int:
    return chunk_size + TAG_SIZE


RING_TIMEOUT = 120.0


class OutgoingEnclave:
    """Source side: hand one enclave's state to a destination, then commit or abort."""

    def __init__(
        self,
        sock: socket.socket,
        info: EnclaveInfo,
        image_files: Mapping[str, bytes],
        *,
        chunk_size: int = DEFAULT_CHUNK,
        slots: int = DEFAULT_SLOTS,
        mode: str = "pipelined",
        peer_timeout: float | None = 300.0,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}")
        self.link = EnclaveLink(sock)
        self.info = info
        self.image_files = dict(image_files)
        self.chunk_size = chunk_size
        self.slots = slots
        self.mode = mode
        self.peer_timeout = peer_timeout
        self.peer: socket.socket | None = None
        self.stats: dict[str, Any] = {}
        self._loaded = False
        self._finished = False

    def transfer(self, peer: socket.socket) -> dict[str, Any]:
        """Everything up to the destination's verified LOADED; nothing is given up yet."""

        self.peer = peer
        bind_wire(peer, Role.SOURCE)
        tune_socket(peer)
        peer.settimeout(self.peer_timeout)
        t0 = time.perf_counter()
        try:
            _send(peer, {"t": "offer", "files": self.image_files, "chunk_size": self.chunk_size,
                         "slots": self.slots, "mode": self.mode})  # fmt: skip
            _recv(peer, "accept")
            t_launch = time.perf_counter()
            hello = self.link.call("__mig_out_start")
            _send(peer, {"t": "hs", "data": hello})
            while True:
                reply = self.link.call("__mig_hs", _recv(peer, "hs")["data"])
                if reply["send"]:
                    _send(peer, {"t": "hs", "data": reply["send"]})
                if reply["done"]:
                    break
            t_hs = time.perf_counter()
            ring = ShmRing.create(self.slots, _slot_size(self.chunk_size), RingRole.CONSUMER)
            try:
                self.link.give_ring(ring)
                if self.mode == "pipelined":
                    mover = _Worker(lambda: ring_to_socket(ring, peer, timeout=RING_TIMEOUT),
                                    "migsgx-send", ring)  # fmt: skip
                    dump = _call_beside(self.link, mover, "__mig_dump", self.chunk_size)
                    mover.join()
                    t_dumped = t_sent = time.perf_counter()
                else:
                    staging = _Staging.for_memory(self.info.memory_size, self.chunk_size)
                    try:
                        drainer = _Worker(
                            lambda: staging.drain(ring, RING_TIMEOUT), "migsgx-drain", ring
                        )
                        dump = _call_beside(self.link, drainer, "__mig_dump", self.chunk_size)
                        drainer.join()
                        t_dumped = time.perf_counter()
                        staging.send(peer)
                        t_sent = time.perf_counter()
                    finally:
                        staging.close()
            finally:
                ring.close()
            loaded = _recv(peer, "loaded")
            self.link.call("__mig_loaded", loaded["frame"])
            self._loaded = True
        except BaseException as exc:
            self._abort_quietly(f"{type(exc).__name__}: {exc}")
            raise
        t_end = time.perf_counter()
        self.stats = {
            "mode": self.mode,
            "chunk_bytes": self.chunk_size,
            "bytes": dump["bytes"],
            "memory_bytes": dump["memory_bytes"],
            "launch_seconds": t_launch - t0,
            "handshake_seconds": t_hs - t_launch,
            "quiesce_seconds": dump["quiesce_seconds"],
            "dump_seconds": t_dumped - t_hs,
            "send_seconds": t_sent - t_dumped,
            "load_wait_seconds": t_end - t_sent,
            "transfer_seconds": t_end - t_hs,
            "destination": loaded["stats"],
        }
        return self.stats

    def commit(self) -> None:
        """Give the state up for good: the source enclave wipes itself and exits."""

        if not self._loaded or self.peer is None:
            raise MigrationError("commit before the destination confirmed the load")
        token = self.link.call("__mig_commit")
        self._finished = True
        # From here on the destination is the only copy; the token may be re-sent.
        self.token = token
        _send(self.peer, {"t": "commit", "token": token})
        while _recv(self.peer, "active", "loaded")["t"] != "active":
            pass  # a LOADED delivered twice changes nothing now: the decision is made

    def abort(self, reason: str) -> socket.socket:
        """The source enclave resumes with its state; returns its connection."""

        self._abort_quietly(reason)
        return self.link.sock

    def _abort_quietly(self, reason: str) -> None:
        if self._finished:
            return
        self._finished = True
        frame = b""
        with contextlib.suppress(MigSGXError, OSError):
            frame = self.link.call("__mig_abort", reason[:200])
        if self.peer is not None:
            with contextlib.suppress(MigSGXError, OSError):
                _send(self.peer, {"t": "abort", "code": "aborted", "message": reason[:200],
                                  "frame": frame or b""})  # fmt: skip


class IncomingEnclave:
    """Destination side: launch a fresh enclave, load the state, run on COMMIT."""

    def __init__(self, image_files: Mapping[str, bytes], platform_socket: Path | str) -> None:
        self.image = EnclaveImage.from_files(dict(image_files))
        self.platform_socket = Path(platform_socket)
        self.link: EnclaveLink | None = None
        self.info: EnclaveInfo | None = None
        self.peer: socket.socket | None = None
        self.stats: dict[str, Any] = {}
        self.rejected: list[MigSGXError] = []

    @classmethod
    def accept_offer(
        cls, peer: socket.socket, platform_socket: Path | str
    ) -> tuple[IncomingEnclave, dict[str, Any]]:
        """Read the source's offer from ``peer`` and prepare to receive it."""

        bind_wire(peer, Role.DESTINATION)
        offer = _recv(peer, "offer")
        check_offer(offer)
        return cls(offer["files"], platform_socket), offer

    def receive(self, peer: socket.socket, offer: dict[str, Any] | None = None) -> dict[str, Any]:
        """Launch, handshake and load; LOADED goes to the source.  Not running yet."""

        self.peer = peer
        tune_socket(peer)
        if offer is None:
            fresh, offer = IncomingEnclave.accept_offer(peer, self.platform_socket)
            self.image = fresh.image
        t0 = time.perf_counter()
        try:
            sock, self.info = launch_enclave(self.image, socket_path=self.platform_socket)
            self.link = EnclaveLink(sock)
            self.link.call("__mig_in_start")
            _send(peer, {"t": "accept", "pid": self.info.pid})
            t_launch = time.perf_counter()
            while True:
                reply = self.link.call("__mig_hs", _recv(peer, "hs")["data"])
                if reply["send"]:
                    _send(peer, {"t": "hs", "data": reply["send"]})
                if reply["done"]:
                    break
            t_hs = time.perf_counter()
            chunk = offer["chunk_size"]
            ring = ShmRing.create(offer["slots"], _slot_size(chunk), RingRole.PRODUCER)
            try:
                self.link.give_ring(ring)
                if offer["mode"] == "pipelined":
                    mover = _Worker(
                        lambda: socket_to_ring(peer, ring, timeout=RING_TIMEOUT),
                        "migsgx-recv",
                        ring,
                    )
                    result = _call_beside(self.link, mover, "__mig_load")
                    mover.join()
                    t_recv = t_hs
                else:
                    staging = _Staging.for_memory(self.info.memory_size, chunk)
                    try:
                        staging.receive(peer, _slot_size(chunk))
                        t_recv = time.perf_counter()
                        filler = _Worker(
                            lambda: staging.fill(ring, RING_TIMEOUT), "migsgx-fill", ring
                        )
                        result = _call_beside(self.link, filler, "__mig_load")
                        filler.join()
                    finally:
                        staging.close()
            finally:
                ring.close()
            if _bytes_waiting(peer):
                # The source sends nothing after its final chunk until it has LOADED.
                raise StreamError("the peer sent more after the final chunk of the state")
        except BaseException as exc:
            reason = f"{type(exc).__name__}: {exc}"
            self._abort_quietly(reason)
            with contextlib.suppress(MigSGXError, OSError):
                _send(peer, {"t": "abort", "code": "destination-failed", "message": reason[:200],
                             "frame": b""})  # fmt: skip
            raise
        t_end = time.perf_counter()
        self.stats = {
            "launch_seconds": t_launch - t0,
            "handshake_seconds": t_hs - t_launch,
            "receive_seconds": t_recv - t_hs,
            "load_seconds": t_end - t_recv,
            "bytes": result["bytes"],
        }
        _send(peer, {"t": "loaded", "frame": result["loaded"], "stats": self.stats})
        return self.stats

    def wait_commit(self, timeout: float | None = None) -> socket.socket:
        """Wait for the source's decision; on COMMIT the enclave runs: return its connection.

        Only the destination enclave judges the decision.  A COMMIT token or an
        ABORT frame that it does not find authentic changes nothing and the wait
        goes on (``docs/spec/handshake.md``, 9.2): the untrusted side cannot talk
        the destination out of its copy while the source may have committed.
        Rejected frames are kept in :attr:`rejected`.  On a timeout the copy is
        kept, in doubt; :meth:`abort` discards it.
        """

        if self.peer is None or self.link is None:
            raise MigrationError("nothing was received")
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise MigrationError("no authentic decision from the source in time")
            self.peer.settimeout(remaining)
            try:
                msg = recv_frame(self.peer, PEER, max_size=PEER_FRAME_MAX)
            except TimeoutError as exc:
                raise MigrationError("no authentic decision from the source in time") from exc
            finally:
                with contextlib.suppress(OSError):
                    self.peer.settimeout(None)
            if msg["t"] not in ("commit", "abort"):
                raise ProtocolError(f"expected commit or abort, got {msg['t']!r}")
            _check_received(self.peer, msg)
            frame = msg["token"] if msg["t"] == "commit" else msg["frame"]
            try:
                self.link.call("__mig_commit_in", frame)
            except (CommitError, FrameError) as exc:
                self.rejected.append(exc)  # not from the source: nothing changed
                continue
            except ReplayError:
                self._abort_quietly("this migration id was committed before")
                raise
            except MigrationError as exc:
                if type(exc) is not MigrationError:
                    raise
                # The enclave found an authentic ABORT: the source runs on.
                self._abort_quietly("the source aborted")
                raise MigrationError(f"the source aborted: {msg.get('message', '')}") from exc
            _send(self.peer, {"t": "active"})
            return self.link.sock

    def abort(self) -> None:
        self._abort_quietly("aborted by the destination")

    def _abort_quietly(self, reason: str, *, peer_frame: bytes = b"") -> None:
        """Discard the destination enclave: it never ran with this state."""

        if self.link is None:
            return
        with contextlib.suppress(MigSGXError, OSError):
            self.link.call("__mig_abort", reason[:200])
        with contextlib.suppress(OSError):
            self.link.sock.close()
        self.link = None
