"""The peer protocol between a migration's source end and destination end, as a table.

One connection per migrating enclave (``docs/spec/channels.md``, section 8)
carries CBOR frames of :data:`SCHEMA` and, between the handshake and
``loaded``, the state itself as chunk frames (section 8.1)::

    S -> D  offer {files, chunk_size, slots, mode}
    D -> S  accept {pid}
    S -> D  hs       source-hello            (handshake.md: exactly three messages)
    D -> S  hs       destination-hello
    S -> D  hs       source-finished
    S -> D  chunk frames ... final
            (live mode: round {number}, chunk frames, round_done {stats} back,
            any number of times, then final {} and the chunk frames;
            at most once: D -> S repair {segments}, S -> D chunk frames)
    D -> S  loaded {frame, stats}
    S -> D  commit {token} | abort {...}
    D -> S  active

A committed source's offer with mode ``refuse`` (``docs/spec/commit.md``, 2.2)
ends after the handshake instead: ``D -> S  refused {frame}`` (the fresh
destination enclave refused the migration id for good), and nothing else.

Nothing on the connection is trusted: the enclaves authenticate what matters
end to end.  This table says only which frame may come when, so that an end
refuses a frame out of turn (:class:`~migsgx.errors.ProtocolError`) before it
hands anything to its enclave, and so that both ends can run back to back in
memory in tests.  Where the enclave is the judge, the table leaves the choice
to it: a destination that sent ``loaded`` takes any number of ``commit`` and
``abort`` frames (forged ones change nothing, ``handshake.md`` 9.2) until its
enclave accepts one; a source that sent its token takes ``loaded`` again.

No I/O here; :mod:`migsgx.datapath.peerwire` and the ends beside it move the bytes.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from ..errors import ConnectionClosedError, FrameError, ProtocolError
from ..limits import MAX_MEMORY_HINT, MAX_OFFER_SLOTS, check_chunk_size
from ..wire import FrameDecoder, Schema, encode
from .handshake import Role

__all__ = [
    "CHUNK_HEADER",
    "FLAG_FINAL",
    "MODES",
    "PEER_FRAME_MAX",
    "SCHEMA",
    "TRANSITIONS",
    "ChunkDecoder",
    "PeerProtocol",
    "PeerState",
    "Role",
    "check_offer",
    "encode_chunk",
]

MODES: Final = ("pipelined", "sequential", "live", "refuse")
#: An offer carries the enclave image.
PEER_FRAME_MAX: Final = 32 << 20

SCHEMA: Final = Schema(
    "migsgx.peer",
    {
        # memory_hint (optional): the source enclave's memory in use at the offer.
        "offer": {
            "files": dict,
            "chunk_size": int,
            "slots": int,
            "mode": str,
            "memory_hint": (int, type(None)),
        },
        "accept": {"pid": int},
        "hs": {"data": bytes},
        "loaded": {"frame": bytes, "stats": dict},
        "commit": {"token": bytes},
        "active": {},
        # The destination enclave found a decision frame not authentic (it waits on).
        "rejected": {},
        "abort": {"code": str, "message": str, "frame": bytes},
        # live mode (precopy.md, section 5): pre-copy rounds, then the final transfer
        "round": {"number": int},
        "round_done": {"stats": dict},
        "final": {},
        "repair": {"segments": list},
        # mode "refuse": the destination enclave's REFUSED frame (commit.md, 2.2)
        "refused": {"frame": bytes},
    },
)

#: Chunk frame (section 8.1): u32 big-endian payload length | u8 flags | payload.
CHUNK_HEADER: Final = struct.Struct(">IB")
FLAG_FINAL: Final = 0x01


class PeerState(enum.Enum):
    IDLE = "idle"
    OFFERED = "offered"  # the offer is out; the destination launches
    HS_SOURCE_HELLO = "hs-source-hello"  # the source's first handshake message is due
    HS_DESTINATION_HELLO = "hs-destination-hello"
    HS_SOURCE_FINISHED = "hs-source-finished"
    STREAMING = "streaming"  # chunk frames until the final one, then `loaded`
    ROUND = "round"  # live: a pre-copy round's chunk frames, then `round_done`
    FINAL = "final"  # live: the final transfer's chunk frames, then `loaded`
    REPAIR = "repair"  # live: differing segments' chunk frames, once, then `loaded`
    LOADED = "loaded"  # the destination loaded and is in doubt until its enclave decides
    COMMITTED = "committed"  # the source gave its state up; the token is out
    ACTIVE = "active"
    ABORTED = "aborted"
    FAILED = "failed"  # a frame out of turn, or an abort after the token
    REFUSED = "refused"  # mode refuse: the destination refused the migration id


_S = PeerState
_ABORTABLE = {"send:abort": _S.ABORTED, "recv:abort": _S.ABORTED}

# {role: {state: {event: next state}}}.  Events are "send:<type>" and "recv:<type>";
# anything not listed is a ProtocolError (received) or a LocalProtocolError-like
# misuse (sent), and the end is FAILED.
#
# Up to the destination's `loaded` the two ends move in lock step: each row of the
# source's view is the destination's with sending and receiving swapped.  Only the
# decision differs: the source commits; the destination's enclave judges the token.
_LOCKSTEP: Final[Mapping[PeerState, Mapping[str, PeerState]]] = {  # the source's view
    _S.IDLE: {"send:offer": _S.OFFERED},
    _S.OFFERED: {"recv:accept": _S.HS_SOURCE_HELLO, **_ABORTABLE},
    _S.HS_SOURCE_HELLO: {"send:hs": _S.HS_DESTINATION_HELLO, **_ABORTABLE},
    _S.HS_DESTINATION_HELLO: {"recv:hs": _S.HS_SOURCE_FINISHED, **_ABORTABLE},
    _S.HS_SOURCE_FINISHED: {"send:hs": _S.STREAMING, **_ABORTABLE},
    _S.STREAMING: {
        "recv:loaded": _S.LOADED,
        "recv:refused": _S.REFUSED,  # (only an offer of mode refuse is answered so)
        "send:round": _S.ROUND,
        "send:final": _S.FINAL,
        **_ABORTABLE,
    },
    _S.ROUND: {"recv:round_done": _S.STREAMING, **_ABORTABLE},
    _S.FINAL: {"recv:loaded": _S.LOADED, "recv:repair": _S.REPAIR, **_ABORTABLE},
    _S.REPAIR: {"recv:loaded": _S.LOADED, **_ABORTABLE},
}
_ENDS: Final[Mapping[PeerState, Mapping[str, PeerState]]] = {
    _S.ACTIVE: {},
    _S.ABORTED: {},
    _S.REFUSED: {},
    _S.FAILED: {"send:abort": _S.FAILED},
}


def _mirrored(
    rows: Mapping[PeerState, Mapping[str, PeerState]],
) -> dict[PeerState, dict[str, PeerState]]:
    """The other end's view of lock-step rows: every ``send:`` a ``recv:`` and back."""

    def other(event: str) -> str:
        way, _, kind = event.partition(":")
        return f"{'recv' if way == 'send' else 'send'}:{kind}"

    return {state: {other(e): target for e, target in row.items()} for state, row in rows.items()}


TRANSITIONS: Final[Mapping[Role, Mapping[PeerState, Mapping[str, PeerState]]]] = {
    Role.SOURCE: {
        **_LOCKSTEP,
        _S.LOADED: {"send:commit": _S.COMMITTED, **_ABORTABLE},
        _S.COMMITTED: {
            "recv:loaded": _S.COMMITTED,  # delivered twice: the decision is made
            "send:commit": _S.COMMITTED,  # the token may be delivered again
            "recv:active": _S.ACTIVE,
            "recv:rejected": _S.COMMITTED,  # a token damaged on the way: deliver it again
            "recv:abort": _S.FAILED,  # the destination's side gave up after the token
        },
        **_ENDS,
    },
    Role.DESTINATION: {
        **_mirrored(_LOCKSTEP),
        _S.LOADED: {
            # Judged by the destination enclave, not by the table: a forged
            # decision changes nothing and the wait goes on.
            "recv:commit": _S.LOADED,
            "recv:abort": _S.LOADED,
            "send:rejected": _S.LOADED,
            "send:active": _S.ACTIVE,
        },
        **_ENDS,
    },
}


def check_offer(offer: Mapping[str, Any]) -> None:
    """What a destination accepts to launch and allocate for (section 8 of channels.md)."""

    if offer["mode"] not in MODES or not check_chunk_size(offer["chunk_size"]):
        raise ProtocolError("the offer names an unknown mode or a bad chunk size")
    if not 1 <= offer["slots"] <= MAX_OFFER_SLOTS:
        raise ProtocolError("the offer asks for a bad number of ring slots")
    hint = offer.get("memory_hint")
    if hint is not None and (
        isinstance(hint, bool) or not isinstance(hint, int) or not 0 <= hint <= MAX_MEMORY_HINT
    ):
        raise ProtocolError("the offer's memory hint is out of range")


@dataclass
class PeerProtocol:
    """One end's view of the peer connection: which frame it may send or take next."""

    role: Role
    state: PeerState = PeerState.IDLE
    history: list[str] = field(default_factory=list)

    def _advance(self, event: str) -> PeerState:
        target = TRANSITIONS[self.role].get(self.state, {}).get(event)
        if target is None:
            state, self.state = self.state.value, PeerState.FAILED
            raise ProtocolError(
                f"{self.role.value}: {event} is not allowed in state {state}", state=state
            )
        self.state = target
        self.history.append(event)
        return target

    def sent(self, msg: Mapping[str, Any]) -> bytes:
        """Check that this end may send ``msg`` now; returns its frame."""

        self._advance(f"send:{msg['t']}")
        return encode(msg, max_size=PEER_FRAME_MAX)

    def received(self, msg: dict[str, Any]) -> dict[str, Any]:
        """Check a decoded frame from the peer against the table; returns it."""

        self._advance(f"recv:{SCHEMA.validate(msg)['t']}")
        if msg["t"] == "offer":
            try:
                check_offer(msg)
            except ProtocolError:
                self.state = PeerState.FAILED
                raise
        return msg

    def decoder(self) -> FrameDecoder:
        return FrameDecoder(SCHEMA, max_size=PEER_FRAME_MAX)

    @property
    def in_doubt(self) -> bool:
        """A destination that sent ``loaded`` and whose enclave has not decided."""

        return self.role is Role.DESTINATION and self.state is PeerState.LOADED

    @property
    def finished(self) -> bool:
        return self.state in (
            PeerState.ACTIVE, PeerState.ABORTED, PeerState.FAILED, PeerState.REFUSED
        )  # fmt: skip


# --- chunk frames (section 8.1), sans I/O --------------------------------------------------
def encode_chunk(payload: bytes, *, final: bool) -> bytes:
    return CHUNK_HEADER.pack(len(payload), FLAG_FINAL if final else 0) + payload


class ChunkDecoder:
    """Feed bytes; take ``(payload, final)`` chunks until the final one.

    The length is checked against ``cap`` before a byte of the payload is kept;
    unknown flags are a :class:`~migsgx.errors.FrameError`.  What follows the
    final chunk is not a chunk; it stays in :attr:`rest` for the caller.
    """

    def __init__(self, cap: int) -> None:
        self._cap = cap
        self._buf = bytearray()
        self.done = False

    def receive(self, data: bytes) -> None:
        self._buf += data

    def chunks(self) -> Iterator[tuple[bytes, bool]]:
        while not self.done and len(self._buf) >= CHUNK_HEADER.size:
            length, flags = CHUNK_HEADER.unpack_from(self._buf)
            if flags & ~FLAG_FINAL:
                raise FrameError("unknown chunk flags", flags=flags)
            if length > self._cap:
                raise FrameError(f"chunk of {length} bytes exceeds the cap of {self._cap}")
            end = CHUNK_HEADER.size + length
            if len(self._buf) < end:
                return
            payload = bytes(self._buf[CHUNK_HEADER.size : end])
            del self._buf[:end]
            self.done = bool(flags & FLAG_FINAL)
            yield payload, self.done

    @property
    def rest(self) -> bytes:
        """Bytes received and not consumed (after the final chunk: the next frames)."""

        return bytes(self._buf)

    def end_of_stream(self) -> None:
        """The connection ended: an error unless the final chunk came."""

        if self.done:
            return
        if self._buf:
            raise FrameError("connection closed inside a chunk frame")
        raise ConnectionClosedError("connection closed before the final chunk")
