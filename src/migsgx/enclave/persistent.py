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
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import cbor2

from ..errors import (
    ClaimedBeforeError,
    CounterError,
    EnclaveBusyError,
    FrozenError,
    GroupDecidedError,
    PersistentStateError,
    RollbackError,
    SealError,
)
from ..sgx.store_types import COUNTER_MAX, RECORD_NAME, RecordUpdate
from ..sgx.trusted import TrustedServices
from . import sealing

_T = TypeVar("_T")

RECORD_AAD = b"migsgx persistent record v1 "
#: The record that holds a name for a migration arriving here (before LOADED):
#: this prefix, then CBOR [arrival id, reservation counter id].
RESERVED = b"migsgx persistent reservation v1 "
MAX_MCOUNTERS = 64
MAX_KEY_GENERATIONS = 4096
MAX_TRANSFER_BYTES = 1 << 20
FREEZE_TIMEOUT = 30.0


def _valid_name(name: Any, what: str) -> str:
    if not isinstance(name, str) or not RECORD_NAME.fullmatch(name):
        raise ValueError(f"{what} is 1 to 64 characters of A-Z a-z 0-9 . _ -")
    return name


class _Gate:
    """Admission of seal and counter operations, closed while a dump is under way."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._active = 0
        self._frozen = False

    @contextlib.contextmanager
    def operation(self) -> Iterator[None]:
        with self._cond:
            if self._frozen:
                raise FrozenError(
                    "seal and counter operations are frozen while this enclave migrates"
                )
            self._active += 1
        try:
            yield
        finally:
            with self._cond:
                self._active -= 1
                self._cond.notify_all()

    def freeze(self, timeout: float | None) -> None:
        """Close the gate and wait for operations under way; they finish first."""

        with self._cond:
            self._frozen = True
            if not self._cond.wait_for(lambda: self._active == 0, timeout):
                self._frozen = False
                self._cond.notify_all()
                raise EnclaveBusyError("seal or counter operations still run; freeze abandoned")

    def thaw(self) -> None:
        with self._cond:
            self._frozen = False

    @property
    def frozen(self) -> bool:
        with self._cond:
            return self._frozen


@dataclass(frozen=True)
class _MCounter:
    cid: str  # the platform counter on this host
    offset: int  # value = platform value + offset


@dataclass
class PendingImport:
    """A migrated persistent state, verified and waiting for the commit."""

    name: str
    record_id: bytes
    keys: list[bytes]
    values: dict[str, int]
    retiring: bytes  # SHA-256 of the record the source retires at its commit
    #: The counter that holds the name reserved here until the install (None when
    #: the name is held by the very record the source retires: the same host).
    reservation: str | None = None
    arrival: bytes = b""  # the migration or checkpoint id the reservation is for


class PersistentState:
    """One enclave's persistent record, and the gate of its seal and counter operations."""

    def __init__(
        self, services: TrustedServices, *, random: Callable[[int], bytes] = os.urandom
    ) -> None:
        self._services = services
        self._random = random
        self._gate = _Gate()
        self._lock = threading.RLock()
        self._name: str | None = None
        self._rid = b""
        self._keys: list[bytes] = []
        self._record = b""  # the sealed record as last stored
        self._epoch_id = ""
        self._epoch = 0
        self._counters: dict[str, _MCounter] = {}
        self._gone: str | None = None

    # --- state --------------------------------------------------------------------
    @property
    def name(self) -> str | None:
        return self._name

    @property
    def is_open(self) -> bool:
        with self._lock:
            return self._name is not None and self._gone is None

    @property
    def frozen(self) -> bool:
        return self._gate.frozen

    def guard(self) -> contextlib.AbstractContextManager[None]:
        """Enter one seal or counter operation; :class:`FrozenError` while frozen."""

        return self._gate.operation()

    def status(self) -> dict[str, Any]:
        """Public facts only (no key, no counter value)."""

        with self._lock:
            return {
                "name": self._name,
                "open": self._name is not None and self._gone is None,
                "frozen": self._gate.frozen,
                "counters": sorted(self._counters),
            }

    # --- the record -----------------------------------------------------------------
    def _new_id(self) -> str:
        return self._random(16).hex()

    def _seal_record(self, epoch: int, counters: dict[str, _MCounter]) -> bytes:
        assert self._name is not None
        payload = {
            "v": 1,
            "name": self._name,
            "rid": self._rid,
            "keys": list(self._keys),
            "epoch": [self._epoch_id, epoch],
            "counters": {n: [c.cid, c.offset] for n, c in counters.items()},
        }
        return sealing.seal(
            self._services,
            cbor2.dumps(payload),
            aad=RECORD_AAD + self._name.encode(),
            policy=sealing.POLICY_MRENCLAVE,
        )

    def open(self, name: str) -> bool:
        """Open the record ``name`` on this host, or create it; True if it was created."""

        _valid_name(name, "a persistent state's name")
        with self._gate.operation(), self._lock:
            if self._gone is not None:
                raise PersistentStateError(self._gone)
            if self._name is not None:
                raise PersistentStateError("this enclave has opened its persistent state already")
            blob = self._services.persist_read(name)
            if blob is None:
                self._create(name)
                return True
            if blob.startswith(RESERVED):
                raise PersistentStateError(
                    f"the persistent state {name!r} is reserved by a migration arriving here"
                )
            self._take_over(name, blob)
            return False

    def _create(self, name: str) -> None:
        self._name = name
        self._rid = self._random(16)
        self._keys = [self._random(32)]
        self._epoch_id = self._new_id()
        self._epoch = 1
        self._counters = {}
        record = self._seal_record(1, {})
        try:
            self._services.persist_update(
                name, RecordUpdate(record, create={self._epoch_id: 1}, expect_absent=True)
            )
        except CounterError as exc:
            self._forget()
            raise PersistentStateError(f"cannot create the persistent state {name!r}") from exc
        self._record = record

    def _take_over(self, name: str, blob: bytes) -> None:
        rec = open_record(self._services, name, blob)
        epoch_id, epoch = rec["epoch"]
        try:
            current = self._services.counter_read(epoch_id)
        except CounterError as exc:
            raise PersistentStateError(
                f"the persistent record {name!r} was retired (its state moved away)"
            ) from exc
        if current != epoch:
            raise RollbackError(
                f"the persistent record {name!r} does not match its epoch counter (rolled back)"
            )
        self._name = name
        self._rid = rec["rid"]
        self._keys = list(rec["keys"])
        self._epoch_id = epoch_id
        self._counters = {n: _MCounter(c, o) for n, (c, o) in rec["counters"].items()}
        self._record = blob  # what the take-over replaces (compare-and-set)
        # Take the record over: the epoch moves on, so any other instance that
        # opened this record before can no longer use it.
        try:
            self._commit_record(dict(self._counters), epoch_before=epoch)
        except PersistentStateError:
            self._forget()
            raise

    def _commit_record(
        self,
        counters: dict[str, _MCounter],
        *,
        epoch_before: int | None = None,
        create: dict[str, int] | None = None,
        destroy: tuple[str, ...] = (),
    ) -> None:
        """Store a new record naming ``counters``, advancing the epoch, atomically."""

        assert self._name is not None
        before = self._epoch if epoch_before is None else epoch_before
        record = self._seal_record(before + 1, counters)
        try:
            self._services.persist_update(
                self._name,
                RecordUpdate(
                    record,
                    create=create or {},
                    advance={self._epoch_id: before + 1},
                    destroy=destroy,
                    check={self._epoch_id: before},
                    expect=_digest(self._record),
                ),
            )
        except CounterError as exc:
            if self._epoch_holds(before):
                raise  # refused for another reason (a limit, say); nothing changed
            raise PersistentStateError(
                "the persistent state was taken over by another instance or moved away"
            ) from exc
        self._epoch = before + 1
        self._counters = counters
        self._record = record

    def _forget(self) -> None:
        self._name = None
        self._rid = self._record = b""
        self._keys = []
        self._epoch_id = ""
        self._epoch = 0
        self._counters = {}

    def _require_current(self) -> None:
        """The record is open, and still this instance's: its epoch holds our value."""

        if self._gone is not None:
            raise PersistentStateError(self._gone)
        if self._name is None:
            raise PersistentStateError("the enclave has not opened a persistent state")
        if not self._epoch_holds(self._epoch):
            raise PersistentStateError(
                "the persistent state was taken over by another instance or moved away"
            )

    def _epoch_holds(self, value: int) -> bool:
        try:
            return self._services.counter_read(self._epoch_id) == value
        except CounterError:
            return False

    # --- migratable counters ------------------------------------------------------------
    def _counter(self, name: str) -> _MCounter:
        counter = self._counters.get(name)
        if counter is None:
            raise PersistentStateError(f"no migratable counter {name!r}")
        return counter

    def counter_create(self, name: str, initial: int = 0) -> int:
        _valid_name(name, "a counter's name")
        if not 0 <= initial <= COUNTER_MAX:
            raise ValueError("initial value out of range")
        with self._gate.operation(), self._lock:
            self._require_current()
            if name in self._counters:
                raise PersistentStateError(f"a migratable counter {name!r} exists already")
            if len(self._counters) >= MAX_MCOUNTERS:
                raise PersistentStateError(f"at most {MAX_MCOUNTERS} migratable counters")
            counter = _MCounter(self._new_id(), initial)
            self._commit_record({**self._counters, name: counter}, create={counter.cid: 0})
            return initial

    def _read(self, name: str) -> int:
        counter = self._counter(name)
        return self._services.counter_read(counter.cid) + counter.offset

    def counter_read(self, name: str) -> int:
        with self._gate.operation(), self._lock:
            self._require_current()
            return self._read(name)

    def _increment(self, name: str, by: int) -> int:
        if by < 1:
            raise CounterError("a monotonic counter only grows")
        counter = self._counter(name)
        if self._read(name) + by > COUNTER_MAX:
            raise CounterError("counter would overflow")
        return self._services.counter_increment(counter.cid, by) + counter.offset

    def counter_increment(self, name: str, by: int = 1) -> int:
        with self._gate.operation(), self._lock:
            self._require_current()
            return self._increment(name, by)

    def counter_destroy(self, name: str) -> None:
        with self._gate.operation(), self._lock:
            self._require_current()
            counter = self._counter(name)
            rest = {n: c for n, c in self._counters.items() if n != name}
            self._commit_record(rest, destroy=(counter.cid,))

    def counter_names(self) -> list[str]:
        with self._gate.operation(), self._lock:
            self._require_current()
            return sorted(self._counters)

    # --- migratable sealing ------------------------------------------------------------
    def seal(self, data: bytes, *, aad: bytes = b"", counter: str | None = None) -> bytes:
        """Seal under the MSK; with ``counter``, advance it and bind the blob to the value."""

        with self._gate.operation():
            with self._lock:
                self._require_current()
                binding = None
                if counter is not None:
                    binding = (counter, self._increment(counter, 1))
                keys, rid = self._keys, self._rid
            return sealing.seal_with_msk(
                keys[-1],
                rid,
                bytes(data),
                generation=len(keys) - 1,
                aad=bytes(aad),
                binding=binding,
                random=self._random,
            )

    def unseal(self, blob: bytes, *, aad: bytes | None = None, fresh: bool = True) -> bytes:
        """Open a migratable blob; a counter-bound blob must be the newest one if ``fresh``."""

        with self._gate.operation():
            with self._lock:
                self._require_current()
                keys, rid = self._keys, self._rid
            plaintext, head = sealing.open_with_msk(keys, rid, bytes(blob), aad=aad)
            if head.binding is not None and fresh:
                name, value = head.binding
                with self._lock:
                    self._require_current()
                    if name not in self._counters:
                        raise RollbackError(
                            f"the blob is bound to counter {name!r}, which no longer exists"
                        )
                    current = self._read(name)
                if value < current:
                    raise RollbackError(
                        f"the blob is older than the newest one sealed with counter {name!r}"
                    )
                if value > current:
                    raise RollbackError(f"counter {name!r} is behind the blob (rolled back)")
            return plaintext

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
                self._transaction(
                    list(also), "the arrival could not be claimed here", claim=claim
                )
            return
        with self._lock:
            if self._name is not None:
                raise PersistentStateError("this enclave has a persistent state of its own")
            self._name = pending.name
            self._rid = pending.record_id
            # A new generation: blobs sealed here from now on never open on a
            # source that outlived its commit (a rolled-back host, say).
            self._keys = list(pending.keys)
            if len(self._keys) < MAX_KEY_GENERATIONS:
                self._keys.append(self._random(32))
            self._epoch_id = self._new_id()
            self._epoch = 1
            self._counters = {n: _MCounter(self._new_id(), v) for n, v in pending.values.items()}
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
            try:
                self._transaction(
                    [(pending.name, installing), *also],
                    f"cannot install the migrated persistent state {pending.name!r} here",
                    claim=claim,
                )
            except (PersistentStateError, ClaimedBeforeError):
                self._forget()
                raise
            pending.reservation = None
            self._record = record


def reservation_release(blob: bytes) -> tuple[bytes, RecordUpdate] | None:
    """For a reservation record: its arrival id and the update that releases it.

    The update removes the record and its counter only if both are still what
    the reservation made (unused, unchanged).  None for any other record.  Who
    applies it must know that no live enclave of the host still holds that
    arrival loaded (the destination agent: none of its sessions does).
    """

    held = _reservation_of(blob)
    if held is None:
        return None
    arrival, counter = held
    update = RecordUpdate(None, destroy=(counter,), check={counter: 0}, expect=_digest(blob))
    return arrival, update


def _reservation_blob(arrival: bytes, counter: str) -> bytes:
    return RESERVED + bytes(cbor2.dumps([bytes(arrival), counter]))


def _reservation_of(blob: bytes | None) -> tuple[bytes, str] | None:
    """(arrival id, counter id) of a reservation record; None for anything else."""

    if blob is None or not blob.startswith(RESERVED):
        return None
    try:
        arrival, counter = cbor2.loads(blob[len(RESERVED) :])
    except (ValueError, TypeError, cbor2.CBORDecodeError):
        return None
    if not isinstance(arrival, bytes) or not isinstance(counter, str):
        return None
    return arrival, counter


def open_record(services: TrustedServices, name: str, blob: bytes) -> dict[str, Any]:
    """Unseal and check the record ``name`` (section 4 of the spec); no epoch check here.

    Public so that the format's vectors run the very code an enclave runs.
    """

    try:
        plaintext = sealing.unseal(services, blob, aad=RECORD_AAD + name.encode())
        return _parse_record(plaintext, name)
    except SealError as exc:
        raise PersistentStateError(
            f"the persistent record {name!r} on this host does not open for this enclave"
        ) from exc


def parse_section(section: bytes) -> PendingImport | None:
    """A migrated ``persistent`` section (section 6.2 of the spec); None when it is empty."""

    try:
        data = cbor2.loads(section)
    except Exception as exc:
        raise PersistentStateError("the migrated persistent state does not decode") from exc
    if data is None:
        return None
    return _parse_transfer(data)


def _parse_record(plaintext: bytes, name: str) -> dict[str, Any]:
    try:
        rec = cbor2.loads(plaintext)
    except Exception as exc:
        raise SealError("the persistent record is malformed") from exc
    ok = (
        isinstance(rec, dict)
        and rec.get("v") == 1
        and rec.get("name") == name
        and _is_bytes(rec.get("rid"), 16)
        and _are_keys(rec.get("keys"))
        and isinstance(rec.get("epoch"), list)
        and len(rec["epoch"]) == 2
        and isinstance(rec["epoch"][0], str)
        and _is_uint(rec["epoch"][1])
        and isinstance(rec.get("counters"), dict)
        and all(
            isinstance(n, str)
            and isinstance(c, list)
            and len(c) == 2
            and isinstance(c[0], str)
            and _is_uint(c[1])
            for n, c in rec["counters"].items()
        )
    )
    if not ok:
        raise SealError("the persistent record is malformed")
    return rec  # type: ignore[no-any-return]


def _parse_transfer(data: Any) -> PendingImport:
    ok = (
        isinstance(data, dict)
        and set(data) == {"v", "name", "rid", "keys", "counters", "retiring"}
        and data["v"] == 1
        and isinstance(data["name"], str)
        and RECORD_NAME.fullmatch(data["name"]) is not None
        and _is_bytes(data["rid"], 16)
        and _are_keys(data["keys"])
        and _is_bytes(data["retiring"], 32)
        and isinstance(data["counters"], dict)
        and len(data["counters"]) <= MAX_MCOUNTERS
        and all(
            isinstance(n, str) and RECORD_NAME.fullmatch(n) is not None and _is_uint(v)
            for n, v in data["counters"].items()
        )
    )
    if not ok:
        raise PersistentStateError("the migrated persistent state is malformed")
    return PendingImport(
        data["name"], data["rid"], list(data["keys"]), dict(data["counters"]), data["retiring"]
    )


def _is_bytes(value: Any, size: int) -> bool:
    return isinstance(value, bytes) and len(value) == size


def _are_keys(value: Any) -> bool:
    return (
        isinstance(value, list)
        and 1 <= len(value) <= MAX_KEY_GENERATIONS
        and all(_is_bytes(k, 32) for k in value)
    )


def _is_uint(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= COUNTER_MAX


def _digest(record: bytes) -> bytes | None:
    """What a record update compares and sets against: the record it replaces."""

    return hashlib.sha256(record).digest() if record else None
