"""The commit protocol's messages (``docs/spec/handshake.md``, section 9): the sealed
control frames, their schema, and the events an authentic one becomes.

A control message (LOADED, COMMIT, ABORT, REFUSED) is AES-256-GCM sealed with the
session's control key of its direction, bound to the migration id and the
transcript, and travels as exactly one length-prefixed frame.  Sans-I/O like the
rest of the core; the states and the two ends that send and take these frames are
in :mod:`.commit`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import cbor2
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ..errors import FrameError, MigrationError, ProtocolError
from ..errors import register_error as _register
from ..wire import HEADER, Schema, decode_body, encode
from .transcript import transcript_item

__all__ = [
    "CONTROL_SCHEMA",
    "DESTINATION_TO_SOURCE",
    "FRAME_SCHEMA",
    "MAX_CONTROL_FRAME",
    "SOURCE_TO_DESTINATION",
    "CommitError",
    "Committed",
    "LoadConfirmed",
    "Refused",
    "open_control",
    "seal_control",
]

SOURCE_TO_DESTINATION: Final = "s2d"
DESTINATION_TO_SOURCE: Final = "d2s"
MAX_CONTROL_FRAME: Final = 4096


@_register
class CommitError(MigrationError):
    """A commit-protocol message failed authentication or does not match this migration."""

    code = "commit"


# --- events: what an authentic message becomes -------------------------------------------
@dataclass(frozen=True)
class LoadConfirmed:
    """The destination has loaded exactly the streams this source sent."""

    streams: int
    digest: bytes


@dataclass(frozen=True)
class Committed:
    """The destination may run: the source has given up the state of this migration."""

    migration_id: bytes


@dataclass(frozen=True)
class Refused:
    """The destination host refused this migration id for good: no copy of it runs there.

    Only a source that committed before (a re-delivery session, ``docs/spec/commit.md``
    section 2.2) takes it: it is the proof that lets the committed state run again.
    """

    migration_id: bytes


FRAME_SCHEMA: Final = Schema("migsgx.control-frame", {"control": {"n": bytes, "c": bytes}})
CONTROL_SCHEMA: Final = Schema(
    "migsgx.control",
    {
        "loaded": {"mid": bytes, "streams": int, "digest": bytes},
        "commit": {"mid": bytes, "streams": int, "digest": bytes},
        "abort": {"mid": bytes, "code": str, "message": str},
        "refused": {"mid": bytes},
    },
)


# --- sealed control frames -------------------------------------------------------------
def _aad(direction: str, migration_id: bytes, transcript_hash: bytes) -> bytes:
    return (
        transcript_item("protocol", b"migsgx/v1 control")
        + transcript_item("direction", direction.encode())
        + transcript_item("migration-id", migration_id)
        + transcript_item("transcript", transcript_hash)
    )


def seal_control(
    key: bytes,
    direction: str,
    migration_id: bytes,
    transcript_hash: bytes,
    message: Mapping[str, Any],
    nonce: bytes,
) -> bytes:
    """One control frame (``u32 length || CBOR``) carrying ``message`` sealed under ``key``."""

    plaintext = bytes(cbor2.dumps(dict(CONTROL_SCHEMA.validate(dict(message)))))
    sealed = AESGCM(key).encrypt(nonce, plaintext, _aad(direction, migration_id, transcript_hash))
    return encode({"t": "control", "n": nonce, "c": sealed}, max_size=MAX_CONTROL_FRAME)


def open_control(
    key: bytes, direction: str, migration_id: bytes, transcript_hash: bytes, frame: bytes
) -> dict[str, Any]:
    """The message of one control frame; FrameError if malformed, CommitError if not authentic."""

    if len(frame) < HEADER.size or HEADER.unpack_from(frame)[0] != len(frame) - HEADER.size:
        raise FrameError("a control frame must be exactly one length-prefixed frame")
    if len(frame) > MAX_CONTROL_FRAME + HEADER.size:
        raise FrameError("control frame too large")
    outer = decode_body(bytes(frame[HEADER.size :]), FRAME_SCHEMA)
    if len(outer["n"]) != 12:
        raise FrameError("control frame nonce must be 12 bytes")
    try:
        plaintext = AESGCM(key).decrypt(
            outer["n"], outer["c"], _aad(direction, migration_id, transcript_hash)
        )
    except InvalidTag:
        raise CommitError("control message failed authentication") from None
    try:
        return CONTROL_SCHEMA.validate(cbor2.loads(plaintext))
    except Exception as exc:
        raise ProtocolError("authentic control message is malformed") from exc
