"""The values the host's store takes and keeps: record updates and migration decisions.

A :class:`RecordUpdate` is what an enclave asks of its persistent record
(``docs/spec/persistent.md``; it crosses the PLATFORM channel as ``ps_update``),
a :class:`Decision` a migration source's final word on a migration id
(``docs/spec/commit.md``).  Both check their own shape when built, so that the
store (:mod:`migsgx.sgx.counters`) and the channel that carries them share one
definition of a well-formed value; neither needs the store to exist.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import CounterError

MAX_DECISION_FRAME = 4096
DECISION_KINDS = ("commit", "abort")
#: What a recorded decision may read: a ``commit`` becomes ``revoked`` (never by
#: ``decide``) on the destination's attested refusal (``docs/spec/commit.md``, 2.2).
RECORDED_KINDS = (*DECISION_KINDS, "revoked")
COUNTER_MAX = (1 << 64) - 1
RECORD_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
# Records the trusted runtime keeps for itself (a checkpoint's gate, say): a name
# no enclave's own persistent state can take.
RUNTIME_RECORD_NAME = re.compile(r"![a-z]{1,16}-[0-9a-f]{32}")


@dataclass(frozen=True)
class RecordUpdate:
    """One atomic change of a persistent record and of the counters it names.

    Applied all or nothing, in this order of checks: every counter in
    ``check`` has exactly the given value; every counter in ``advance`` and
    ``destroy`` exists and belongs to the caller, and each ``advance`` value is
    above the counter's current one; no counter in ``create`` exists (the
    enclave chooses the ids: 32 lowercase hex digits, so that the record it
    seals can name them before they exist); with ``expect_absent``, no record
    of that name exists; otherwise the record is compared and set: ``expect``
    is the SHA-256 of the record the caller read and replaces (None: there is
    none), so no update overwrites or deletes a record its writer has not
    seen.  Then the counters change and the record is replaced by ``record``,
    or deleted when ``record`` is None.

    ``group`` (16 bytes, only when the record is created) tags the record with
    a decision group: a checkpoint's gate, created pending, names the group of
    the checkpoint's enclaves, so that the store binds their decisions to each
    other (:meth:`CounterStore.decide`) for as long as a gate of the group is
    there.  A replaced record keeps its tag; nothing else reads it.
    """

    record: bytes | None
    create: Mapping[str, int] = field(default_factory=dict)
    advance: Mapping[str, int] = field(default_factory=dict)
    destroy: Sequence[str] = ()
    check: Mapping[str, int] = field(default_factory=dict)
    expect_absent: bool = False
    expect: bytes | None = None
    group: bytes = b""

    def __post_init__(self) -> None:
        if len(self.group) not in (0, 16):
            raise CounterError("a decision group id has 16 bytes")
        if self.group and not (self.expect_absent and self.record is not None):
            raise CounterError("a record is tagged with a group only when it is created")

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {
            "record": self.record,
            "create": dict(self.create),
            "advance": dict(self.advance),
            "destroy": list(self.destroy),
            "check": dict(self.check),
            "absent": self.expect_absent,
            "expect": self.expect,
        }
        if self.group:
            wire["group"] = bytes(self.group)
        return wire

    @classmethod
    def from_wire(cls, msg: Mapping[str, Any]) -> RecordUpdate:
        """Rebuild an update from the platform channel; malformed parts raise CounterError."""

        def counter_map(value: Any) -> dict[str, int]:
            if not isinstance(value, dict) or not all(
                isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool)
                for k, v in value.items()
            ):
                raise CounterError("a record update names counters malformed")
            return dict(value)

        destroy = msg.get("destroy")
        if not isinstance(destroy, list) or not all(isinstance(c, str) for c in destroy):
            raise CounterError("a record update names counters malformed")
        record = msg.get("record")
        if record is not None and not isinstance(record, bytes):
            raise CounterError("a record must be bytes")
        expect = msg.get("expect")
        if expect is not None and not (isinstance(expect, bytes) and len(expect) == 32):
            raise CounterError("a record update expects a SHA-256 digest or nothing")
        group = msg.get("group", b"")
        if not isinstance(group, bytes):
            raise CounterError("a decision group id has 16 bytes")
        return cls(
            record=record,
            create=counter_map(msg.get("create")),
            advance=counter_map(msg.get("advance")),
            destroy=tuple(destroy),
            check=counter_map(msg.get("check")),
            expect_absent=bool(msg.get("absent")),
            expect=expect,
            group=group,
        )


@dataclass(frozen=True)
class Decision:
    """A migration source's final word on one migration id (``docs/spec/commit.md``).

    ``kind`` is ``commit`` (``frame`` is the COMMIT token) or ``abort``
    (``frame`` is the sealed ABORT, empty if the handshake never finished);
    a recorded ``commit`` reads ``revoked`` once the destination host proved
    that it refused the id for good (the source runs again; ``frame`` is still
    the token, which no copy can use any more).
    Neither frame is secret: anyone may carry it to the destination again.
    ``group`` (16 bytes, or empty) names the migration the enclave moves with
    others of one application: the group's first decision binds them all.
    """

    migration_id: bytes
    kind: str
    frame: bytes
    at: float = 0.0
    group: bytes = b""

    def __post_init__(self) -> None:
        if self.kind not in RECORDED_KINDS:
            raise CounterError(f"a decision is one of {RECORDED_KINDS}")
        if len(self.migration_id) != 16:
            raise CounterError("a migration id has 16 bytes")
        if len(self.frame) > MAX_DECISION_FRAME:
            raise CounterError("a decision frame is limited to 4 KiB")
        if len(self.group) not in (0, 16):
            raise CounterError("a migration group id has 16 bytes")

    def to_entry(self) -> dict[str, Any]:
        entry = {"kind": self.kind, "frame": bytes(self.frame), "at": self.at or time.time()}
        if self.group:
            entry["group"] = bytes(self.group)
        return entry

    @classmethod
    def from_entry(cls, migration_id: bytes, entry: Any) -> Decision:
        at = entry.get("at", 0.0) if isinstance(entry, dict) else None
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("frame"), bytes)
            or not isinstance(entry.get("kind"), str)
            or not isinstance(at, (int, float))
            or isinstance(at, bool)
        ):
            raise CounterError("a recorded decision is corrupt")
        group = entry.get("group", b"")
        if not isinstance(group, bytes):
            raise CounterError("a recorded decision is corrupt")
        try:
            when = float(at)
        except OverflowError as exc:
            raise CounterError("a recorded decision is corrupt") from exc
        return cls(bytes(migration_id), entry["kind"], entry["frame"], when, group)
