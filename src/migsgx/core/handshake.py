"""Mutual attestation and key agreement between source and destination enclaves.

Sans-I/O (``docs/spec/handshake.md``): feed bytes with :meth:`Handshake.receive_data`,
take events from :meth:`Handshake.next_event`, send what :meth:`Handshake.data_to_send`
returns.  Attestation is delegated to an :class:`Attester` and a :class:`Verifier`;
the core checks that each verified quote binds this transcript, checks the
:class:`~migsgx.core.policy.MigrationPolicy`, and derives :class:`SessionKeys`.
The state machine is here; its errors, events, states, table, schema and
keys are :mod:`.handshake_terms`, and the transcript encoding, its hash and MACs
and the key schedule it runs are :mod:`.transcript`.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import Any

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from ..errors import PlatformError, ProtocolError, ReplayError
from ..wire import HEADER, decode_body, encode
from .handshake_terms import (
    MAX_HANDSHAKE_FRAME,
    NEED_DATA,
    PROTOCOL_VERSION,
    SCHEMA,
    TRANSITIONS,
    Attester,
    HandshakeComplete,
    HandshakeState,
    KeyConfirmationError,
    LocalProtocolError,
    NeedData,
    PeerAborted,
    ReportDataError,
    Role,
    SessionKeys,
    Verifier,
)
from .policy import EnclaveIdentity, MigrationPolicy
from .seen import SeenMigrationIds
from .stream_channel import StreamChannel
from .transcript import key_schedule, mac, mac_ok, sha512, transcript_item

__all__ = [
    "NEED_DATA",
    "Attester",
    "Handshake",
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

_S = HandshakeState


# --- the handshake ------------------------------------------------------------------------
class Handshake:
    """One end of the handshake.  Errors are dead ends: a failed handshake stays failed."""

    def __init__(
        self,
        role: Role,
        *,
        attester: Attester,
        verifier: Verifier,
        policy: MigrationPolicy | None = None,
        migration_id: bytes | None = None,
        seen: SeenMigrationIds | None = None,
        rng: Callable[[int], bytes] = secrets.token_bytes,
    ) -> None:
        if migration_id is not None and (role is not Role.SOURCE or len(migration_id) != 16):
            raise ValueError("only the source chooses the migration id, 16 bytes")
        self.role = role
        self._attester = attester
        self._verifier = verifier
        self._policy = policy or MigrationPolicy()
        self._seen = seen
        self._rng = rng
        self._mid = migration_id
        self._state = _S.IDLE if role is Role.SOURCE else _S.WAIT_SOURCE_HELLO
        self._inbox = bytearray()
        self._outbox = bytearray()
        self._secret: X25519PrivateKey | None = None
        self._transcript = b""
        self._own: EnclaveIdentity | None = None
        self._peer: EnclaveIdentity | None = None
        self._keys: SessionKeys | None = None
        self._confirm_keys: tuple[bytes, bytes] = (b"", b"")
        self._reported = False

    # -- public surface --
    @property
    def state(self) -> HandshakeState:
        return self._state

    @property
    def migration_id(self) -> bytes | None:
        return self._mid

    @property
    def peer(self) -> EnclaveIdentity | None:
        """The peer's verified identity, once its quote has been checked."""

        return self._peer

    @property
    def keys(self) -> SessionKeys:
        if self._keys is None or self._state is not _S.COMPLETE:
            raise LocalProtocolError("the handshake is not complete")
        return self._keys

    def start(self) -> None:
        """Source: choose the migration id and queue the source hello."""

        self._transition("start", local=True)
        try:
            if self._mid is None:
                self._mid = self._rng(16)
            share = self._new_share()
            self._transcript = (
                transcript_item("protocol", b"migsgx/v1 handshake")
                + transcript_item("migration-id", self._mid)
                + transcript_item("source-share", share)
            )
            quote = self._own_quote(sha512(self._transcript))
            self._transcript += transcript_item("source-quote", quote)
            self._send({"t": "source-hello", "v": PROTOCOL_VERSION, "mid": self._mid,
                        "share": share, "quote": quote})  # fmt: skip
        except BaseException:
            self._state = _S.FAILED
            raise

    def receive_data(self, data: bytes) -> None:
        if self._state in (_S.COMPLETE, _S.ABORTED, _S.FAILED):
            raise LocalProtocolError(f"the handshake is over ({self._state.value})")
        self._inbox += data

    def data_to_send(self) -> bytes:
        out = bytes(self._outbox)
        self._outbox.clear()
        return out

    def trailing_data(self) -> bytes:
        """Bytes received after the handshake's last message (for the next layer)."""

        return bytes(self._inbox)

    def abort(self, code: str = "aborted", message: str = "") -> None:
        """Give up and queue an ``abort`` message for the peer (allowed after a failure too)."""

        self._transition("abort", local=True)
        self._outbox += encode({"t": "abort", "code": code[:64], "message": message[:512]})

    def next_event(self) -> NeedData | HandshakeComplete | PeerAborted:
        while True:
            if self._state is _S.COMPLETE and not self._reported:
                self._reported = True
                return HandshakeComplete(self.keys)
            if self._state in (_S.COMPLETE, _S.ABORTED, _S.FAILED):
                raise LocalProtocolError(f"the handshake is over ({self._state.value})")
            frame = self._take_frame()
            if frame is None:
                return NEED_DATA
            try:
                msg = decode_body(frame, SCHEMA)
                if msg["t"] == "abort":
                    self._transition("recv-abort")
                    return PeerAborted(msg["code"][:64], msg["message"][:512])
                target = self._transition(msg["t"], apply=False)
                if msg["t"] == "source-hello":
                    self._on_source_hello(msg)
                elif msg["t"] == "destination-hello":
                    self._on_destination_hello(msg)
                else:
                    self._on_source_finished(msg)
                self._state = target
            except BaseException:
                self._state = _S.FAILED
                raise

    # -- internals --
    def _transition(self, event: str, *, local: bool = False, apply: bool = True) -> HandshakeState:
        target = TRANSITIONS[self.role].get(self._state, {}).get(event)
        if target is None:
            state = self._state.value
            if local:
                raise LocalProtocolError(f"{event} is not allowed in state {state}")
            self._state = _S.FAILED
            raise ProtocolError(f"the peer sent {event} in state {state}", message_type=event)
        if apply:
            self._state = target
        return target

    def _take_frame(self) -> bytes | None:
        if len(self._inbox) < HEADER.size:
            return None
        (length,) = HEADER.unpack_from(self._inbox)
        if length > MAX_HANDSHAKE_FRAME:
            self._state = _S.FAILED
            raise ProtocolError(f"handshake frame of {length} bytes exceeds the cap")
        if len(self._inbox) < HEADER.size + length:
            return None
        body = bytes(self._inbox[HEADER.size : HEADER.size + length])
        del self._inbox[: HEADER.size + length]
        return body

    def _send(self, msg: dict[str, Any]) -> None:
        self._outbox += encode(msg, max_size=MAX_HANDSHAKE_FRAME)

    def _new_share(self) -> bytes:
        self._secret = X25519PrivateKey.from_private_bytes(self._rng(32))
        return self._secret.public_key().public_bytes_raw()

    def _own_quote(self, report_data: bytes) -> bytes:
        quote = self._attester.quote(report_data)
        body = self._verifier.verify(quote)
        if body.report_data != report_data:
            raise PlatformError("the platform's quote does not carry the requested report data")
        self._own = EnclaveIdentity.from_report(body)
        return quote

    def _verify_peer(self, quote: bytes, report_data: bytes) -> EnclaveIdentity:
        body = self._verifier.verify(quote)
        if body.report_data != report_data:
            raise ReportDataError(
                f"the {'destination' if self.role is Role.SOURCE else 'source'}'s quote does not"
                " bind this handshake (replayed, spliced or a substituted key)"
            )
        self._peer = EnclaveIdentity.from_report(body)
        return self._peer

    def _agree(self, peer_share: bytes) -> None:
        assert self._secret is not None and self._mid is not None
        assert self._own is not None and self._peer is not None
        try:
            shared = self._secret.exchange(X25519PublicKey.from_public_bytes(peer_share))
        except ValueError as exc:
            raise ProtocolError("the peer's key share is invalid") from exc
        self._secret = None
        th = sha512(self._transcript)
        keys = key_schedule(shared, th)
        source, destination = (
            (self._own, self._peer) if self.role is Role.SOURCE else (self._peer, self._own)
        )
        self._keys = SessionKeys(
            role=self.role,
            migration_id=self._mid,
            transcript_hash=th,
            source=source,
            destination=destination,
            stream_secret=keys["stream source to destination"],
            control_source_key=keys["control source to destination"],
            control_destination_key=keys["control destination to source"],
            streams=StreamChannel(
                keys["stream source to destination"],
                migration_id=self._mid,
                source=source,
                destination=destination,
                sending=self.role is Role.SOURCE,
                rng=self._rng,
            ),
        )
        self._confirm_keys = (keys["source confirm"], keys["destination confirm"])

    def _on_source_hello(self, msg: dict[str, Any]) -> None:
        if msg["v"] != PROTOCOL_VERSION:
            raise ProtocolError(f"unsupported handshake version {msg['v']}", version=msg["v"])
        if len(msg["mid"]) != 16 or len(msg["share"]) != 32:
            raise ProtocolError("source hello: migration id or key share has the wrong size")
        if self._seen is not None and self._seen.migration_claimed(msg["mid"]):
            raise ReplayError(
                "this migration id was accepted before", migration_id=msg["mid"].hex()
            )
        self._mid = msg["mid"]
        t1 = (
            transcript_item("protocol", b"migsgx/v1 handshake")
            + transcript_item("migration-id", msg["mid"])
            + transcript_item("source-share", msg["share"])
        )
        source = self._verify_peer(msg["quote"], sha512(t1))
        share = self._new_share()
        self._transcript = (
            t1
            + transcript_item("source-quote", msg["quote"])
            + transcript_item("destination-share", share)
        )
        quote = self._own_quote(sha512(self._transcript))
        assert self._own is not None
        self._policy.check(source, self._own)
        self._transcript += transcript_item("destination-quote", quote)
        self._agree(msg["share"])
        assert self._keys is not None
        confirm = mac(self._confirm_keys[1], self._keys.transcript_hash)
        self._send({"t": "destination-hello", "share": share, "quote": quote, "confirm": confirm})

    def _on_destination_hello(self, msg: dict[str, Any]) -> None:
        if len(msg["share"]) != 32 or len(msg["confirm"]) != 32:
            raise ProtocolError("destination hello: key share or confirmation has the wrong size")
        self._transcript += transcript_item("destination-share", msg["share"])
        destination = self._verify_peer(msg["quote"], sha512(self._transcript))
        assert self._own is not None
        self._policy.check(self._own, destination)
        self._transcript += transcript_item("destination-quote", msg["quote"])
        self._agree(msg["share"])
        assert self._keys is not None
        th = self._keys.transcript_hash
        if not mac_ok(self._confirm_keys[1], th, msg["confirm"]):
            self._keys = None
            raise KeyConfirmationError("the destination's key confirmation does not verify")
        self._send({"t": "source-finished", "confirm": mac(self._confirm_keys[0], th)})
        self._confirm_keys = (b"", b"")

    def _on_source_finished(self, msg: dict[str, Any]) -> None:
        assert self._keys is not None
        if not mac_ok(self._confirm_keys[0], self._keys.transcript_hash, msg["confirm"]):
            self._keys = None
            raise KeyConfirmationError("the source's key confirmation does not verify")
        self._confirm_keys = (b"", b"")
