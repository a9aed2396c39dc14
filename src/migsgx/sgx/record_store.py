"""The host's durable store of counters, persistent records and migration claims.

A counter belongs to the enclave identity that created it (its owner key,
derived from MRENCLAVE or MRSIGNER + product id, by the owner policy) and only
that identity may read, increment or destroy it.  Values only grow.  Every
change is written to disk (atomically, fsynced) before it is acknowledged, so
a counter survives a restart of the platform at its last acknowledged value.

Beside the counters the same file keeps each enclave's *persistent record*
(``docs/spec/persistent.md``): an opaque sealed blob under an owner and a
name.  A :class:`~migsgx.sgx.store_types.RecordUpdate` changes a record and the
counters it names in one atomic write, with compare conditions, so that an
enclave's record and its epoch counter never disagree after a crash.  The
platform cannot read a record; it only keeps it, as AESM kept the data of
SGX's platform services.  The migration ids claimed on this host are in the
same file, so that a claim and the install it allows are one write.

This is the layer below :class:`~migsgx.sgx.counters.CounterStore`, which adds
the migration decisions.

A store operation made for an enclave whose channel hung up is refused under
the store's lock (:func:`for_requester`): a write that began before the
hang-up is made, one that had not is refused for good, since that enclave can
never ask again.  So whoever reads the store (under the same lock) once the
enclave's process ended reads what will always be there (``docs/spec/commit.md``,
section 5).
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import cbor2

from .._fs import read_private, write_private
from ..errors import (
    ClaimedBeforeError,
    CounterError,
    EnclaveLostError,
    MigrationRefusedError,
    RecordConflictError,
    StoreFullError,
)
from .claims import ClaimStore, _admit_claim, _check_mid, _quota_keys, _refusals_sound
from .store_file import _create_once, _FileLock
from .store_types import COUNTER_MAX, RECORD_NAME, RUNTIME_RECORD_NAME, RecordUpdate

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
MAX_TRANSACTION = 4
LEGACY_CLAIMS = "migrations.cbor"
_COUNTER_ID = re.compile(r"[0-9a-f]{32}")


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


#: The request this thread serves: its enclave's ``gone`` check (:func:`for_requester`).
_requester = threading.local()


@contextlib.contextmanager
def for_requester(gone: Callable[[], bool]) -> Iterator[None]:
    """Store operations of this thread, inside, serve an enclave that ``gone`` watches.

    Each checks ``gone()`` right after it took the store's lock and, if it is
    true, changes nothing and raises :class:`EnclaveLostError`.  The platform
    service serves every request of an enclave so (``gone``: its channel hung
    up), so that a decision the enclave sent and died before it was written is
    never written afterwards: the death came first, and every reader that
    takes the lock after it reads the store's last word on that enclave.
    """

    _requester.gone = gone
    try:
        yield
    finally:
        _requester.gone = None


class _RequesterLock(_FileLock):
    """The store's lock, refusing the operation of a requester that is gone."""

    def __enter__(self) -> None:
        super().__enter__()
        gone = getattr(_requester, "gone", None)
        if gone is not None and gone():
            self.__exit__(None, None, None)
            raise EnclaveLostError(
                "the enclave hung up its platform channel before this request reached "
                "the store: refused for good (it can never ask again)"
            )


def _record_key(owner: bytes, name: str) -> str:
    if not isinstance(name, str) or not (
        RECORD_NAME.fullmatch(name) or RUNTIME_RECORD_NAME.fullmatch(name)
    ):
        raise CounterError("a record name is 1 to 64 characters of A-Z a-z 0-9 . _ -")
    return owner.hex() + "/" + name


class _RecordStore:
    """Counters, records and claims of one host, in one file; no decision here."""

    def __init__(self, path: Path) -> None:
        self._path = Path(path)
        self._lock = threading.Lock()
        self._lock_path = self._path.with_name(self._path.name + ".lock")
        empty = {
            "v": 1,
            "counters": {},
            "records": {},
            "decisions": {},
            "claims": [],
            "refusals": {},
        }
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
        refusals = data.get("refusals", {}) if isinstance(data, dict) else None
        if (
            not isinstance(counters, dict)
            or not isinstance(records, dict)
            or not isinstance(claims, list)
            or not _refusals_sound(refusals)
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
            "refusals": refusals,
        }

    def _load(self) -> dict[str, dict[str, Any]]:
        counters: dict[str, dict[str, Any]] = self._load_all()["counters"]
        return counters

    def _save(self, counters: dict[str, dict[str, Any]]) -> None:
        data = self._load_all()
        data["counters"] = counters
        write_private(self._path, cbor2.dumps(data))

    def _locked(self) -> _FileLock:
        return _RequesterLock(self._lock, self._lock_path)

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

    def _claim_in(self, data: dict[str, Any], owner: bytes, mid: bytes) -> None:
        claims: list[bytes] = data["claims"]
        claim_key = owner + b"/" + mid
        if mid.hex() in data["refusals"]:
            raise MigrationRefusedError("this migration id was refused for good on this host")
        if claim_key in claims or self._claimed_before(owner, mid):
            raise ClaimedBeforeError("this migration id was claimed before on this host")
        _admit_claim(_quota_keys(data), owner)
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
        return self._legacy_claimed(mid)

    def _legacy_claimed(self, mid: bytes) -> bool:
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
