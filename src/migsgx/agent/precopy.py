"""``migsgx migrate --live``: the pre-copy phase of a process or container migration.

Before the application hands its enclave connections over (``prepare``), the
tool asks it for a side channel per enclave (appctl ``side``), announces the
enclaves to the destination agent (``begin``), and runs every enclave's
pre-copy rounds on its data connection while the application keeps calling
its enclaves (:class:`~migsgx.datapath.live.LiveOutgoingEnclave`).  When every
enclave's stop rule has fired, the migration goes on as a stop-and-copy one
(``agent/source.py``): prepare, then each enclave's *final* transfer overlaps
the CRIU dump, commit as today.

A failure during the rounds aborts every enclave's migration (the enclaves were
never quiesced: they run on) and the destination agent's session.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from ..core.stoprules import StopRules
from ..datapath.live import LiveOutgoingEnclave
from ..errors import MigrationError, ProtocolError
from ..limits import DEFAULT_CHUNK_SIZE
from .applink import HandedEnclave
from .fault_relays import flipping_relay
from .faults import fault
from .legs import each_in_thread

__all__ = ["RoundReport", "adopt", "finish", "run_precopy"]

RoundReport = Callable[[int, dict[str, Any]], None]
"""Called after each round with the enclave's index and the round's figures."""


class _Leg(Protocol):
    handed: HandedEnclave
    outgoing: Any
    peer: socket.socket | None
    stats: dict[str, Any]
    error: BaseException | None


def run_precopy(
    transfers: Sequence[_Leg],
    connect: Callable[[int], socket.socket],
    *,
    rules: StopRules | None = None,
    chunk_size: int | None = None,
    report: RoundReport | None = None,
    handshaken: Callable[[], None] | None = None,
) -> None:
    """Every enclave's rounds, in parallel, until each one's stop rule holds.

    ``connect(index)`` opens enclave ``index``'s data connection to the
    destination agent, as a stop-and-copy migration does.  ``handshaken`` runs
    once every enclave's handshake is done and before any round (as the early
    handshake's step does before the freeze): the others wait for it there; a
    failure of it, or of another enclave before it, fails the pre-copy.
    """

    for t in transfers:
        t.outgoing = LiveOutgoingEnclave(
            t.handed.sock, t.handed.info, t.handed.image_files,
            chunk_size=chunk_size or DEFAULT_CHUNK_SIZE, rules=rules,
        )  # fmt: skip

    # (Barrier: the last enclave to arrive runs ``handshaken``; one that fails first
    # breaks it, and the others fail their pre-copy instead of waiting for good.)
    gate = threading.Barrier(len(transfers), action=handshaken) if handshaken else None

    def one(t: _Leg) -> None:
        index = t.handed.index
        try:
            t.peer = peer = connect(index)
            action = fault("tool.enclave-stream")  # (live: the data connection opens here)
            if action is not None and action.startswith("flip-byte="):
                # One bit of byte N of the stream flipped on its way, inside a round.
                t.peer = peer = flipping_relay(peer, int(action.partition("=")[2]))

            def progress(figures: dict[str, Any]) -> None:
                if report is not None:
                    report(index, figures)
                fault("tool.precopy-round")  # (a round ended; the enclave runs, not quiesced)

            stats = t.outgoing.precopy(
                peer, progress=progress, handshaken=None if gate is None else gate.wait
            )
        except BaseException:
            if gate is not None:
                gate.abort()
            raise
        if "fallback" in stats and report is not None:
            report(index, stats)  # said at once, before any memory moved

    failed = each_in_thread(transfers, one, "precopy")
    if failed is not None:
        # The failure that broke the gate, not the others' broken gate.
        failed = next((t for t in transfers if _own_failure(t.error)), failed)
        for t in transfers:
            with contextlib.suppress(Exception):
                t.outgoing.abort("pre-copy failed")
        err = failed.error
        raise MigrationError(
            f"enclave {failed.handed.index}: pre-copy failed, the source runs on: "
            f"{type(err).__name__}: {err}"
        ) from err


def _own_failure(error: BaseException | None) -> bool:
    """Whether ``error`` is a failure of its own, not another's broken gate."""

    found = error is not None
    while error is not None:
        if isinstance(error, threading.BrokenBarrierError):
            return False
        error = error.__cause__
    return found


def adopt(transfers: Sequence[_Leg], handed: Sequence[HandedEnclave]) -> None:
    """After ``prepare``: each transfer takes the application's connection of its enclave."""

    if len(handed) != len(transfers) or any(
        h.info.pid != t.handed.info.pid for h, t in zip(handed, transfers, strict=False)
    ):
        raise ProtocolError("the application's enclaves changed during the pre-copy")
    for t, h in zip(transfers, handed, strict=True):
        side = t.handed.sock
        t.handed = h
        t.outgoing.app_sock = h.sock
        t.stats["side"] = side.fileno() >= 0


def finish(t: _Leg) -> dict[str, Any]:
    """The final transfer of one enclave (the application's connection handed over)."""

    outgoing: LiveOutgoingEnclave = t.outgoing
    stats = outgoing.finish(t.handed.sock)
    rounds = [
        {k: r.get(k) for k in ("round", "pages", "bytes", "seconds", "dirty_rate_bytes_per_second")}
        for r in outgoing.rounds
    ]
    out: dict[str, Any] = {
        k: v for k, v in stats.items() if isinstance(v, int | float | str | bool) or v is None
    }
    out["rounds"] = rounds
    out["final"] = {k: v for k, v in stats.get("final", {}).items() if not isinstance(v, list)}
    return out
