"""Persistent enclave state that moves with the enclave (``docs/spec/persistent.md``).

An enclave that opens a persistent state (``EnclaveContext.open_persistent``)
gets a *record*: random migratable sealing keys (MSKs, one generation more with
every arrival by migration or checkpoint), a stable record id, and its
migratable monotonic counters, each a platform counter of the current host
plus an offset.  The record is sealed with the platform's seal key (MRENCLAVE
policy: bound to this host and this enclave) and kept by the platform service
under the enclave's owner and the record's name.  It names an *epoch* counter
and the value it must hold: every change of the record advances the epoch in
the same atomic platform update that stores the new record, so an older record
never opens again; every use of the record checks the epoch first, so an
instance whose record was taken over (another instance opened it) or moved (a
migration committed) can no longer seal, unseal or count.

A migration carries the MSKs and the counters' *values* in its encrypted
stream (the ``persistent`` section).  The source retires its record when it
commits (the record, the epoch counter and every counter go, in one atomic
update, and only if the epoch still holds the value this instance knows); the
destination installs a fresh record with fresh platform counters whose offsets
make them read exactly the migrated values, and a new key generation that the
source never had, after it has claimed the migration id.

From the moment a dump begins until the migration aborts, every seal and
counter operation through the context, migratable or not, raises
:class:`FrozenError`: what the enclave does then would be missing from (or
contradict) the state that is on its way.

The record's formats are :mod:`migsgx.enclave.persistent_format`, its life on
a host :mod:`migsgx.enclave.persistent_record`, the enclave's seal and counter
operations :mod:`migsgx.enclave.persistent_ops`; this module moves it.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Sequence
from typing import TypeVar

import cbor2

from ..errors import (
    ClaimedBeforeError,
    CounterError,
    EnclaveLostError,
    GroupDecidedError,
    PersistentStateError,
    PlatformAnswerLostError,
)
from ..sgx.store_types import RecordUpdate
from .persistent_format import (
    MAX_KEY_GENERATIONS,
    PendingImport,
    _digest,
    _reservation_blob,
    _reservation_of,
    parse_section,
)
from .persistent_ops import _PersistentOps
from .persistent_record import _MCounter

_T = TypeVar("_T")

FREEZE_TIMEOUT = 30.0


class PersistentState(_PersistentOps):
    """One enclave's persistent record, and the gate of its seal and counter operations."""

    # --- migration (the trusted runtime only) ---------------------------------------------
    def freeze(self, timeout: float | None = FREEZE_TIMEOUT) -> None:
        self._gate.freeze(timeout)

    def thaw(self) -> None:
        self._gate.thaw()

    def export(self) -> bytes:
        """The ``persistent`` section's plaintext; call frozen.  CBOR null when not open."""

        with self._lock:
            if self._name is None or self._gone is not None:
                return bytes(cbor2.dumps(None))
            self._require_current()
            values = {n: self._read(n) for n in self._counters}
            return bytes(
                cbor2.dumps(
                    {
                        "v": 1,
                        "name": self._name,
                        "rid": self._rid,
                        "keys": list(self._keys),
                        "counters": values,
                        "retiring": hashlib.sha256(self._record).digest(),
                    }
                )
            )

    def retire(self, reason: str, *, also: Sequence[tuple[str, RecordUpdate]] = ()) -> None:
        """The state has moved: record, epoch and counters go, in one atomic update.

        Refused (and nothing changes) if the epoch moved since this instance last
        checked it: then another instance owns the record, and the exported
        values may be out of date.  ``also`` joins the same platform update (a
        checkpoint's gate moving to committed): the two happen together or not
        at all.
        """

        with self._lock:
            if self._name is None or self._gone is not None:
                if also:
                    self._transaction(list(also), "the decision was not recorded")
                self._gone = reason
                return
            cids = tuple(c.cid for c in self._counters.values())
            retiring = RecordUpdate(
                None,
                destroy=(self._epoch_id, *cids),
                check={self._epoch_id: self._epoch},
                expect=_digest(self._record),
            )
            self._transaction(
                [(self._name, retiring), *also],
                "the persistent state was taken over by another instance; not retired",
            )
            self._gone = reason
            self._keys = []

    def retire_with(
        self,
        reason: str,
        write: Callable[[Sequence[tuple[str, RecordUpdate]]], _T],
        *,
        also: Sequence[tuple[str, RecordUpdate]] = (),
    ) -> _T:
        """Retire as :meth:`retire` does, inside ``write``: one atomic platform update.

        ``write`` gets the record updates (the retirement, when a record is
        open, then ``also``) and must apply them in one write together with its
        own change (a migration's decision does, ``TrustedServices.decide``).
        Its result is returned.  If it raises, nothing was retired.
        """

        with self._lock:
            if self._name is None or self._gone is not None:
                result = write(list(also))
                self._gone = self._gone or reason
                return result
            cids = tuple(c.cid for c in self._counters.values())
            update = RecordUpdate(
                None,
                destroy=(self._epoch_id, *cids),
                check={self._epoch_id: self._epoch},
                expect=_digest(self._record),
            )
            try:
                result = write([(self._name, update), *also])
            except GroupDecidedError:
                raise  # (the group's first decision stands: not a conflict of this record)
            except CounterError as exc:
                raise PersistentStateError(
                    "the persistent state was taken over by another instance; not retired"
                ) from exc
            self._gone = reason
            self._keys = []
            return result

    def reopen_with(
        self, section: bytes, write: Callable[[Sequence[tuple[str, RecordUpdate]]], _T]
    ) -> _T:
        """A source whose COMMIT is revoked: its record again, inside ``write`` (one update).

        ``section`` is the ``persistent`` section this enclave exported at its
        dump (its record was retired with the commit, so it is exported no
        more): the same name, record id, keys and counter values, on fresh
        platform counters and a fresh epoch (the retired ones are gone), created
        only if no record of that name exists (``docs/spec/commit.md``, 2.2).
        ``write`` gets the updates (none when no state was open) and applies
        them with the revocation; if it raises, nothing changed here.  The same
        updates are offered again after a failed ``write`` (the store returns a
        revocation made before without applying them twice).
        """

        pending = parse_section(section)
        with self._lock:
            if self._gone is None:
                raise PersistentStateError("the persistent state was never retired")
            if pending is None:
                result = write([])
                self._gone = None
                return result
            plan = self._reopen_plan
            if plan is None or plan[0] != pending.name:
                epoch_id = self._new_id()
                counters = {n: _MCounter(self._new_id(), v) for n, v in pending.values.items()}
                self._name, self._rid, self._keys = pending.name, pending.record_id, pending.keys
                self._epoch_id = epoch_id
                record = self._seal_record(1, counters)
                plan = (pending.name, epoch_id, counters, record)
                self._reopen_plan = plan
            name, epoch_id, counters, record = plan
            create = {epoch_id: 1, **{c.cid: 0 for c in counters.values()}}
            result = write([(name, RecordUpdate(record, create=create, expect_absent=True))])
            self._name, self._rid, self._keys = name, pending.record_id, list(pending.keys)
            self._epoch_id, self._epoch, self._counters = epoch_id, 1, dict(counters)
            self._record, self._gone, self._reopen_plan = record, None, None
            return result

    def prepare_import(self, section: bytes, arrival: bytes = b"") -> PendingImport | None:
        """Validate a migrated ``persistent`` section before LOADED; None if it is empty.

        The name is reserved here for ``arrival`` (the migration or checkpoint
        id); a reservation this very arrival left before (its enclave died,
        and the same state is delivered again) is taken over.
        """

        with self._lock:
            if self._name is not None:
                raise PersistentStateError("this enclave has a persistent state of its own")
        pending = parse_section(section)
        if pending is None:
            return None
        occupant = self._services.persist_read(pending.name)
        held = _reservation_of(occupant)
        if held is not None and held[0] == arrival and arrival:
            pending.reservation, pending.arrival = held[1], arrival
            return pending
        # A record of that name may stand here only if it is the very record the
        # source retires at its commit (a migration to the same host).
        if occupant is not None and hashlib.sha256(occupant).digest() != pending.retiring:
            raise PersistentStateError(
                f"a persistent state {pending.name!r} exists on this host already"
            )
        if occupant is None:
            # Reserve the name now, before LOADED: an enclave launched here in the
            # meantime cannot take it, so the install after the commit cannot fail.
            reservation = self._new_id()
            try:
                self._services.persist_update(
                    pending.name,
                    RecordUpdate(
                        _reservation_blob(arrival, reservation),
                        create={reservation: 0},
                        expect_absent=True,
                    ),
                )
            except CounterError as exc:
                raise PersistentStateError(
                    f"a persistent state {pending.name!r} exists on this host already"
                ) from exc
            pending.reservation, pending.arrival = reservation, bytes(arrival)
        return pending

    def release(self, pending: PendingImport | None) -> None:
        """An arrival that will not run: its reservation goes (only if still unused)."""

        if pending is None or pending.reservation is None:
            return
        with contextlib.suppress(CounterError, OSError):
            self._services.persist_update(
                pending.name,
                RecordUpdate(
                    None,
                    destroy=(pending.reservation,),
                    check={pending.reservation: 0},
                    expect=_digest(_reservation_blob(pending.arrival, pending.reservation)),
                ),
            )
        pending.reservation = None

    def _transaction(
        self, changes: list[tuple[str, RecordUpdate]], refused: str, *, claim: bytes | None = None
    ) -> None:
        try:
            if len(changes) == 1 and claim is None:
                self._services.persist_update(*changes[0])
            else:
                self._services.persist_transaction(changes, claim=claim)
        except ClaimedBeforeError:
            raise
        except CounterError as exc:
            raise PersistentStateError(refused) from exc

    def install(
        self,
        pending: PendingImport | None,
        *,
        also: Sequence[tuple[str, RecordUpdate]] = (),
        claim: bytes | None = None,
    ) -> None:
        """Destination, after the commit: a fresh record and counters on this host.

        ``also`` joins the same platform update (a checkpoint's gate consumed),
        and so does ``claim`` (the migration id): the state is installed exactly
        when the right to run it is taken.  A claimed id raises
        :class:`~migsgx.errors.ClaimedBeforeError` and changes nothing.
        """

        if pending is None:
            if also or claim is not None:
                self._transaction(list(also), "the arrival could not be claimed here", claim=claim)
            return
        with self._lock:
            if self._name is not None:
                raise PersistentStateError("this enclave has a persistent state of its own")
            sent = False  # (the install's platform update went out: it may be applied)
            try:
                self._name = pending.name
                self._rid = pending.record_id
                # A new generation: blobs sealed here from now on never open on a
                # source that outlived its commit (a rolled-back host, say).
                self._keys = list(pending.keys)
                if len(self._keys) < MAX_KEY_GENERATIONS:
                    self._keys.append(self._random(32))
                self._epoch_id = self._new_id()
                self._epoch = 1
                self._counters = {
                    n: _MCounter(self._new_id(), v) for n, v in pending.values.items()
                }
                create = {self._epoch_id: 1, **{c.cid: 0 for c in self._counters.values()}}
                record = self._seal_record(1, self._counters)
                if pending.reservation is not None:
                    # The reservation made before LOADED is replaced (and proven unused).
                    installing = RecordUpdate(
                        record,
                        create=create,
                        destroy=(pending.reservation,),
                        check={pending.reservation: 0},
                        expect=_digest(_reservation_blob(pending.arrival, pending.reservation)),
                    )
                else:
                    installing = RecordUpdate(record, create=create, expect_absent=True)
                sent = True
                self._transaction(
                    [(pending.name, installing), *also],
                    f"cannot install the migrated persistent state {pending.name!r} here",
                    claim=claim,
                )
            except (PersistentStateError, ClaimedBeforeError):
                self._forget()
                raise
            except EnclaveLostError as exc:
                # Its platform service away: nothing was applied (a key or the update
                # never got an answer), so nothing is installed here either, and a later
                # claim may install it (W2 (c)).  The update's answer lost: it may have
                # been applied, so what was installed is kept.
                if not (sent and isinstance(exc, PlatformAnswerLostError)):
                    self._forget()
                raise
            pending.reservation = None
            self._record = record
