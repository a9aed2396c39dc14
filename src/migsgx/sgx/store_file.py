"""One store's file: a lock across threads and processes, and its creation once.

The counter store and the former claim store each keep one private CBOR file
that two platform processes (the service, ``migsgx recover``) may open at the
same time; both take this lock for every read-modify-write, and create their
file through :func:`_create_once`, so that no first writer is overwritten.
"""

from __future__ import annotations

import fcntl
import os
import sys
import threading
import time
from pathlib import Path

from .._fs import write_private


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
