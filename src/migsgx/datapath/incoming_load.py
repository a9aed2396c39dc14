"""The destination end of one enclave's migration up to LOADED: launch, handshake, load.

A fresh enclave of the offered image, launched through the host's platform
service, takes the handshake and loads the state from a ring that the peer
fills (or a staging buffer, sequential mode); live mode's rounds and repair
come the same way.  A failure on the way discards that enclave.  From LOADED on
it may hold the only copy: what ends the wait is :class:`~.incoming.IncomingEnclave`'s.
"""

from __future__ import annotations

import contextlib
import queue
import select
import socket
import time
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import Any, Final, Self

from .._net import keep_alive
from ..core.handshake import Role
from ..core.peer import check_offer
from ..core.stream import TAG_SIZE
from ..errors import MigSGXError, ProtocolError, StreamError
from ..host.client import EnclaveInfo, launch_enclave
from ..sgx.image import EnclaveImage
from .enclave_link import RING_TIMEOUT, EnclaveLink, _call_beside, _slot_size, _Worker
from .peerwire import PREFAULT_WAIT, _recv, _send, bind_wire
from .ring import ShmRing
from .ring_spec import RingRole
from .staging import Staging
from .transport import context_switches, socket_to_ring, tune_socket


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


class _SourceGone:
    """In a decision inbox: no frame can come (:meth:`IncomingEnclave.source_gone`)."""


_SOURCE_GONE: Final = _SourceGone()


class _IncomingLoad:
    """Destination side up to LOADED: launch a fresh enclave, take the handshake, load the state."""

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
        #: Mode refuse: the migration id was refused here for good, REFUSED sent back.
        self.refused = False
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
        #: Whether the destination enclave backs the memory it loads with 2 MiB pages
        #: where the kernel gives them (the agent's ``--enclave-huge-pages``).  Off:
        #: paired at 1 and 4 GiB, slower on these VMs (docs/benchmarks.md).
        self.huge_pages = False
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
    ) -> tuple[Self, dict[str, Any]]:
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
            fresh, offer = type(self).accept_offer(peer, self.platform_socket)
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
            self.link.call("__mig_in_start", *((True,) if self.huge_pages else ()))
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
            if offer["mode"] == "refuse":
                return self._refuse(peer)
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

    def _refuse(self, peer: socket.socket) -> dict[str, Any]:
        """Mode refuse: the fresh enclave refuses the id for good; its proof goes back.

        ``docs/spec/commit.md``, 2.2: the enclave records the refusal in this
        host's claim store and seals REFUSED under the session's keys; it then
        holds nothing and ends (its connection is closed here).
        """

        assert self.link is not None
        frame = bytes(self.link.call("__mig_refuse"))
        self.refused = True
        with contextlib.suppress(OSError):
            self.link.sock.close()
        self.link = None
        _send(peer, {"t": "refused", "frame": frame})
        return {"refused": True}

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
        with contextlib.suppress(MigSGXError, OSError):
            # A duplicate of this connection given before the claim (``__mig_hold``)
            # keeps nothing now: let it go, so that the close below ends the enclave.
            self.link.call("__mig_unhold")
        with contextlib.suppress(OSError):
            self.link.sock.close()
        self.link = None
