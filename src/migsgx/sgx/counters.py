"""Persistent monotonic counters of one emulated host.

A counter belongs to the enclave identity that created it (its owner key,
derived from MRENCLAVE or MRSIGNER + product id, by the owner policy) and only
that identity may read, increment or destroy it.  Values only grow.  Every
change is written to disk (atomically, fsynced) before it is acknowledged, so
a counter survives a restart of the platform at its last acknowledged value.

Beside the counters the same file keeps each enclave's *persistent record*
(``docs/spec/persistent.md``): an opaque sealed blob under an owner and a
name.  A :class:`RecordUpdate` changes a record and the counters it names in
one atomic write, with compare conditions, so that an enclave's record and its
epoch counter never disagree after a crash.  The platform cannot read a
record; it only keeps it, as AESM kept the data of SGX's platform services.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import sys
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cbor2

from .._fs import read_private, write_private
from ..errors import (
    ClaimedBeforeError,
    CounterError,
    GroupDecidedError,
    RecordConflictError,
    StoreFullError,
)

# Quotas.  Every owner (MRSIGNER + product id + DEBUG) has its own; the host-wide
# caps bound the files however many owners launch control lets in.  A full store
# refuses with StoreFullError and changes nothing; nothing is ever evicted (an
# evicted migration claim would let its COMMIT token activate a second copy).
MAX_COUNTERS_PER_OWNER = 256
MAX_RECORDS_PER_OWNER = 64
MAX_RECORD_BYTES = 256 << 10
MAX_RECORD_BYTES_PER_OWNER = 1 << 20
MAX_COUNTERS_TOTAL = 16384
MAX_RECORD_BYTES_TOTAL = 64 << 20
MAX_CLAIMS_PER_OWNER = 4096
MAX_CLAIMS_TOTAL = 65536
MAX_DECISIONS_PER_OWNER = 4096
MAX_DECISIONS_TOTAL = 65536
MAX_DECISION_FRAME = 4096
DECISION_KINDS = ("commit", "abort")
COUNTER_MAX = (1 << 64) - 1
RECORD_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
# Records the trusted runtime keeps for itself (a checkpoint's gate, say): a name
# no enclave's own persistent state can take.
RUNTIME_RECORD_NAME = re.compile(r"![a-z]{1,16}-[0-9a-f]{32}")
MAX_TRANSACTION = 4
LEGACY_CLAIMS = "migrations.cbor"
_COUNTER_ID = re.compile(r"[0-9a-f]{32}")


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
    (``frame`` is the sealed ABORT, empty if the handshake never finished).
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
        if self.kind not in DECISION_KINDS:
            raise CounterError(f"a decision is one of {DECISION_KINDS}")
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


def _is_uint(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= COUNTER_MAX


def _entries_sound(
    counters: dict[Any, Any], records: dict[Any, Any], decisions: dict[Any, Any], claims: list[Any]
) -> bool:
    """Every entry has the shape the store writes: a disk or a local edit may break any.

    Checked once per load, so that no operation trips over one malformed entry
    (a ``TypeError`` deep in a platform request) instead of refusing the store.
    """

    return (
        all(
            isinstance(k, str)
            and isinstance(c, dict)
            and isinstance(c.get("owner"), bytes)
            and _is_uint(c.get("value"))
            for k, c in counters.items()
        )
        and all(
            isinstance(k, str)
            and isinstance(r, dict)
            and isinstance(r.get("owner"), bytes)
            and isinstance(r.get("blob"), bytes)
            and isinstance(r.get("group", b""), bytes)
            for k, r in records.items()
        )
        and all(
            isinstance(k, str) and isinstance(d, dict) and isinstance(d.get("owner"), bytes)
            for k, d in decisions.items()
        )
        and all(isinstance(c, bytes) for c in claims)
    )


def _mid_of(key: object) -> bytes:
    """The migration id a decision is filed under (its hex key); corrupt keys raise."""

    try:
        return bytes.fromhex(key) if isinstance(key, str) else b""
    except ValueError:
        return b""  # (Decision refuses an id that is not 16 bytes)


def _record_key(owner: bytes, name: str) -> str:
    if not isinstance(name, str) or not (
        RECORD_NAME.fullmatch(name) or RUNTIME_RECORD_NAME.fullmatch(name)
    ):
        raise CounterError("a record name is 1 to 64 characters of A-Z a-z 0-9 . _ -")
    return owner.hex() + "/" + name


class CounterStore:
    def __init__(self, path: Path) -> None:
        self._path = Path(path)
        self._lock = threading.Lock()
        self._lock_path = self._path.with_name(self._path.name + ".lock")
        empty = {"v": 1, "counters": {}, "records": {}, "decisions": {}, "claims": []}
        _create_once(self._path, _FileLock(self._lock, self._lock_path), cbor2.dumps(empty))

    def _load_all(self) -> dict[str, Any]:
        try:
            data = cbor2.loads(read_private(self._path))
        except (OSError, ValueError, cbor2.CBORDecodeError) as exc:
            raise CounterError(f"counter store {self._path} is unreadable") from exc
        counters = data.get("counters") if isinstance(data, dict) else None
        records = data.get("records", {}) if isinstance(data, dict) else None
        decisions = data.get("decisions", {}) if isinstance(data, dict) else None
        claims = data.get("claims", []) if isinstance(data, dict) else None
        if (
            not isinstance(counters, dict)
            or not isinstance(records, dict)
            or not isinstance(claims, list)
        ):
            raise CounterError(f"counter store {self._path} is corrupt")
        if not isinstance(decisions, dict) or not _entries_sound(
            counters, records, decisions, claims
        ):
            raise CounterError(f"counter store {self._path} is corrupt")
        return {
            "v": 1,
            "counters": counters,
            "records": records,
            "decisions": decisions,
            "claims": claims,
        }

    def _load(self) -> dict[str, dict[str, Any]]:
        counters: dict[str, dict[str, Any]] = self._load_all()["counters"]
        return counters

    def _save(self, counters: dict[str, dict[str, Any]]) -> None:
        data = self._load_all()
        data["counters"] = counters
        write_private(self._path, cbor2.dumps(data))

    def _locked(self) -> _FileLock:
        return _FileLock(self._lock, self._lock_path)

    def create(self, owner: bytes, initial: int = 0) -> tuple[str, int]:
        if not 0 <= initial <= COUNTER_MAX:
            raise CounterError("initial value out of range")
        with self._locked():
            counters = self._load()
            owned = sum(1 for c in counters.values() if c["owner"] == owner)
            if owned >= MAX_COUNTERS_PER_OWNER:
                raise StoreFullError("too many counters for this enclave's owner")
            if len(counters) >= MAX_COUNTERS_TOTAL:
                raise StoreFullError("the host's counter store is full")
            cid = uuid.uuid4().hex
            counters[cid] = {"owner": owner, "value": initial}
            self._save(counters)
            return cid, initial

    def _get(self, counters: dict[str, dict[str, Any]], owner: bytes, cid: str) -> dict[str, Any]:
        entry = counters.get(cid)
        # One answer for "absent" and "not yours": no probing of others' counters.
        if entry is None or entry["owner"] != owner:
            raise CounterError(f"no counter {cid} for this enclave")
        return entry

    def read(self, owner: bytes, cid: str) -> int:
        with self._locked():
            return int(self._get(self._load(), owner, cid)["value"])

    def increment(self, owner: bytes, cid: str, by: int = 1) -> int:
        if by < 1:
            raise CounterError("a monotonic counter only grows")
        with self._locked():
            counters = self._load()
            entry = self._get(counters, owner, cid)
            value = int(entry["value"]) + by
            if value > COUNTER_MAX:
                raise CounterError("counter would overflow")
            entry["value"] = value
            self._save(counters)
            return value

    def destroy(self, owner: bytes, cid: str) -> None:
        with self._locked():
            counters = self._load()
            self._get(counters, owner, cid)
            del counters[cid]
            self._save(counters)

    # --- persistent records ------------------------------------------------------
    def record_read(self, owner: bytes, name: str) -> bytes | None:
        key = _record_key(owner, name)
        with self._locked():
            entry = self._load_all()["records"].get(key)
        if entry is None:
            return None
        if not isinstance(entry, dict) or not isinstance(entry.get("blob"), bytes):
            raise CounterError(f"counter store {self._path} is corrupt")
        return bytes(entry["blob"])

    def records(self) -> list[tuple[bytes, str, bytes]]:
        """Every record as (owner, name, blob): for host-side housekeeping."""

        with self._locked():
            entries = self._load_all()["records"]
        out: list[tuple[bytes, str, bytes]] = []
        for key, entry in entries.items():
            owner, _, name = str(key).partition("/")
            if isinstance(entry, dict) and isinstance(entry.get("blob"), bytes):
                with contextlib.suppress(ValueError):
                    out.append((bytes.fromhex(owner), name, bytes(entry["blob"])))
        return out

    def record_update(self, owner: bytes, name: str, update: RecordUpdate) -> None:
        """Apply ``update`` atomically (see :class:`RecordUpdate`), or change nothing."""

        self.record_transaction(owner, [(name, update)])

    def record_transaction(
        self,
        owner: bytes,
        changes: Sequence[tuple[str, RecordUpdate]],
        *,
        claim: bytes | None = None,
    ) -> None:
        """Apply several record updates as one atomic write, or change nothing.

        Each update is checked against the state the updates before it left, so
        a transaction may, say, retire one record and advance the counter that
        gates another: the two can never be seen apart, even across a crash.
        With ``claim``, the migration id is claimed in the same write
        (:class:`ClaimedBeforeError` if it was claimed before), so that an
        arriving state is installed exactly when its id is taken.
        """

        if not changes and claim is None:
            raise CounterError(f"a transaction holds 1 to {MAX_TRANSACTION} record updates")
        keys = self._check_changes(owner, changes)
        with self._locked():
            data = self._load_all()
            if claim is not None:
                self._claim_in(data, owner, bytes(claim))
            for key, (name, update) in zip(keys, changes, strict=True):
                self._apply(data, owner, key, name, update)
            write_private(self._path, cbor2.dumps(data))

    @staticmethod
    def _check_changes(owner: bytes, changes: Sequence[tuple[str, RecordUpdate]]) -> list[str]:
        """The checks of a transaction that need no stored state; its record keys."""

        if len(changes) > MAX_TRANSACTION:
            raise CounterError(f"a transaction holds 1 to {MAX_TRANSACTION} record updates")
        keys = [_record_key(owner, name) for name, _ in changes]
        if len(set(keys)) != len(keys):
            raise CounterError("a transaction changes one record twice")
        for _, update in changes:
            if update.record is not None and len(update.record) > MAX_RECORD_BYTES:
                raise CounterError("a persistent record is limited to 256 KiB")
            changed = [*update.create, *update.advance, *update.destroy]
            if len(set(changed)) != len(changed):
                raise CounterError("a record update changes one counter twice")
        return keys

    # --- migration decisions -------------------------------------------------------
    def decide(
        self,
        owner: bytes,
        decision: Decision,
        retire: Sequence[tuple[str, RecordUpdate]] = (),
    ) -> Decision:
        """Record ``decision`` for its migration id, first one wins; returns the one that holds.

        ``retire`` (record updates, as in :meth:`record_transaction`) is applied
        in the same atomic write, and only if this decision is the first: a
        migration's source gives its persistent record up (and moves a
        checkpoint's gate) exactly when its COMMIT is recorded, never one
        without the other.  A decision of another owner under the same id is
        refused.  Nothing is ever evicted (a full store refuses with
        StoreFullError, and then no commit can happen).

        A decision with a ``group`` whose first recorded decision is of the
        other kind is refused with :class:`GroupDecidedError` and changes
        nothing: once one enclave of a migration committed, no other records an
        abort (it commits too), and the other way round.

        A group that tags records (a checkpoint's gates, :class:`RecordUpdate`)
        is *bound* to them: its decisions are kept while any record of that tag
        is there (a member that can still decide has its pending gate), and
        dropped once none is (every gate committed and restored, or aborted),
        so that checkpoints do not fill the store.  A migration's decisions tag
        no record and are never dropped.
        """

        keys = self._check_changes(owner, retire)
        key = decision.migration_id.hex()
        with self._locked():
            data = self._load_all()
            decisions: dict[str, Any] = data["decisions"]
            held = decisions.get(key)
            if held is not None:
                if held.get("owner") != owner:
                    raise CounterError("this migration id was decided by another enclave")
                return Decision.from_entry(decision.migration_id, held)
            tags = {r.get("group") for r in data["records"].values() if r.get("group")}
            for stale in [k for k, d in decisions.items() if d.get("bound")
                          and d.get("group") not in tags]:  # fmt: skip
                del decisions[stale]
            mine = sum(
                1 for d in decisions.values() if isinstance(d, dict) and d.get("owner") == owner
            )
            if mine >= MAX_DECISIONS_PER_OWNER or len(decisions) >= MAX_DECISIONS_TOTAL:
                raise StoreFullError("the host's decision store is full")
            if decision.group and any(
                d.get("group") == decision.group and d.get("kind") != decision.kind
                for d in decisions.values()
            ):
                raise GroupDecidedError(
                    f"another enclave of this migration decided other than {decision.kind}"
                )
            for record_key, (name, update) in zip(keys, retire, strict=True):
                self._apply(data, owner, record_key, name, update)
            entry = {"owner": owner, **decision.to_entry()}
            if decision.group and decision.group in tags:
                entry["bound"] = True  # (tags as they were before this write)
            decisions[key] = entry
            write_private(self._path, cbor2.dumps(data))
            return decision

    def decision(self, migration_id: bytes) -> Decision | None:
        """The recorded decision of ``migration_id``, if any (it is not secret)."""

        with self._locked():
            held = self._load_all()["decisions"].get(bytes(migration_id).hex())
        return None if held is None else Decision.from_entry(migration_id, held)

    def group_decision(self, group: bytes) -> str | None:
        """The kind every decision of migration group ``group`` has, if any was made."""

        if not group:
            return None
        with self._locked():
            held = self._load_all()["decisions"]
        kinds = {str(d.get("kind")) for d in held.values() if d.get("group") == bytes(group)}
        return kinds.pop() if len(kinds) == 1 else None

    def decisions(self) -> list[Decision]:
        """Every recorded decision, oldest first."""

        with self._locked():
            held = self._load_all()["decisions"]
        items = [Decision.from_entry(_mid_of(k), v) for k, v in held.items()]
        return sorted(items, key=lambda d: d.at)

    def _claim_in(self, data: dict[str, Any], owner: bytes, mid: bytes) -> None:
        claims: list[bytes] = data["claims"]
        claim_key = owner + b"/" + mid
        if claim_key in claims or self._claimed_before(owner, mid):
            raise ClaimedBeforeError("this migration id was claimed before on this host")
        prefix = owner + b"/"
        if sum(1 for c in claims if c.startswith(prefix)) >= MAX_CLAIMS_PER_OWNER:
            raise StoreFullError("too many migration claims for this enclave's owner")
        if len(claims) >= MAX_CLAIMS_TOTAL:
            raise StoreFullError("the host's claim store is full")
        claims.append(claim_key)

    def claim(self, owner: bytes, mid: bytes) -> bool:
        """Record ``mid`` for ``owner``; False if it was recorded before."""

        try:
            self.record_transaction(owner, [], claim=mid)
        except ClaimedBeforeError:
            return False
        return True

    def claimed(self, owner: bytes, mid: bytes) -> bool:
        with self._locked():
            claims = self._load_all()["claims"]
        return owner + b"/" + bytes(mid) in claims or self._claimed_before(owner, mid)

    def claimed_by_any(self, mid: bytes) -> bool:
        """Whether any enclave claimed ``mid`` here (an agent answering ``migsgx recover``)."""

        tail = b"/" + _check_mid(mid)
        with self._locked():
            claims = self._load_all()["claims"]
        if any(bytes(c).endswith(tail) for c in claims):
            return True
        legacy = self._path.with_name(LEGACY_CLAIMS)
        return legacy.exists() and ClaimStore(legacy).claimed_by_any(mid)

    def _claimed_before(self, owner: bytes, mid: bytes) -> bool:
        """Claims of the former, separate claim store (``migrations.cbor``) still count."""

        legacy = self._path.with_name(LEGACY_CLAIMS)
        if not legacy.exists():
            return False
        return ClaimStore(legacy).claimed(owner, mid)

    def _apply(
        self, data: dict[str, Any], owner: bytes, key: str, name: str, update: RecordUpdate
    ) -> None:
        """Check ``update`` against ``data`` and apply it there (in memory only)."""

        counters: dict[str, dict[str, Any]] = data["counters"]
        records: dict[str, Any] = data["records"]
        for cid, value in update.check.items():
            if int(self._get(counters, owner, cid)["value"]) != value:
                raise CounterError(f"counter {cid} does not hold the expected value")
        for cid, value in update.advance.items():
            entry = self._get(counters, owner, cid)
            if not int(entry["value"]) < value <= COUNTER_MAX:
                raise CounterError("a monotonic counter only grows")
        for cid in update.destroy:
            self._get(counters, owner, cid)
        for cid, value in update.create.items():
            if not _COUNTER_ID.fullmatch(cid) or cid in counters:
                raise CounterError("a new counter needs a fresh id of 32 hex digits")
            if not 0 <= value <= COUNTER_MAX:
                raise CounterError("initial value out of range")
        owned = sum(1 for c in counters.values() if c["owner"] == owner)
        if owned - len(update.destroy) + len(update.create) > MAX_COUNTERS_PER_OWNER:
            raise StoreFullError("too many counters for this enclave's owner")
        if len(counters) - len(update.destroy) + len(update.create) > MAX_COUNTERS_TOTAL:
            raise StoreFullError("the host's counter store is full")
        current = records.get(key)
        if update.expect_absent and current is not None:
            raise CounterError(f"a persistent record {name!r} exists already")
        if not update.expect_absent:
            seen = None if current is None else hashlib.sha256(current["blob"]).digest()
            if update.expect != seen:
                raise RecordConflictError(
                    f"the persistent record {name!r} is not the one this update replaces"
                )
        if update.record is not None:
            self._check_record_quota(records, owner, key, len(update.record))
        for cid, value in update.advance.items():
            counters[cid] = {**counters[cid], "value": value}
        for cid in update.destroy:
            del counters[cid]
        for cid, value in update.create.items():
            counters[cid] = {"owner": owner, "value": value}
        if update.record is None:
            records.pop(key, None)
        else:
            entry = {"owner": owner, "name": name, "blob": bytes(update.record)}
            group = update.group or (current or {}).get("group", b"")
            if group:
                entry["group"] = bytes(group)
            records[key] = entry

    @staticmethod
    def _check_record_quota(records: dict[str, Any], owner: bytes, key: str, size: int) -> None:
        mine = [r for k, r in records.items() if r.get("owner") == owner and k != key]
        if key not in records and len(mine) >= MAX_RECORDS_PER_OWNER:
            raise StoreFullError("too many persistent records for this enclave's owner")
        if sum(len(r["blob"]) for r in mine) + size > MAX_RECORD_BYTES_PER_OWNER:
            raise StoreFullError("this enclave's owner has used its persistent record quota")
        others = sum(len(r["blob"]) for k, r in records.items() if k != key)
        if others + size > MAX_RECORD_BYTES_TOTAL:
            raise StoreFullError("the host's persistent record store is full")


def _create_once(path: Path, lock: _FileLock, empty: bytes) -> None:
    """Write the empty store at ``path`` unless it exists, under the store's lock.

    Two first users (the platform service, ``migsgx recover`` reading decisions)
    may both find no store: created outside the lock, the later creator's empty
    file would replace one the earlier had already written a decision or a
    counter into.  Under the lock the second one looks again and finds it.
    """

    if path.exists():
        return
    with lock:
        if path.exists():
            return
        _before_create()
        write_private(path, empty)


#: A test holds a store's creator between its look and its write here:
#: ``MIGSGX_FAULT=counters.before-create:wait-file=PATH`` (the agent's fault
#: syntax, :mod:`migsgx.agent.faults`, read here: this layer imports nothing above it).
_CREATE_POINT = "counters.before-create"
_CREATE_WAIT = 120.0


def _before_create() -> None:
    for item in os.environ.get("MIGSGX_FAULT", "").split(","):
        point, _, action = item.strip().partition(":")
        if point != _CREATE_POINT or not action.startswith("wait-file="):
            continue
        sys.stderr.write(f"migsgx fault: {point}:{action} at {time.monotonic():.6f}\n")
        sys.stderr.flush()
        path = Path(action.partition("=")[2])
        deadline = time.monotonic() + _CREATE_WAIT
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.02)


class _FileLock:
    """A thread lock plus an flock, so two platform processes never interleave."""

    def __init__(self, lock: threading.Lock, path: Path) -> None:
        self._lock = lock
        self._path = path
        self._fd = -1

    def __enter__(self) -> None:
        self._lock.acquire()
        try:
            self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o600)
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        except BaseException:
            self._lock.release()
            raise

    def __exit__(self, *exc: object) -> None:
        try:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
        finally:
            self._lock.release()


class ClaimStore:
    """Migration ids this host has accepted, each at most once, durably.

    This is the destination's seen-ids store: a migration's COMMIT token can
    activate a copy only by claiming its id here first.  On hardware it would
    be a rollback-protected log (a monotonic counter over a sealed list).
    """

    def __init__(self, path: Path) -> None:
        self._path = Path(path)
        self._lock = threading.Lock()
        self._lock_path = self._path.with_name(self._path.name + ".lock")
        empty = cbor2.dumps({"v": 1, "claims": []})
        _create_once(self._path, _FileLock(self._lock, self._lock_path), empty)

    def _load(self) -> list[bytes]:
        try:
            data = cbor2.loads(read_private(self._path))
        except (OSError, ValueError, cbor2.CBORDecodeError) as exc:
            raise CounterError(f"claim store {self._path} is unreadable") from exc
        claims = data.get("claims") if isinstance(data, dict) else None
        if not isinstance(claims, list) or not all(isinstance(c, bytes) for c in claims):
            raise CounterError(f"claim store {self._path} is corrupt")
        return claims

    def claim(self, owner: bytes, mid: bytes) -> bool:
        """Record ``mid`` for ``owner``; False if it was recorded before."""

        key = owner + b"/" + _check_mid(mid)
        with _FileLock(self._lock, self._lock_path):
            claims = self._load()
            if key in claims:
                return False
            prefix = owner + b"/"
            if sum(1 for c in claims if c.startswith(prefix)) >= MAX_CLAIMS_PER_OWNER:
                raise StoreFullError("this enclave's owner has used its migration claim quota")
            if len(claims) >= MAX_CLAIMS_TOTAL:
                raise StoreFullError("the host's migration claim store is full")
            claims.append(key)
            write_private(self._path, cbor2.dumps({"v": 1, "claims": claims}))
            return True

    def claimed(self, owner: bytes, mid: bytes) -> bool:
        with _FileLock(self._lock, self._lock_path):
            return owner + b"/" + _check_mid(mid) in self._load()

    def claimed_by_any(self, mid: bytes) -> bool:
        """Whether any enclave claimed ``mid`` here (an agent answering ``migsgx recover``)."""

        tail = b"/" + _check_mid(mid)
        with _FileLock(self._lock, self._lock_path):
            return any(key.endswith(tail) for key in self._load())


def _check_mid(mid: bytes) -> bytes:
    if not isinstance(mid, bytes | bytearray) or not 1 <= len(mid) <= 64:
        raise CounterError("a migration id is 1 to 64 bytes")
    return bytes(mid)
