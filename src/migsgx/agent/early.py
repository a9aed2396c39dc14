"""Stop-and-copy's early handshake: the destination enclaves launch and attest before the freeze.

Nothing of an enclave's handshake depends on its frozen state: the offer, the
destination enclave's launch and the mutual attestation can run while the
application still calls its enclaves.  So, unless ``--late-handshake``, the
tool asks the application for a side channel per enclave (appctl ``side``, as a
live migration does), announces the enclaves (``begin``), and runs every
enclave's data connection, offer and handshake over its side channel
(:func:`handshake_all`).  At the freeze each transfer takes the connection the
application hands over (:func:`adopt`) for the dump and the commit; the side
channel closes once the dump is over.

Nothing changes for security: the data connection is authenticated before the
destination reads the offer, the offer is pinned to ``begin`` before anything
launches, and both enclaves attest before a byte of state moves.  Until its dump
begins, a source enclave's migration is bound to the side channel: a tool that
dies before it closes that channel, and the enclave aborts and serves on.  A
failure here aborts every enclave's migration (:func:`abandon`); the
application was never frozen.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from ..datapath.outgoing import OutgoingEnclave
from ..errors import MigrationError, ProtocolError
from .applink import HandedEnclave
from .legs import each_in_thread

__all__ = ["abandon", "adopt", "handshake_all"]

Connect = Callable[[int], tuple[socket.socket, socket.socket]]
"""``connect(index) -> (data connection, what the transfer uses on it)``."""


class _Leg(Protocol):
    handed: HandedEnclave
    outgoing: OutgoingEnclave | None
    peer: socket.socket | None
    error: BaseException | None


def handshake_all(
    transfers: Sequence[_Leg],
    connect: Connect,
    *,
    mode: str,
    chunk_size: int | None,
    memory_hint: bool = True,
) -> None:
    """Every enclave's connection, offer, destination launch and handshake, in parallel.

    Each transfer's ``handed`` holds its side channel.  On a failure every
    enclave's migration is abandoned and :class:`MigrationError` raised.
    """

    kwargs: dict[str, Any] = {"mode": mode, "memory_hint": memory_hint}
    if chunk_size is not None:
        kwargs["chunk_size"] = chunk_size
    for t in transfers:
        h = t.handed
        t.outgoing = OutgoingEnclave(h.sock, h.info, h.image_files, **kwargs)
        t.outgoing.index = h.index

    def one(t: _Leg) -> None:
        t.peer, used = connect(t.handed.index)
        assert t.outgoing is not None
        t.outgoing.handshake(used)

    failed = each_in_thread(transfers, one, "handshake")
    if failed is not None:
        err = failed.error
        abandon(transfers, f"handshake failed: {err}")
        raise MigrationError(
            f"enclave {failed.handed.index}: the handshake failed, the source runs on: "
            f"{type(err).__name__}: {err}"
        ) from err


def abandon(transfers: Sequence[_Leg], reason: str) -> None:
    """Before the freeze: every enclave's migration aborted, its side channel closed."""

    for t in transfers:
        if t.outgoing is not None:
            with contextlib.suppress(Exception):
                t.outgoing.abort(reason)
        with contextlib.suppress(OSError):
            t.handed.sock.close()
        if t.peer is not None:
            with contextlib.suppress(OSError):
                t.peer.close()


def adopt(transfers: Sequence[_Leg], handed: Sequence[HandedEnclave]) -> None:
    """At the freeze: each enclave's dump and commit go on the connection handed over.

    Raises :class:`ProtocolError` (nothing adopted) if the application's
    enclaves are not those whose handshakes ran.
    """

    if len(handed) != len(transfers) or any(
        h.info.pid != t.handed.info.pid for h, t in zip(handed, transfers, strict=False)
    ):
        raise ProtocolError("the application's enclaves changed before the freeze")
    for t, h in zip(transfers, handed, strict=True):
        assert t.outgoing is not None
        t.outgoing.adopt(h.sock)
        t.handed = h
