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
import queue
import select
import socket
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import Any, Final

from ..core.commit import CommitError
from ..core.handshake import Role
from ..core.peer import MODES, PEER_FRAME_MAX, SCHEMA, PeerProtocol, check_offer
from ..core.stream import TAG_SIZE
from ..errors import (
    ConnectionClosedError,
    EnclaveLostError,
    FrameError,
    InDoubtError,
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
from .ring import RingPeerGoneError, RingRole, ShmRing, send_ring_fds
from .transport import (
    PeerWatch,
    Staging,
    context_switches,
    keep_alive,
    ring_to_socket,
    socket_to_ring,
    tune_socket,
)

DEFAULT_CHUNK = DEFAULT_CHUNK_SIZE
PEER = SCHEMA

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
        #: Fault injection (the tool's ``tool.ring-handover``): runs between the
        #: ``__mig_ring`` frame and the descriptors that follow it.
        self.before_ring_fds: Callable[[], None] | None = None

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
            if self.before_ring_fds is not None:
                self.before_ring_fds()
            send_ring_fds(self.sock, ring)
            msg = recv_frame(self.sock, ECALL, max_size=ECALL_FRAME_MAX)
        if msg["t"] == "err":
            raise error_from_wire(msg["code"], msg["message"])

    def hold(self) -> int:
        """Give the enclave a duplicate of our end of this connection (``__mig_hold``).

        From then on our death (and that of every other holder) is no end of
        file for the enclave: it keeps its state until someone takes the
        duplicate back from it (root, ``pidfd_getfd``) or it aborts.  Returns
        the duplicate's descriptor number in the enclave process.
        """

        from ..channel import ECALL, ECALL_FRAME_MAX

        with self._lock:
            self._ids += 1
            call_id = self._ids
            send_frame(self.sock, {"t": "ecall", "id": call_id, "fn": "__mig_hold", "args": []})
            socket.send_fds(self.sock, [b"H"], [self.sock.fileno()])
            msg = recv_frame(self.sock, ECALL, max_size=ECALL_FRAME_MAX)
        if msg["t"] == "err":
            raise error_from_wire(msg["code"], msg["message"])
        return int(msg["value"])


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
    (If the enclave itself is gone, that is the cause.)  A worker that failed only
    because the enclave shut its ring end (the enclave refused the stream) is
    not: the enclave's own error is.
    """

    try:
        return link.call(name, *args)
    except EnclaveLostError:
        raise
    except MigSGXError as exc:
        if isinstance(worker.error, MigSGXError) and not isinstance(
            worker.error, RingPeerGoneError
        ):
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
#: How long the source waits for the destination's reason once it refused the stream.
REFUSAL_WAIT = 2.0


def dump_watched(
    link: EnclaveLink, ring: ShmRing, peer: socket.socket, chunk_size: int
) -> dict[str, Any]:
    """``__mig_dump`` with its slots sent as they fill; a refusal fails the send at once.

    The destination sends nothing before the final chunk but its refusal; a
    :class:`PeerWatch` turns that into a failed send (and the destination's
    reason) instead of a wait for the kernel to give up on the connection.
    """

    watch = PeerWatch(peer)
    try:
        mover = _Worker(
            lambda: ring_to_socket(ring, peer, timeout=RING_TIMEOUT,
                                   before_final=watch.final_going),
            "migsgx-send", ring,
        )  # fmt: skip
        dump: dict[str, Any] = _call_beside(link, mover, "__mig_dump", chunk_size)
        mover.join()
    except MigSGXError as exc:
        if watch.spoke:
            _refusal(peer, exc)
        raise
    finally:
        watch.stop()
    return dump


def _refusal(peer: socket.socket, cause: BaseException) -> None:
    """The destination spoke during the stream: raise its reason (or ``cause``)."""

    with contextlib.suppress(OSError):
        peer.settimeout(REFUSAL_WAIT)
    try:
        msg = recv_frame(peer, PEER, max_size=PEER_FRAME_MAX)
    except (MigSGXError, OSError):
        return  # it hung up without a word: the send's own error says enough
    if msg.get("t") == "abort":
        raise MigrationError(
            f"the destination refused the stream: [{msg['code']}] {msg['message']}"
        ) from cause
    raise ProtocolError(f"the destination sent {msg['t']!r} during the stream") from cause


#: The longest a handshake waits for memory faulted in ahead of the freeze (seconds):
#: the destination's answer for its enclave's memory and staging buffer, the source's
#: end for its staging buffer (sequential mode).  The source still serves meanwhile.
PREFAULT_WAIT: Final = 10.0

#: The bound on ``active`` after a token went on the data connection; the
#: destination judges a token in milliseconds, and the token goes again by the
#: agents' TLS channel anyway.
DELIVER_TIMEOUT = 3.0
#: How long ``active`` may still come after the destination said ``rejected``.
REJECTED_GRACE = 0.5


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
        memory_hint: bool = True,
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
        #: Whether the offer tells the destination how much memory to fault in ahead.
        self.memory_hint = memory_hint
        self.peer: socket.socket | None = None
        self.stats: dict[str, Any] = {}
        self._loaded = False
        self._finished = False
        self.token: bytes | None = None
        self.migration_id: bytes | None = None
        self.abort_frame = b""
        #: Called with (index, migration id) once the handshake finished (the journal).
        self.on_handshake: Callable[[int, bytes], None] | None = None
        self.index = 0
        #: The side channel an early handshake ran on, until the dump is over.
        self.early_side: socket.socket | None = None
        self._times: tuple[float, float, float] | None = None  # offer, accept, handshake done
        self._mode = mode  # of the transfer under way (a re-delivery is never live)
        #: Sequential mode: the staging buffer, made and faulted in at the handshake.
        self._staging: Staging | None = None

    def handshake(self, peer: socket.socket) -> None:
        """The offer, the destination enclave's launch and the attested handshake.

        Nothing of the state moves and the enclave is not quiesced: with ``sock``
        a side channel (:meth:`~migsgx.host.client.EnclaveClient.open_side_channel`),
        this runs while the application still calls its enclave, and
        :meth:`adopt` then takes the application's connection for the dump.
        Called by :meth:`transfer` when it was not called before.
        """

        self._handshake(peer, "__mig_out_start", self.mode)

    def redeliver(self, peer: socket.socket) -> bytes:
        """Committed, the destination enclave lost before it claimed: the state again.

        The source enclave runs a new handshake (same migration id, the same
        destination platform only) and dumps its frozen state again to a fresh
        destination enclave on ``peer``; on its LOADED it issues a COMMIT token
        for that session, which goes on ``peer`` at once (and again with
        ``resume``).  Returns the token.  Raises :class:`InDoubtError` if the
        new copy did not confirm that it runs.
        """

        if self.token is None:
            raise MigrationError("nothing was committed")
        self._loaded = False
        self._times = None
        try:
            self._handshake(peer, "__mig_redeliver_start", "sequential"
                            if self.mode == "sequential" else "pipelined")  # fmt: skip
            self.transfer(peer)
            self.token = bytes(self.link.call("__mig_commit"))
        except (MigSGXError, OSError) as exc:
            raise InDoubtError(f"the state could not be delivered again: {exc}") from exc
        self.deliver()
        return self.token

    def _handshake(self, peer: socket.socket, start: str, mode: str) -> None:
        self.peer = peer
        self._mode = mode
        bind_wire(peer, Role.SOURCE)
        tune_socket(peer)
        keep_alive(peer)
        peer.settimeout(self.peer_timeout)
        t0 = time.monotonic()
        try:
            offer = {"t": "offer", "files": self.image_files, "chunk_size": self.chunk_size,
                     "slots": self.slots, "mode": mode}  # fmt: skip
            used = self._memory_used(mode)
            if used and self.memory_hint:
                offer["memory_hint"] = used
            if mode == "sequential":
                self._stage_ahead(used)
            _send(peer, offer)
            _recv(peer, "accept")
            t_launch = time.monotonic()
            hello = self.link.call(start)
            _send(peer, {"t": "hs", "data": hello})
            while True:
                reply = self.link.call("__mig_hs", _recv(peer, "hs")["data"])
                if reply["send"]:
                    _send(peer, {"t": "hs", "data": reply["send"]})
                if reply["done"]:
                    break
            self.migration_id = bytes(reply["migration_id"])
            if self._staging is not None:
                # The freeze follows the handshake: the staging buffer is in by then.
                self._staging.wait_ahead(PREFAULT_WAIT)
            if self.on_handshake is not None and start == "__mig_out_start":
                self.on_handshake(self.index, self.migration_id)
        except BaseException as exc:
            self._abort_quietly(f"{type(exc).__name__}: {exc}")
            raise
        self._times = (t0, t_launch, time.monotonic())

    def _stage_ahead(self, used: int) -> None:
        """Sequential mode: the staging buffer now, its first ``used`` bytes faulted in
        while the source still runs (:meth:`Staging.prefault_ahead`)."""

        if self._staging is not None:
            self._staging.close()
        self._staging = Staging.for_state(self.info.memory_size, self.chunk_size, TAG_SIZE)
        self._staging.prefault_ahead(Staging.staged_size(used, self.chunk_size, TAG_SIZE))

    def _close_staging(self) -> None:
        staging, self._staging = self._staging, None
        if staging is not None:
            staging.close()

    def _memory_used(self, mode: str) -> int:
        """The enclave memory in use now (0: not known), for the destination's and the
        staging buffer's faulting in ahead.

        Not for a live migration, whose rounds fill the destination's memory
        while the source runs anyway.  An enclave that does not say costs nothing.
        """

        if mode == "live" or not (self.memory_hint or mode == "sequential"):
            return 0
        try:
            used = self.link.call("__mig_status").get("memory_used")
        except ProtocolError:
            return 0
        return used if isinstance(used, int) and not isinstance(used, bool) and used > 0 else 0

    def adopt(self, app_sock: socket.socket) -> None:
        """After an early :meth:`handshake`: the dump and the commit go on the application's
        connection (handed over at the freeze); the side channel closes after the dump."""

        if self._times is None:
            raise RuntimeError("adopt() before handshake()")
        self.early_side = self.link.sock
        self.link = EnclaveLink(app_sock)

    def close_side(self) -> None:
        if self.early_side is not None:
            with contextlib.suppress(OSError):
                self.early_side.close()
            self.early_side = None

    def transfer(self, peer: socket.socket) -> dict[str, Any]:
        """Everything up to the destination's verified LOADED; nothing is given up yet."""

        if self._times is None:
            self.handshake(peer)
        assert self._times is not None and self.peer is not None
        peer = self.peer
        t0, t_launch, t_hs = self._times
        t_freeze = time.monotonic()  # after an early handshake, the freeze came in between
        c_freeze = time.process_time()
        s_freeze = context_switches()
        staged_ahead = 0
        try:
            ring = ShmRing.create(self.slots, _slot_size(self.chunk_size), RingRole.CONSUMER)
            try:
                self.link.give_ring(ring)
                if self._mode == "pipelined":
                    dump = dump_watched(self.link, ring, peer, self.chunk_size)
                    t_dumped = t_sent = time.monotonic()
                    c_dumped = c_sent = time.process_time()
                else:
                    staging = self._staging or Staging.for_state(
                        self.info.memory_size, self.chunk_size, TAG_SIZE
                    )
                    self._staging = None
                    try:
                        drainer = _Worker(
                            lambda: staging.drain(ring, RING_TIMEOUT), "migsgx-drain", ring
                        )
                        dump = _call_beside(self.link, drainer, "__mig_dump", self.chunk_size)
                        drainer.join()
                        t_dumped = time.monotonic()
                        c_dumped = time.process_time()
                        staging.send(peer)
                        t_sent = time.monotonic()
                        c_sent = time.process_time()
                    finally:
                        staging.close()
                        staged_ahead = staging.prefaulted
            finally:
                ring.close()
            self.close_side()  # dumped: its closing no longer aborts the migration
            loaded = _recv(peer, "loaded")
            self.link.call("__mig_loaded", loaded["frame"])
            self._loaded = True
        except BaseException as exc:
            self._abort_quietly(f"{type(exc).__name__}: {exc}")
            raise
        t_end = time.monotonic()
        c_end = time.process_time()
        s_end = context_switches()
        self.stats = {
            "mode": self._mode,
            # Sequential: the staging buffer's bytes faulted in before the freeze.
            "staging_prefaulted_bytes": staged_ahead,
            "chunk_bytes": self.chunk_size,
            "bytes": dump["bytes"],
            "memory_bytes": dump["memory_bytes"],
            "launch_seconds": t_launch - t0,
            "handshake_seconds": t_hs - t_launch,
            "quiesce_seconds": dump["quiesce_seconds"],
            "dump_seconds": t_dumped - t_freeze,
            "send_seconds": t_sent - t_dumped,
            "load_wait_seconds": t_end - t_sent,
            "transfer_seconds": t_end - t_freeze,
            "enclave_cpu_seconds": dump.get("cpu_seconds", 0.0),
            # This (driver) process's CPU seconds in each phase since the freeze.
            "driver_cpu": {
                "dump": c_dumped - c_freeze,
                "send": c_sent - c_dumped,
                "load_wait": c_end - c_sent,
            },
            "driver_switches": s_end - s_freeze,
            "enclave_switches": dump.get("switches", 0),
            "destination": loaded["stats"],
            # Absolute CLOCK_MONOTONIC times (one clock per host), per process.
            "timeline": {
                "source_driver": {
                    "launch": [t0, t_launch], "handshake": [t_launch, t_hs],
                    "dump": [t_freeze, t_dumped], "send": [t_dumped, t_sent],
                    "load_wait": [t_sent, t_end],
                },
                "source_enclave": dump.get("timeline", {}),
            },
        }  # fmt: skip
        return self.stats

    def commit(self) -> None:
        """Decide COMMIT, deliver the token, and release the source once the destination runs.

        Raises :class:`InDoubtError` when the destination did not confirm (the
        decision stands; the source enclave keeps its frozen state), and any
        other error only if nothing was decided.
        """

        self.decide()
        self.deliver()
        self.release()

    def join_group(self, group: bytes) -> None:
        """Before any enclave of the migration decides: the migration's group id.

        With it the source host's platform store keeps the enclaves of one
        application together: once one committed, an abort of another is
        refused and that enclave commits instead (``docs/spec/commit.md``, 1.1).
        """

        self.link.call("__mig_group", bytes(group))

    def decide(self) -> bytes:
        """Decide COMMIT (durably, in the source enclave) and return the token.

        The source enclave keeps its frozen state until :meth:`release`.  Raises
        only if nothing was decided (then :meth:`abort` is still possible).
        """

        if not self._loaded or self.peer is None:
            raise MigrationError("commit before the destination confirmed the load")
        token = bytes(self.link.call("__mig_commit"))
        self._finished = True
        # The token is not secret and may be delivered any number of times.
        self.token = token
        return token

    def deliver(self, frame: bytes | None = None) -> None:
        """Carry the token over the data connection and wait for ``active``.

        Raises :class:`InDoubtError` if that fails: the decision stands, and the
        token goes again by another way (the agents' TLS channel).  ``frame``
        replaces the token (fault injection: a token damaged on the way).
        """

        if self.token is None or self.peer is None:
            raise MigrationError("nothing was committed")
        try:
            self.peer.settimeout(DELIVER_TIMEOUT)
            _send(self.peer, {"t": "commit", "token": self.token if frame is None else frame})
            while (kind := _recv(self.peer, "active", "loaded", "rejected")["t"]) != "active":
                if kind == "rejected":
                    # A frame was not authentic: this token, damaged on the way, or one
                    # forged beside it (then ``active`` follows at once).  Not waiting
                    # long: the token goes again by the agents' TLS channel anyway.
                    self.peer.settimeout(REJECTED_GRACE)
                # a LOADED delivered twice changes nothing now: the decision is made
        except (MigSGXError, OSError) as exc:
            raise InDoubtError(f"the COMMIT token did not reach the destination: {exc}") from exc

    def release(self) -> None:
        """The destination confirmed it runs: the source enclave wipes itself and exits."""

        self.link.call("__mig_release")

    def abort(
        self,
        reason: str,
        *,
        none_committed: bool = False,
        answered: Callable[[], object] | None = None,
    ) -> socket.socket:
        """The source enclave resumes with its state; returns its connection.

        ``none_committed``: the caller decided every enclave of the migration and
        none committed, so the enclave may abort even if its platform store cannot
        record it (``__mig_abort``, ``docs/spec/commit.md`` 1.1 rule 4).
        ``answered`` runs once the enclave answered, before its ABORT frame goes
        on the data connection (the tool's fault point ``tool.abort-answered``).
        """

        self._abort_quietly(reason, none_committed=none_committed, answered=answered)
        self.close_side()
        return self.link.sock

    def _abort_quietly(
        self,
        reason: str,
        *,
        none_committed: bool = False,
        answered: Callable[[], object] | None = None,
    ) -> None:
        self._close_staging()
        if self._finished:
            return
        self._finished = True
        frame = b""
        with contextlib.suppress(MigSGXError, OSError):
            frame = self.link.call("__mig_abort", reason[:200], none_committed)
        self.abort_frame = bytes(frame or b"")
        if answered is not None:
            answered()
        if self.peer is not None:
            with contextlib.suppress(MigSGXError, OSError):
                _send(self.peer, {"t": "abort", "code": "aborted", "message": reason[:200],
                                  "frame": frame or b""})  # fmt: skip


class _SourceGone:
    """In a decision inbox: no frame can come (:meth:`IncomingEnclave.source_gone`)."""


_SOURCE_GONE: Final = _SourceGone()


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
        #: Set before LOADED leaves: from then on this may be the only copy.
        self.awaiting = False
        #: The migration id, once the handshake completed (names its reservation here).
        self.migration_id = b""
        #: A decision could not be judged: the enclave lives but its platform service
        #: does not (it waits on, in doubt, for the service and a delivery).
        self.platform_blocked = False
        self.decided = False
        self._inbox: queue.Queue[bytes | _SourceGone | None] = queue.Queue()
        #: Whether the destination enclave faults its memory in beside the load.
        #: Off: paired runs at 1 GiB showed no gain on two cores (docs/benchmarks.md).
        self.prefault = False
        #: Whether the destination enclave faults in, from its launch on (before the
        #: source freezes), as much memory as the offer's hint says the source uses.
        self.prefault_ahead = True
        #: How long the handshake's answer waits for that memory to be in (0: not at
        #: all): the source freezes only after it, so the first touch stays out of
        #: the frozen window (it ran on into it beside the load or CRIU's dump).
        self.prefault_wait = PREFAULT_WAIT
        #: Called right after the destination enclave's launch (a benchmark's
        #: measurement of the enclave at rest).
        self.launched: Callable[[], None] | None = None

    def _wait_prefault(self) -> None:
        """Up to :attr:`prefault_wait` seconds for the enclave's prefault ahead to end."""

        assert self.link is not None
        if self.prefault_wait <= 0:
            return
        t0 = time.monotonic()
        with contextlib.suppress(ProtocolError):  # an enclave without it: no wait
            reply = self.link.call("__mig_prefault_wait", self.prefault_wait)
            self.stats["prefault_done_before_freeze"] = bool(reply["done"])
        self.stats["prefault_wait_seconds"] = time.monotonic() - t0

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
        keep_alive(peer)
        if offer is None:
            fresh, offer = IncomingEnclave.accept_offer(peer, self.platform_socket)
            self.image = fresh.image
        t0 = time.monotonic()
        staging: Staging | None = None
        try:
            hint = offer.get("memory_hint") or 0
            if self.prefault_ahead and hint and offer["mode"] == "sequential":
                # The receive's first touch, from before the enclave's launch on (the
                # launch and the handshake give it time); within the declared memory.
                chunk = offer["chunk_size"]
                staging = Staging.for_state(self.image.manifest.memory_size, chunk, TAG_SIZE)
                staging.prefault_ahead(Staging.staged_size(hint, chunk, TAG_SIZE))
            sock, self.info = launch_enclave(self.image, socket_path=self.platform_socket)
            self.link = EnclaveLink(sock)
            if self.launched is not None:
                self.launched()
            self.link.call("__mig_in_start")
            ahead = waited = False
            if self.prefault_ahead and hint and offer["mode"] != "live":
                with contextlib.suppress(ProtocolError):  # a hint: an enclave may decline
                    ahead = bool(self.link.call("__mig_prefault", hint))
            _send(peer, {"t": "accept", "pid": self.info.pid})
            t_launch = time.monotonic()
            while True:
                reply = self.link.call("__mig_hs", _recv(peer, "hs")["data"])
                if reply["send"] and (ahead or staging is not None) and not waited:
                    # destination-hello: the source freezes once it has it, so it waits
                    # for the memory to be in (the source still serves meanwhile).
                    waited = True
                    if ahead:
                        self._wait_prefault()
                    if staging is not None:
                        staging.wait_ahead(self.prefault_wait)
                if reply["send"]:
                    _send(peer, {"t": "hs", "data": reply["send"]})
                if reply["done"]:
                    break
            self.migration_id = bytes(reply.get("migration_id") or b"")
            t_hs = time.monotonic()
            c_hs = c_recv = time.process_time()
            s_hs = context_switches()
            chunk = offer["chunk_size"]
            if offer["mode"] == "live":
                self.stats["rounds"] = self._receive_rounds(peer, offer)
            ring = ShmRing.create(offer["slots"], _slot_size(chunk), RingRole.PRODUCER)
            try:
                self.link.give_ring(ring)
                if offer["mode"] in ("pipelined", "live"):
                    mover = _Worker(
                        lambda: socket_to_ring(peer, ring, timeout=RING_TIMEOUT),
                        "migsgx-recv",
                        ring,
                    )
                    result = _call_beside(self.link, mover, "__mig_load", self.prefault)
                    mover.join()
                    t_recv = t_hs
                else:
                    staging = staging or Staging.for_state(self.info.memory_size, chunk, TAG_SIZE)
                    try:
                        staging.receive(peer, _slot_size(chunk))
                        t_recv = time.monotonic()
                        c_recv = time.process_time()
                        filler = _Worker(
                            lambda: staging.fill(ring, RING_TIMEOUT), "migsgx-fill", ring
                        )
                        result = _call_beside(self.link, filler, "__mig_load", self.prefault)
                        filler.join()
                    finally:
                        staging.close()
            finally:
                ring.close()
            if _bytes_waiting(peer):
                # The source sends nothing after its final chunk until it has LOADED.
                raise StreamError("the peer sent more after the final chunk of the state")
            if result.get("repair"):
                result = self._receive_repair(peer, offer, result)
        except BaseException as exc:
            if staging is not None:
                staging.close()
            reason = f"{type(exc).__name__}: {exc}"
            self._abort_quietly(reason)
            with contextlib.suppress(MigSGXError, OSError):
                _send(peer, {"t": "abort", "code": "destination-failed", "message": reason[:200],
                             "frame": b""})  # fmt: skip
            raise
        t_end = time.monotonic()
        c_end = time.process_time()
        s_end = context_switches()
        self.stats = {
            **self.stats,
            "launch_seconds": t_launch - t0,
            "handshake_seconds": t_hs - t_launch,
            "receive_seconds": t_recv - t_hs,
            "load_seconds": t_end - t_recv,
            "bytes": result["bytes"],
            # live mode: the destination enclave's pass of the memory digest check
            "verify_seconds": result.get("verify_seconds", 0.0),
            "repair": result.get("repair_figures"),
            "enclave_cpu_seconds": result.get("cpu_seconds", 0.0),
            "prefaulted_bytes": result.get("prefaulted_bytes", 0),
            "staging_prefaulted_bytes": staging.prefaulted if staging is not None else 0,
            # This (driver) process's CPU seconds in each phase after the handshake.
            "driver_cpu": {"receive": c_recv - c_hs, "load": c_end - c_recv},
            "driver_switches": s_end - s_hs,
            "enclave_switches": result.get("switches", 0),
            "timeline": {
                "destination_driver": {
                    "launch": [t0, t_launch], "handshake": [t_launch, t_hs],
                    "receive": [t_hs, t_recv], "load": [t_recv, t_end],
                },
                "destination_enclave": result.get("timeline", {}),
            },
        }  # fmt: skip
        self.awaiting = True
        _send(peer, {"t": "loaded", "frame": result["loaded"], "stats": self.stats})
        return self.stats

    def _receive_repair(
        self, peer: socket.socket, offer: dict[str, Any], first: dict[str, Any]
    ) -> dict[str, Any]:
        """Live mode: the segments our enclave found different come again, once (precopy.md 3.3)."""

        _send(peer, {"t": "repair", "segments": first["repair"]})
        again = self._loaded_beside(peer, offer, "__mig_load_repair")
        if _bytes_waiting(peer):
            raise StreamError("the peer sent more after the final chunk of the repair")
        return {
            **first,
            "loaded": again["loaded"],
            "bytes": first["bytes"] + again["repair"]["bytes"],
            "repair_figures": again["repair"],
        }

    def _receive_rounds(self, peer: socket.socket, offer: dict[str, Any]) -> list[dict[str, Any]]:
        """Live mode: apply pre-copy rounds until the source announces the final transfer.

        Each round has a ring of its own (a ring ends with its final slot).
        """

        rounds: list[dict[str, Any]] = []
        while _recv(peer, "round", "final")["t"] == "round":
            stats = self._loaded_beside(peer, offer, "__mig_load_round")
            rounds.append(stats)
            _send(peer, {"t": "round_done", "stats": stats})
        return rounds

    def _loaded_beside(
        self, peer: socket.socket, offer: dict[str, Any], name: str
    ) -> dict[str, Any]:
        """The enclave's ``name`` call loads from a ring of its own while a worker fills
        the ring from ``peer``; the call's figures once both are done (a round or a
        repair: each ends its ring with a final slot).  The receiving twin of
        :meth:`migsgx.datapath.live.LiveOutgoingEnclave._sent_beside`."""

        assert self.link is not None
        ring = ShmRing.create(offer["slots"], _slot_size(offer["chunk_size"]), RingRole.PRODUCER)
        try:
            self.link.give_ring(ring)
            mover = _Worker(partial(socket_to_ring, peer, ring, timeout=RING_TIMEOUT),
                            "migsgx-recv", ring)  # fmt: skip
            figures: dict[str, Any] = _call_beside(self.link, mover, name)
            mover.join()
        finally:
            ring.close()
        return figures

    def wait_commit(
        self,
        timeout: float | None = None,
        before_claim: Callable[[], None] | None = None,
        after_claim: Callable[[], None] | None = None,
    ) -> socket.socket:
        """Wait for the source's decision; on COMMIT the enclave runs: return its connection.

        Only the destination enclave judges the decision.  A COMMIT token or an
        ABORT frame that it does not find authentic changes nothing and the wait
        goes on (``docs/spec/handshake.md``, 9.2): the untrusted side cannot talk
        the destination out of its copy while the source may have committed.
        Rejected frames are kept in :attr:`rejected`.  Decisions come on the
        data connection or through :meth:`deliver` (the agents' TLS channel,
        ``docs/spec/commit.md``); a lost data connection ends nothing.  On a
        timeout the copy is kept, in doubt.
        """

        if self.peer is None or self.link is None:
            raise MigrationError("nothing was received")
        threading.Thread(
            target=self._read_peer, args=(self.peer,), name="migsgx-decision", daemon=True
        ).start()
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise MigrationError("no authentic decision from the source in time")
            try:
                frame = self._inbox.get(timeout=remaining)
            except queue.Empty as exc:
                raise MigrationError("no authentic decision from the source in time") from exc
            if frame is None:
                continue  # the data connection is gone; a delivery may still come
            if isinstance(frame, _SourceGone):
                self.decided = True
                self._abort_quietly("the source enclave died before it decided")
                raise MigrationError(
                    "the source enclave died before it decided: no decision can come"
                )
            if before_claim is not None:
                before_claim()  # (fault injection: window W2)
            if self.link is None:
                raise MigrationError("the destination enclave is gone")
            try:
                self.link.call("__mig_commit_in", frame)
            except EnclaveLostError as exc:
                if self._answers():
                    # The enclave lives, its platform service does not (the claim
                    # needs it): the copy waits on; a later delivery may find the
                    # service back, and the enclave re-attaches to it.
                    self.platform_blocked = True
                    self.rejected.append(exc)
                    continue
                # This copy is gone: tell the source side at once (no "active" will come).
                with contextlib.suppress(OSError):
                    self.peer.shutdown(socket.SHUT_RDWR)
                raise
            except (CommitError, FrameError) as exc:
                self.rejected.append(exc)  # not from the source: nothing changed
                with contextlib.suppress(MigSGXError, OSError):
                    _send(self.peer, {"t": "rejected"})  # a hint: deliver it again
                continue
            except ReplayError:
                self.decided = True
                self._abort_quietly("this migration id was committed before")
                raise
            except MigrationError as exc:
                if type(exc) is not MigrationError:
                    raise
                # The enclave found an authentic ABORT (and discarded itself): the source runs on.
                self.decided = True
                self._abort_quietly("the source aborted")
                raise MigrationError("the source aborted") from exc
            self.decided = True
            if after_claim is not None:
                after_claim()  # (fault injection: window W3)
            with contextlib.suppress(MigSGXError, OSError):
                _send(self.peer, {"t": "active"})
            return self.link.sock

    def _answers(self) -> bool:
        if self.link is None:
            return False
        try:
            self.link.call("__mig_status")
        except MigSGXError:
            return False
        return True

    def source_gone(self) -> None:
        """The source host says the source enclave died before it was asked to decide.

        Only the session's own tool says so (on its mutual-TLS control connection):
        that enclave can never make a COMMIT token, so this copy can never run,
        and keeping it held only leaves a stopped tree and an enclave for good.
        A host that lied would only give up a copy whose token it alone could
        deliver (``docs/spec/commit.md``, section 5, W1).
        """

        self._inbox.put(_SOURCE_GONE)

    def deliver(self, frame: bytes) -> None:
        """A decision frame from elsewhere (re-delivered): judged like one from the peer."""

        self.platform_blocked = False  # until this one, too, could not be judged
        self._inbox.put(bytes(frame))

    def _read_peer(self, peer: socket.socket) -> None:
        with contextlib.suppress(OSError):
            peer.settimeout(None)
        while True:
            try:
                msg = recv_frame(peer, PEER, max_size=PEER_FRAME_MAX)
            except (MigSGXError, OSError):
                self._inbox.put(None)
                return
            try:
                if msg["t"] not in ("commit", "abort"):
                    raise ProtocolError(f"expected commit or abort, got {msg['t']!r}")
                _check_received(peer, msg)
            except MigSGXError:
                self._inbox.put(None)  # a protocol violation: stop reading this peer
                return
            self._inbox.put(msg["token"] if msg["t"] == "commit" else msg["frame"])

    def abort(self) -> None:
        self._abort_quietly("aborted by the destination")

    def _abort_quietly(self, reason: str, *, peer_frame: bytes = b"") -> None:
        """Discard the destination enclave: it never ran with this state.

        Not while it awaits the decision: after LOADED it may hold the only copy,
        and closing its connection would end it.  Then nothing happens.
        """

        if self.link is None:
            return
        if self.awaiting and not self.decided:
            return
        with contextlib.suppress(MigSGXError, OSError):
            self.link.call("__mig_abort", reason[:200])
        with contextlib.suppress(OSError):
            self.link.sock.close()
        self.link = None
