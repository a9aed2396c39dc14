"""The host's counter store, CounterStore: its durable migration decisions.

Counters, persistent records and migration claims are the layer below
(:mod:`migsgx.sgx.record_store`); this layer adds each migration's decision,
first one wins (``docs/spec/commit.md``), recorded in the same atomic write as
the record updates that go with it (the source's retired persistent record,
a checkpoint's gate), so that a COMMIT never exists without them.  It also
holds the way back from a COMMIT a destination never acted on (section 2.2):
the destination host's refusal of a migration id for good (no claim of it
succeeds after), and the source host's revocation of a COMMIT on an attested
proof of that refusal.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, Final

import cbor2

from .._fs import write_private
from ..errors import ClaimedBeforeError, CounterError, GroupDecidedError, StoreFullError
from .claims import _admit_claim, _quota_keys
from .record_store import _RecordStore
from .store_types import DECISION_KINDS, Decision, RecordUpdate

#: The store's file in a host's state directory (here, not in :mod:`.platform`: a
#: reader of decisions, ``migsgx recover``, need not load the platform).
COUNTERS: Final = "counters.cbor"

# Quotas (see :mod:`migsgx.sgx.record_store`): a full store refuses, never evicts.
MAX_DECISIONS_PER_OWNER = 4096
MAX_DECISIONS_TOTAL = 65536


def _as_decided(entry: dict[str, Any]) -> object:
    """The kind a recorded decision counts as in its group: a revoked one committed.

    Its siblings committed with it, and each is undone only by its own
    destination's refusal; so a revocation never lets a sibling abort.
    """

    kind = entry.get("kind")
    return "commit" if kind == "revoked" else kind


def _mid_of(key: object) -> bytes:
    """The migration id a decision is filed under (its hex key); corrupt keys raise."""

    try:
        return bytes.fromhex(key) if isinstance(key, str) else b""
    except ValueError:
        return b""  # (Decision refuses an id that is not 16 bytes)


class CounterStore(_RecordStore):
    """The host's one durable store: counters, records, claims, and decisions."""

    # --- refused migration ids (the destination's half of commit.md 2.2) -------------
    def refuse(self, owner: bytes, mid: bytes) -> bool:
        """Refuse ``mid`` here for good, unless some enclave claimed it; False if refused before.

        The destination's half of the way back from a COMMIT it never acted on
        (``docs/spec/commit.md``, section 2.2): once this returned, no claim of
        ``mid`` succeeds on this host, by any owner, ever, so the committed
        source may run again on an attested proof of it.  A claim by any owner
        (this store's or the former claim store's) makes the refusal fail with
        :class:`ClaimedBeforeError` and changes nothing: that copy may run.  A
        refusal counts against ``owner``'s claim quota and the host's.  One
        atomic write, as a claim is.
        """

        if not isinstance(mid, bytes | bytearray) or len(mid) != 16:
            raise CounterError("a migration id has 16 bytes")
        mid = bytes(mid)
        tail = b"/" + mid
        with self._locked():
            data = self._load_all()
            if any(bytes(c).endswith(tail) for c in data["claims"]) or self._legacy_claimed(mid):
                raise ClaimedBeforeError(
                    "this migration id was claimed on this host: it cannot be refused"
                )
            if mid.hex() in data["refusals"]:
                return False
            _admit_claim(_quota_keys(data), owner)
            data["refusals"][mid.hex()] = {"owner": owner, "at": time.time()}
            write_private(self._path, cbor2.dumps(data))
            return True

    def refused(self, mid: bytes) -> bool:
        """Whether ``mid`` was refused for good on this host (by any owner)."""

        with self._locked():
            return bytes(mid).hex() in self._load_all()["refusals"]

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

        if decision.kind not in DECISION_KINDS:
            raise CounterError("a revocation is no decision: only a commit is revoked")
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
                d.get("group") == decision.group and _as_decided(d) != decision.kind
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

    def revoke(
        self,
        owner: bytes,
        migration_id: bytes,
        reopen: Sequence[tuple[str, RecordUpdate]] = (),
    ) -> Decision:
        """Turn ``owner``'s COMMIT of ``migration_id`` into ``revoked``; returns the record.

        The source's half of the way back (``docs/spec/commit.md``, section
        2.2): its enclave calls this only on an attested proof that the
        destination host refused the id for good.  ``reopen`` (record updates,
        as in :meth:`record_transaction`: the persistent record the commit
        retired, created again) goes in the same atomic write.  Only a
        ``commit`` of this owner is revoked; an ``abort``, another owner's
        decision or none raises :class:`CounterError` and changes nothing.  A
        decision revoked before is returned as it is, ``reopen`` not applied
        again (the enclave whose answer was lost asks with the same updates).
        """

        keys = self._check_changes(owner, reopen)
        key = bytes(migration_id).hex()
        with self._locked():
            data = self._load_all()
            held = data["decisions"].get(key)
            if held is None or held.get("owner") != owner:
                raise CounterError("no decision of this enclave for this migration id")
            if held.get("kind") == "revoked":
                return Decision.from_entry(bytes(migration_id), held)
            if held.get("kind") != "commit":
                raise CounterError("only a commit is revoked; this migration was aborted")
            for record_key, (name, update) in zip(keys, reopen, strict=True):
                self._apply(data, owner, record_key, name, update)
            held["kind"] = "revoked"
            held["revoked_at"] = time.time()
            write_private(self._path, cbor2.dumps(data))
            return Decision.from_entry(bytes(migration_id), held)

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
        kinds = {str(_as_decided(d)) for d in held.values() if d.get("group") == bytes(group)}
        return kinds.pop() if len(kinds) == 1 else None

    def decisions(self) -> list[Decision]:
        """Every recorded decision, oldest first."""

        with self._locked():
            held = self._load_all()["decisions"]
        items = [Decision.from_entry(_mid_of(k), v) for k, v in held.items()]
        return sorted(items, key=lambda d: d.at)
