"""Persistent monotonic counters of one emulated host.

A counter belongs to the enclave identity that created it (its owner key,
derived from MRENCLAVE or MRSIGNER + product id, by the owner policy) and only
that identity may read, increment or destroy it.  Values only grow.  Every
change is written to disk (atomically, fsynced) before it is acknowledged, so
a counter survives a restart of the platform at its last acknowledged value.
"""

from __future__ import annotations

import fcntl
import os
import threading
import uuid
from pathlib import Path
from typing import Any

import cbor2

from .._fs import read_private, write_private
from ..errors import CounterError

MAX_COUNTERS_PER_OWNER = 256
COUNTER_MAX = (1 << 64) - 1


class CounterStore:
    def __init__(self, path: Path) -> None:
        self._path = Path(path)
        self._lock = threading.Lock()
        self._lock_path = self._path.with_name(self._path.name + ".lock")
        if not self._path.exists():
            write_private(self._path, cbor2.dumps({"v": 1, "counters": {}}))

    def _load(self) -> dict[str, dict[str, Any]]:
        try:
            data = cbor2.loads(read_private(self._path))
        except (OSError, ValueError, cbor2.CBORDecodeError) as exc:
            raise CounterError(f"counter store {self._path} is unreadable") from exc
        counters = data.get("counters") if isinstance(data, dict) else None
        if not isinstance(counters, dict):
            raise CounterError(f"counter store {self._path} is corrupt")
        return counters

    def _save(self, counters: dict[str, dict[str, Any]]) -> None:
        write_private(self._path, cbor2.dumps({"v": 1, "counters": counters}))

    def _locked(self) -> _FileLock:
        return _FileLock(self._lock, self._lock_path)

    def create(self, owner: bytes, initial: int = 0) -> tuple[str, int]:
        if not 0 <= initial <= COUNTER_MAX:
            raise CounterError("initial value out of range")
        with self._locked():
            counters = self._load()
            owned = sum(1 for c in counters.values() if c["owner"] == owner)
            if owned >= MAX_COUNTERS_PER_OWNER:
                raise CounterError("too many counters for this enclave")
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
        if not self._path.exists():
            write_private(self._path, cbor2.dumps({"v": 1, "claims": []}))

    def _load(self) -> list[bytes]:
        try:
            data = cbor2.loads(read_private(self._path))
        except (OSError, ValueError, cbor2.CBORDecodeError) as exc:
            raise CounterError(f"claim store {self._path} is unreadable") from exc
        claims = data.get("claims") if isinstance(data, dict) else None
        if not isinstance(claims, list):
            raise CounterError(f"claim store {self._path} is corrupt")
        return claims

    def claim(self, owner: bytes, mid: bytes) -> bool:
        """Record ``mid`` for ``owner``; False if it was recorded before."""

        key = owner + b"/" + bytes(mid)
        with _FileLock(self._lock, self._lock_path):
            claims = self._load()
            if key in claims:
                return False
            claims.append(key)
            write_private(self._path, cbor2.dumps({"v": 1, "claims": claims}))
            return True

    def claimed(self, owner: bytes, mid: bytes) -> bool:
        with _FileLock(self._lock, self._lock_path):
            return owner + b"/" + bytes(mid) in self._load()
