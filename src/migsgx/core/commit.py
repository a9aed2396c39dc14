"""Exactly-once hand-over of the enclave state (``docs/spec/handshake.md``, section 9).

After the streams, the destination sends LOADED, the source answers with a COMMIT
token once it has given up its state for good, and the destination becomes live on
that token, once per migration id.  Control messages are AES-256-GCM sealed with the
session's control key of their direction, bound to the migration id and transcript.

Messages come in whole frames (:meth:`SourceCommit.receive`,
:meth:`DestinationCommit.receive`), because the COMMIT token is stored and delivered
as a unit.  A frame that fails authentication or parsing raises and changes nothing:
forged input from the untrusted side cannot talk a waiting party out of waiting.

Here: the states, the table of their transitions, and the two ends.  The messages
(sealed control frames, their schema, the events they become) are in
:mod:`.commit_messages`, re-exported here.
"""

from __future__ import annotations

import enum
import secrets
from collections.abc import Callable, Mapping
from typing import Any, Final

from ..errors import ProtocolError, ReplayError, StreamError
from .commit_messages import (
    CONTROL_SCHEMA,
    DESTINATION_TO_SOURCE,
    FRAME_SCHEMA,
    MAX_CONTROL_FRAME,
    SOURCE_TO_DESTINATION,
    CommitError,
    Committed,
    LoadConfirmed,
    Refused,
    open_control,
    seal_control,
)
from .handshake import LocalProtocolError, PeerAborted, Role, SessionKeys
from .seen import InMemorySeenIds, SeenMigrationIds
from .stream_channel import StreamChannel

__all__ = [
    "CONTROL_SCHEMA",
    "DESTINATION_TO_SOURCE",
    "FRAME_SCHEMA",
    "MAX_CONTROL_FRAME",
    "SOURCE_TO_DESTINATION",
    "CommitError",
    "CommitState",
    "Committed",
    "DestinationCommit",
    "InMemorySeenIds",
    "LoadConfirmed",
    "Refused",
    "SeenMigrationIds",
    "SourceCommit",
    "open_control",
    "seal_control",
]


# --- states ------------------------------------------------------------------------------
class CommitState(enum.Enum):
    AWAIT_LOADED = "await-loaded"
    LOAD_CONFIRMED = "load-confirmed"
    COMMITTED = "committed"
    LOADING = "loading"
    AWAIT_COMMIT = "await-commit"
    ACTIVE = "active"
    ABORTED = "aborted"
    FAILED = "failed"
    REFUSED = "refused"  # destination: the id refused here for good
    REVOKED = "revoked"  # source: the destination's refusal received (a commit undone)


_C = CommitState
# Events: "recv-<type>" for an authentic message received, and the local calls
# "loaded" (destination), "commit" (source) and "abort" (either).
TRANSITIONS: Final[Mapping[Role, Mapping[CommitState, Mapping[str, CommitState]]]] = {
    Role.SOURCE: {
        _C.AWAIT_LOADED: {
            "recv-loaded": _C.LOAD_CONFIRMED,
            "recv-abort": _C.ABORTED,
            "recv-refused": _C.REVOKED,  # (only after a commit: SourceCommit.refused)
            "abort": _C.ABORTED,
        },
        _C.LOAD_CONFIRMED: {"commit": _C.COMMITTED, "recv-abort": _C.ABORTED, "abort": _C.ABORTED},
        # A failed source may still tell the destination, authenticated, to drop its copy.
        _C.FAILED: {"abort": _C.FAILED},
    },
    Role.DESTINATION: {
        _C.LOADING: {
            "loaded": _C.AWAIT_COMMIT,
            "recv-abort": _C.ABORTED,
            "abort": _C.ABORTED,
            "refuse": _C.REFUSED,
        },
        _C.AWAIT_COMMIT: {"recv-commit": _C.ACTIVE, "recv-abort": _C.ABORTED},
    },
}


# --- the two ends -----------------------------------------------------------------------------
class _CommitEnd:
    role: Role
    _state: CommitState
    _mid: bytes
    _th: bytes

    @property
    def state(self) -> CommitState:
        return self._state

    @property
    def migration_id(self) -> bytes:
        return self._mid

    def _target(self, event: str) -> CommitState | None:
        return TRANSITIONS[self.role].get(self._state, {}).get(event)

    def _local(self, event: str) -> CommitState:
        target = self._target(event)
        if target is None:
            raise LocalProtocolError(f"{event} is not allowed in state {self._state.value}")
        return target

    def _authentic(self, message: dict[str, Any]) -> str:
        """Route an authentic message: its event, after the checks that kill the protocol."""

        mtype: str = message["t"]
        event = "recv-" + mtype
        if self._target(event) is None:
            # An authentic message out of place is a replay by the untrusted side (or a
            # stale copy); it changes nothing.
            raise ProtocolError(
                f"{mtype} is not expected in state {self._state.value}", message_type=mtype
            )
        if message["mid"] != self._mid:
            self._state = _C.FAILED
            raise CommitError("control message names another migration")
        return event


class SourceCommit(_CommitEnd):
    """The source's side: wait for LOADED, then give up the state and issue the token."""

    role = Role.SOURCE

    def __init__(
        self,
        keys: SessionKeys,
        *,
        after_commit: bool = False,
        rng: Callable[[int], bytes] = secrets.token_bytes,
    ):
        if keys.role is not Role.SOURCE:
            raise ValueError("SourceCommit needs the source's session keys")
        # A re-delivery session of a source that committed before: only it takes a
        # REFUSED (in a first session nothing was given up, so nothing is undone).
        self._after_commit = after_commit
        self._mid = keys.migration_id
        self._th = keys.transcript_hash
        self._send_key = keys.control_source_key
        self._recv_key = keys.control_destination_key
        self._streams: StreamChannel = keys.streams
        self._rng = rng
        self._state = _C.AWAIT_LOADED
        self._confirmed: tuple[int, bytes] | None = None
        self._token: bytes | None = None

    @property
    def token(self) -> bytes | None:
        """The COMMIT token, once :meth:`commit` has been called."""

        return self._token

    def receive(self, frame: bytes) -> LoadConfirmed | PeerAborted:
        msg = open_control(self._recv_key, DESTINATION_TO_SOURCE, self._mid, self._th, frame)
        if msg["t"] == "refused":
            raise ProtocolError("a REFUSED is taken only as one", message_type="refused")
        if self._authentic(msg) == "recv-abort":
            self._state = _C.ABORTED
            return PeerAborted(msg["code"][:64], msg["message"][:512])
        if self._streams.busy:
            self._state = _C.FAILED
            raise CommitError("LOADED arrived while a stream was still being sealed")
        want = (len(self._streams.summaries), self._streams.digest())
        if (msg["streams"], msg["digest"]) != want:
            self._state = _C.FAILED
            raise CommitError(
                "the destination loaded other streams than this source sent",
                loaded_streams=msg["streams"],
                sent_streams=want[0],
            )
        self._confirmed = want
        self._state = _C.LOAD_CONFIRMED
        return LoadConfirmed(*want)

    def refused(self, frame: bytes, record: Callable[[], None] | None = None) -> Refused:
        """The destination's REFUSED of this session: the proof its host never runs this id.

        Taken only in a session after a commit (``after_commit``), before any
        LOADED of it, and only as an authentic ``refused`` frame of this
        session (sealed under its D -> S control key, bound to the migration id
        and the transcript): a forged, replayed-from-another-session or
        other-migration frame raises :class:`CommitError` and changes nothing.
        ``record`` (the source host's revocation) runs after the frame verified;
        if it raises, the state is unchanged and a REFUSED may be taken again.
        """

        if not self._after_commit:
            raise ProtocolError("only a source that committed before takes a REFUSED")
        msg = open_control(self._recv_key, DESTINATION_TO_SOURCE, self._mid, self._th, frame)
        if msg["t"] != "refused":
            raise ProtocolError(f"{msg['t']} is not a REFUSED", message_type=msg["t"])
        self._authentic(msg)
        if record is not None:
            record()
        self._state = _C.REVOKED
        return Refused(self._mid)

    def commit(self, record: Callable[[bytes], None] | None = None) -> bytes:
        """Give up the state for good and return the COMMIT token.

        Irrevocable once ``record`` returned: ``record`` makes the token durable
        (the source host's decision record); if it raises, nothing was decided and
        the state stays LOAD_CONFIRMED (abort is still possible).  Afterwards the
        caller never resumes the enclave, and sends (and may re-send) the token.
        """

        target = self._local("commit")
        if self._streams.busy or self._confirmed is None:
            raise LocalProtocolError("a stream was started after the destination's LOADED")
        streams, digest = self._confirmed
        message = {"t": "commit", "mid": self._mid, "streams": streams, "digest": digest}
        token = seal_control(
            self._send_key, SOURCE_TO_DESTINATION, self._mid, self._th, message, self._rng(12)
        )
        if record is not None:
            record(token)
        self._token = token
        self._state = target
        return token

    def abort(
        self,
        code: str = "aborted",
        message: str = "",
        record: Callable[[bytes], None] | None = None,
    ) -> bytes:
        """Give up the migration (e.g. on a timeout); the source goes on. Returns the ABORT.

        ``record`` (the source host's decision record) sees the frame first; if
        it raises, nothing changed here (another enclave of the same migration
        committed first: this one must commit too, not abort).
        """

        target = self._local("abort")
        msg = {"t": "abort", "mid": self._mid, "code": code[:64], "message": message[:512]}
        frame = seal_control(
            self._send_key, SOURCE_TO_DESTINATION, self._mid, self._th, msg, self._rng(12)
        )
        if record is not None:
            record(frame)
        self._state = target
        return frame


class DestinationCommit(_CommitEnd):
    """The destination's side: confirm the load, then wait for the source's decision."""

    role = Role.DESTINATION

    def __init__(
        self,
        keys: SessionKeys,
        *,
        seen: SeenMigrationIds,
        rng: Callable[[int], bytes] = secrets.token_bytes,
    ) -> None:
        if keys.role is not Role.DESTINATION:
            raise ValueError("DestinationCommit needs the destination's session keys")
        self._mid = keys.migration_id
        self._th = keys.transcript_hash
        self._recv_key = keys.control_source_key
        self._send_key: bytes | None = keys.control_destination_key
        self._streams: StreamChannel | None = keys.streams
        self._seen = seen
        self._rng = rng
        self._state = _C.LOADING
        self._expect: tuple[int, bytes] | None = None
        self._loaded: bytes | None = None

    @property
    def loaded_frame(self) -> bytes | None:
        """The LOADED frame once sent, to send again after a drop."""

        return self._loaded

    def loaded(self) -> bytes:
        """Confirm a complete load: return LOADED and wait for the source's decision."""

        target = self._local("loaded")
        assert self._streams is not None and self._send_key is not None
        if self._streams.busy:
            raise StreamError("a stream ended before its final chunk; nothing to confirm")
        if not self._streams.summaries:
            raise LocalProtocolError("no stream was loaded")
        self._expect = (len(self._streams.summaries), self._streams.digest())
        message = {
            "t": "loaded",
            "mid": self._mid,
            "streams": self._expect[0],
            "digest": self._expect[1],
        }
        self._loaded = seal_control(
            self._send_key, DESTINATION_TO_SOURCE, self._mid, self._th, message, self._rng(12)
        )
        self._state = target
        return self._loaded

    def refuse(self, record: Callable[[], None]) -> bytes:
        """Refuse this migration id on this host for good; returns the REFUSED frame.

        Only before LOADED (a fresh enclave of a re-delivery, which loads
        nothing).  ``record`` refuses the id in the host's claim store
        (``docs/spec/commit.md``, section 2.2) and must raise if it cannot (an
        enclave claimed the id): then no frame is made and the state stays.
        The frame is made only after ``record`` returned, so it proves that no
        copy of this migration will ever activate here.
        """

        target = self._local("refuse")
        assert self._send_key is not None
        record()
        frame = seal_control(
            self._send_key,
            DESTINATION_TO_SOURCE,
            self._mid,
            self._th,
            {"t": "refused", "mid": self._mid},
            self._rng(12),
        )
        self._state = target
        return frame

    def receive(self, frame: bytes) -> Committed | PeerAborted:
        msg = open_control(self._recv_key, SOURCE_TO_DESTINATION, self._mid, self._th, frame)
        if self._state is _C.ACTIVE and msg["t"] == "commit":
            raise ReplayError("the commit token was accepted already", migration_id=self._mid.hex())
        if self._authentic(msg) == "recv-abort":
            self._state = _C.ABORTED
            return PeerAborted(msg["code"][:64], msg["message"][:512])
        if (msg["streams"], msg["digest"]) != self._expect:
            self._state = _C.FAILED
            raise CommitError("the commit token is for other streams than this destination loaded")
        if not self._seen.claim_migration(self._mid):
            self._state = _C.FAILED
            raise ReplayError(
                "this migration id was committed before; this copy must be discarded",
                migration_id=self._mid.hex(),
            )
        self._state = _C.ACTIVE
        return Committed(self._mid)

    def abort(self, code: str = "aborted", message: str = "") -> bytes:
        """Give up before LOADED (after it, the source decides). Returns the ABORT."""

        target = self._local("abort")
        assert self._send_key is not None
        msg = {"t": "abort", "mid": self._mid, "code": code[:64], "message": message[:512]}
        frame = seal_control(
            self._send_key, DESTINATION_TO_SOURCE, self._mid, self._th, msg, self._rng(12)
        )
        self._state = target
        return frame
