"""The source end of one enclave's migration up to the destination's LOADED.

The offer, the destination enclave's launch and the attested handshake (early,
on a side channel, or in the freeze), then the dump into a ring that goes to
the peer as it fills (pipelined) or through a staging buffer (sequential),
until the destination confirms the load.  Nothing is given up here: a
failure on the way aborts (the source enclave resumes), and the decision and
what follows it are :class:`~.outgoing.OutgoingEnclave`'s.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Callable, Mapping
from typing import Any

from ..core.handshake import Role
from ..core.peer import MODES, PEER_FRAME_MAX
from ..core.stream import TAG_SIZE
from ..errors import MigrationError, MigSGXError, ProtocolError
from ..host.client import EnclaveInfo
from ..limits import DEFAULT_SLOTS
from ..wire import recv_frame
from .enclave_link import RING_TIMEOUT, EnclaveLink, _call_beside, _slot_size, _Worker
from .peerwire import DEFAULT_CHUNK, PEER, PREFAULT_WAIT, _recv, _send, bind_wire
from .ring import RingRole, ShmRing
from .transport import (
    PeerWatch,
    Staging,
    context_switches,
    keep_alive,
    ring_to_socket,
    tune_socket,
)

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


class _OutgoingTransfer:
    """Source side up to LOADED: the offer, the handshake, the dump and its transfer."""

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

        if mode in ("live", "refuse") or not (self.memory_hint or mode == "sequential"):
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
