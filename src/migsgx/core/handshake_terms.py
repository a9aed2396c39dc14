"""What the handshake's ends and its callers share (:mod:`.handshake`, ``docs/spec/handshake.md``).

Its errors, the attestation seams, the events :meth:`~.handshake.Handshake.next_event`
returns, the roles and states with the transition table, the message schema, and the
:class:`SessionKeys` a completed handshake yields.  Plain values and tables, no
cryptography: the state machine that runs them is :mod:`.handshake`.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final, Protocol

from ..errors import AttestationError, MigSGXError, ProtocolError, register_error
from ..sgx.structs import ReportBody
from ..wire import Schema
from .policy import EnclaveIdentity
from .stream_channel import StreamChannel

__all__ = [
    "MAX_HANDSHAKE_FRAME",
    "NEED_DATA",
    "PROTOCOL_VERSION",
    "SCHEMA",
    "TRANSITIONS",
    "Attester",
    "HandshakeComplete",
    "HandshakeState",
    "KeyConfirmationError",
    "LocalProtocolError",
    "NeedData",
    "PeerAborted",
    "ReportDataError",
    "Role",
    "SessionKeys",
    "Verifier",
]

PROTOCOL_VERSION: Final = 1
MAX_HANDSHAKE_FRAME: Final = 64 * 1024


# --- errors ------------------------------------------------------------------------
@register_error
class LocalProtocolError(MigSGXError):
    """This end was used in a way the protocol does not allow now."""

    code = "local-protocol"


@register_error
class ReportDataError(AttestationError):
    """The quote's report data does not bind this handshake's transcript."""

    code = "report-data"


@register_error
class KeyConfirmationError(ProtocolError):
    """The peer's key confirmation does not verify: it does not hold the same keys."""

    code = "key-confirmation"


# --- seams ----------------------------------------------------------------------------
class Attester(Protocol):
    def quote(self, report_data: bytes) -> bytes:
        """This enclave's quote over 64 bytes of report data."""
        ...


class Verifier(Protocol):
    def verify(self, quote: bytes) -> ReportBody:
        """The verified REPORT body of a quote, or an AttestationError."""
        ...


# --- events and states ---------------------------------------------------------------
class NeedData:
    """More bytes are needed before the next event."""

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = NeedData()


@dataclass(frozen=True)
class HandshakeComplete:
    keys: SessionKeys


@dataclass(frozen=True)
class PeerAborted:
    """The peer said it gives up; ``code``/``message`` are its words, not verified."""

    code: str
    message: str


class Role(enum.Enum):
    SOURCE = "source"
    DESTINATION = "destination"


class HandshakeState(enum.Enum):
    IDLE = "idle"
    WAIT_DESTINATION_HELLO = "wait-destination-hello"
    WAIT_SOURCE_HELLO = "wait-source-hello"
    WAIT_SOURCE_FINISHED = "wait-source-finished"
    COMPLETE = "complete"
    ABORTED = "aborted"
    FAILED = "failed"


_S = HandshakeState
# {role: {state: {event: next state}}}; events are received message types and the
# local calls "start" and "abort".  Anything else raises.
TRANSITIONS: Final[Mapping[Role, Mapping[HandshakeState, Mapping[str, HandshakeState]]]] = {
    Role.SOURCE: {
        _S.IDLE: {"start": _S.WAIT_DESTINATION_HELLO, "abort": _S.ABORTED},
        _S.WAIT_DESTINATION_HELLO: {
            "destination-hello": _S.COMPLETE,
            "recv-abort": _S.ABORTED,
            "abort": _S.ABORTED,
        },
        _S.FAILED: {"abort": _S.FAILED},
    },
    Role.DESTINATION: {
        _S.WAIT_SOURCE_HELLO: {
            "source-hello": _S.WAIT_SOURCE_FINISHED,
            "recv-abort": _S.ABORTED,
            "abort": _S.ABORTED,
        },
        _S.WAIT_SOURCE_FINISHED: {
            "source-finished": _S.COMPLETE,
            "recv-abort": _S.ABORTED,
            "abort": _S.ABORTED,
        },
        _S.FAILED: {"abort": _S.FAILED},
    },
}

SCHEMA: Final = Schema(
    "migsgx.handshake",
    {
        "source-hello": {"v": int, "mid": bytes, "share": bytes, "quote": bytes},
        "destination-hello": {"share": bytes, "quote": bytes, "confirm": bytes},
        "source-finished": {"confirm": bytes},
        "abort": {"code": str, "message": str},
    },
)


@dataclass(frozen=True)
class SessionKeys:
    """What a completed handshake yields to the stream and commit layers."""

    role: Role
    migration_id: bytes
    transcript_hash: bytes
    source: EnclaveIdentity
    destination: EnclaveIdentity
    stream_secret: bytes = field(repr=False)
    control_source_key: bytes = field(repr=False)
    control_destination_key: bytes = field(repr=False)
    streams: StreamChannel = field(repr=False, compare=False)

    @property
    def peer(self) -> EnclaveIdentity:
        return self.destination if self.role is Role.SOURCE else self.source
