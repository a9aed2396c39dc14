"""The peer connection between the two ends of one enclave's migration, and its control frames.

:class:`~.outgoing.OutgoingEnclave` runs on the source host beside the enclave
(in the application, or in the migration tool that took over the enclave's
connection); :class:`~.incoming.IncomingEnclave` runs on the destination host
(in the agent).  They talk over one plain TCP connection per enclave: the
enclave stream is end to end encrypted and authenticated by the enclaves, so
the ends only move opaque bytes, and nothing they could do (drop, reorder,
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

Here: every control frame an end sends or receives, checked against the
protocol's table (:mod:`migsgx.core.peer`), and the bounds both ends share.
"""

from __future__ import annotations

import socket
import weakref
from typing import Any, Final

from ..core.handshake import Role
from ..core.peer import PEER_FRAME_MAX, SCHEMA, PeerProtocol
from ..errors import MigrationError, ProtocolError
from ..wire import recv_frame, send_frame

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


#: The longest a handshake waits for memory faulted in ahead of the freeze (seconds):
#: the destination's answer for its enclave's memory and staging buffer, the source's
#: end for its staging buffer (sequential mode).  The source still serves meanwhile.
PREFAULT_WAIT: Final = 10.0
