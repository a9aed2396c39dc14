"""One enclave's persistent record on this host, and the gate of its operations.

The record is opened or created, taken over from an instance that opened it
before, and every change of it is stored with its epoch counter advanced in
one compare-and-set platform update (``docs/spec/persistent.md``, sections
4.1 and 4.2); every use checks the epoch first.  The gate admits seal and
counter operations and closes them while a dump is under way (section 6.1).  The operations
themselves (:mod:`migsgx.enclave.persistent_ops`) and the migration of the
record (:mod:`migsgx.enclave.persistent`) are the layers above.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import cbor2

from ..errors import (
    CounterError,
    EnclaveBusyError,
    FrozenError,
    PersistentStateError,
    RollbackError,
)
from ..sgx.store_types import RecordUpdate
from ..sgx.trusted import TrustedServices
from . import sealing
from .persistent_format import RECORD_AAD, RESERVED, _digest, _valid_name, open_record


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


class _PersistentRecord:
    """The record's life on this host: open, create, take over, commit each change."""

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
        #: A revoked commit's record, made once and offered again until stored
        #: (name, epoch counter id, counters, sealed record): ``reopen_with``.
        self._reopen_plan: tuple[str, str, dict[str, _MCounter], bytes] | None = None

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
