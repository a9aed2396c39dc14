"""Live migration of one enclave: pre-copy rounds while it runs, then a short freeze.

The source driver, beside :class:`~.outgoing.OutgoingEnclave` (whose final
transfer, commit and abort it reuses).  Two connections to the source enclave:

* the **side channel** (``host.client.EnclaveClient.open_side_channel``) carries
  the handshake, ``__mig_track`` and the rounds while the application's ECALLs
  go on over its own connection;
* the **application's connection**, handed over as for stop-and-copy once the
  rounds stop, carries the final dump (enclave quiesced), LOADED and the commit.

Peer wire (``docs/spec/channels.md``, live mode): ``offer {mode: "live"}``,
``accept``, ``hs`` ...; then per round ``round {number}``, chunk frames up to a
final one, ``round_done {stats}`` back; then ``final {}`` and the final
transfer exactly as in pipelined mode.  Each round uses a ring of its own.

When to stop is decided by :class:`StopRules` (no I/O): named rules, all
reported.  Any failure during the rounds aborts the migration through the side
channel: the source enclave was never quiesced and runs on as if nothing
happened.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict
from typing import Any, Final

from ..core.stoprules import PAGE, StopRules
from ..errors import DirtyTrackingUnavailableError, EnclaveLostError, MigrationError
from ..host.client import EnclaveInfo
from ..limits import DEFAULT_CHUNK_SIZE, DEFAULT_SLOTS
from .enclave_link import RING_TIMEOUT, EnclaveLink, _call_beside, _slot_size, _Worker
from .outgoing import OutgoingEnclave
from .outgoing_transfer import dump_watched
from .peerwire import _recv, _send
from .ring import ShmRing
from .ring_spec import RingRole
from .transport import ring_to_socket

__all__ = ["FALLBACK", "LiveOutgoingEnclave", "RoundProgress", "StopRules"]

FALLBACK: Final = "stop-and-copy"

RoundProgress = Callable[[dict[str, Any]], None]


class LiveOutgoingEnclave(OutgoingEnclave):
    """Source side of a live migration; :meth:`precopy`, then :meth:`finish`, then commit."""

    def __init__(
        self,
        side: socket.socket,
        info: EnclaveInfo,
        image_files: Mapping[str, bytes],
        *,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        slots: int = DEFAULT_SLOTS,
        peer_timeout: float | None = 300.0,
        rules: StopRules | None = None,
    ) -> None:
        super().__init__(side, info, image_files, chunk_size=chunk_size, slots=slots,
                         mode="live", peer_timeout=peer_timeout)  # fmt: skip
        self.side = side
        self.rules = rules or StopRules()
        self.rounds: list[dict[str, Any]] = []
        self.stop_rule: str | None = None
        self.fallback: str | None = None
        self.precopy_stats: dict[str, Any] = {}
        self.app_sock: socket.socket | None = None  # set once the application handed it over

    def precopy(
        self,
        peer: socket.socket,
        progress: RoundProgress | None = None,
        handshaken: Callable[[], object] | None = None,
    ) -> dict[str, Any]:
        """Handshake and rounds over the side channel while the enclave serves ECALLs.

        ``handshaken``: called once the handshake is done, before the first round
        (the tool's step after every enclave's handshake; its failure aborts as
        a round's does)."""

        try:
            # The same offer and attested handshake as stop-and-copy's (the peer table
            # bound, keepalive on), in live mode; the migration id is known after it.
            self._handshake(peer, "__mig_out_start", "live")
            if handshaken is not None:
                handshaken()
            assert self._times is not None
            t0, _, t_hs = self._times
            try:
                memory_pages = int(self.link.call("__mig_track")["pages"])
            except DirtyTrackingUnavailableError as exc:
                # Said at once, before any memory moved; the final transfer will
                # carry everything (stop-and-copy) in the same session.
                self.fallback = FALLBACK
                self.stop_rule = "tracking-unavailable"
                self.precopy_stats = {"fallback": FALLBACK, "reason": exc.message}
                return self.precopy_stats
            while True:
                self.rounds.append(self._round(peer))
                # What the stop rule weighs, said with each round: the final
                # transfer and the source's part of the digest check.
                self.rounds[-1]["estimated_downtime_seconds"] = StopRules.estimate(self.rounds)
                if progress is not None:
                    progress(self.rounds[-1])
                elapsed = time.monotonic() - t_hs
                self.stop_rule = self.rules.decide(self.rounds, elapsed, memory_pages * PAGE)
                if self.stop_rule is not None:
                    break
        except BaseException as exc:
            self._abort_quietly(f"{type(exc).__name__}: {exc}")
            if isinstance(exc, OSError):  # the side channel or the peer connection broke
                raise EnclaveLostError(f"pre-copy stopped: {exc}") from exc
            raise
        self.precopy_stats = {
            "handshake_seconds": t_hs - t0,
            "precopy_seconds": time.monotonic() - t_hs,
            "rounds": self.rounds,
            "stop_rule": self.stop_rule,
            "estimated_downtime_seconds": StopRules.estimate(self.rounds),
            "rules": asdict(self.rules),
        }
        return self.precopy_stats

    def _round(self, peer: socket.socket) -> dict[str, Any]:
        number = len(self.rounds)
        _send(peer, {"t": "round", "number": number})
        figures = self._sent_beside(peer, "__mig_round", self.chunk_size)
        done = _recv(peer, "round_done")
        figures["destination"] = done["stats"]
        bw = figures["bytes"] / max(figures["seconds"], 1e-6)
        figures["dirty_rate_bytes_per_second"] = (
            figures["pages"] * PAGE / max(self.rounds[-1]["seconds"], 1e-6) if self.rounds else 0.0
        )
        figures["bandwidth_bytes_per_second"] = bw
        return figures

    def _repair(self, peer: socket.socket, segments: list[Any]) -> dict[str, Any]:
        """The destination named segments whose tags differ: the enclave sends them again.

        Once (the table allows one ``repair``); the list is the destination
        enclave's, through untrusted hands: it decides only what travels, and
        the destination checks every tag again.
        """

        return self._sent_beside(peer, "__mig_repair", segments, self.chunk_size)

    def _sent_beside(self, peer: socket.socket, name: str, *args: Any) -> dict[str, Any]:
        """The enclave's ``name`` call fills a ring of its own while a worker sends the
        ring's slots to ``peer``; the call's figures once both are done (a round or
        a repair: each ends its ring with a final slot)."""

        ring = ShmRing.create(self.slots, _slot_size(self.chunk_size), RingRole.CONSUMER)
        try:
            self.link.give_ring(ring)
            mover = _Worker(lambda: ring_to_socket(ring, peer, timeout=RING_TIMEOUT),
                            "migsgx-send", ring)  # fmt: skip
            figures: dict[str, Any] = _call_beside(self.link, mover, name, *args)
            try:
                mover.join()
            except OSError as exc:
                raise MigrationError(f"the peer connection failed: {exc}") from exc
        finally:
            ring.close()
        return figures

    def abort(
        self,
        reason: str,
        *,
        none_committed: bool = False,
        answered: Callable[[], object] | None = None,
    ) -> socket.socket:
        """As :meth:`OutgoingEnclave.abort`; the connection returned is the application's."""

        self._abort_quietly(reason, none_committed=none_committed, answered=answered)
        with contextlib.suppress(OSError):
            self.side.close()
        return self.app_sock if self.app_sock is not None else self.link.sock

    def finish(self, app_sock: socket.socket) -> dict[str, Any]:
        """The application handed its connection over: final transfer up to a verified LOADED."""

        if self.peer is None:
            raise RuntimeError("finish() before precopy()")
        peer = self.peer
        self.app_sock = app_sock
        self.link = EnclaveLink(app_sock)
        # CLOCK_MONOTONIC (one clock for the host's processes, as the enclaves' steps).
        t0 = time.monotonic()
        try:
            _send(peer, {"t": "final"})
            ring = ShmRing.create(self.slots, _slot_size(self.chunk_size), RingRole.CONSUMER)
            try:
                self.link.give_ring(ring)
                t_ring = time.monotonic()
                # With the application frozen, a refusal must end the send at once.
                dump = dump_watched(self.link, ring, peer, self.chunk_size)
            finally:
                ring.close()
            t_sent = time.monotonic()
            loaded = _recv(peer, "loaded", "repair")
            repair: dict[str, Any] | None = None
            if loaded["t"] == "repair":
                repair = self._repair(peer, loaded["segments"])
                loaded = _recv(peer, "loaded")
            t_loaded = time.monotonic()
            self.link.call("__mig_loaded", loaded["frame"])
            self._loaded = True
        except BaseException as exc:
            self._abort_quietly(f"{type(exc).__name__}: {exc}")
            raise
        finally:
            self.side.close()
        t_end = time.monotonic()
        self.stats = {
            **self.precopy_stats,
            "mode": "live",
            "chunk_bytes": self.chunk_size,
            "final": {k: v for k, v in dump.items() if k != "rounds"},
            "bytes": sum(r["bytes"] for r in self.rounds)
            + dump["bytes"]
            + (repair["bytes"] if repair else 0),
            "repair": repair,
            "memory_bytes": dump["memory_bytes"],
            "quiesce_seconds": dump["quiesce_seconds"],
            "final_seconds": t_end - t0,
            "send_seconds": t_sent - t0,
            "load_wait_seconds": t_end - t_sent,
            "destination": loaded["stats"],
            "timeline": {
                "source_driver": {
                    "handover": [t0, t_ring],
                    "dump": [t_ring, t_sent],
                    "loaded_wait": [t_sent, t_loaded],
                    "loaded_verify": [t_loaded, t_end],
                },
                "source_enclave": dump.get("timeline", {}),
            },
        }
        return self.stats
