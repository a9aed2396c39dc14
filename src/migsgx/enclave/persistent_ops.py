"""The seal and counter operations an enclave makes on its open persistent record.

Migratable counters (a platform counter plus an offset, each named by the
record) and migratable sealing under the record's keys
(``docs/spec/persistent.md``, sections 4 and 5): each passes the gate and
checks that the record is still this instance's, so an instance whose record
was taken over or moved away can no longer seal, unseal or count.
"""

from __future__ import annotations

from ..errors import CounterError, PersistentStateError, RollbackError
from ..sgx.store_types import COUNTER_MAX
from . import sealing
from .persistent_format import MAX_MCOUNTERS, _valid_name
from .persistent_record import _MCounter, _PersistentRecord


class _PersistentOps(_PersistentRecord):
    """Migratable counters and migratable sealing, as the enclave's context calls them."""

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
