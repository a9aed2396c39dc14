"""Each arm of a benchmark starts without the dirty page cache of what ran before it.

An arm that writes its images to a disk's file system (ext4 here, the
testbed's directory) leaves up to the images' size dirty; removing the files
drops those pages unwritten, but what else the machine wrote (the testbed's
set-up, other users) may still be dirty when the next arm starts, and the
kernel's writeback of it would then run inside that arm's timed part.
:func:`settle` runs before the timed part of every arm: when the machine holds
more than :data:`SETTLED_MIB` dirty or under writeback, it writes back the
file system of the arm's images (``syncfs``, that file system only: not every
disk of a shared machine) and waits, at most :data:`SETTLE_TIMEOUT` seconds,
for ``Dirty`` + ``Writeback`` to fall below it.  What it found and did is in
the arm's figures (``settle``), outside its timed part.
"""

from __future__ import annotations

import ctypes
import os
import time
from pathlib import Path
from typing import Any, Final

from .memwatch import meminfo_mib

__all__ = ["SETTLED_MIB", "SETTLE_TIMEOUT", "settle", "syncfs"]

#: Dirty + under writeback (MiB) below which an arm may start without waiting.
SETTLED_MIB: Final = 64.0
SETTLE_TIMEOUT: Final = 10.0
POLL: Final = 0.1


def syncfs(path: Path) -> None:
    """Write back the file system that holds ``path`` (``syncfs(2)``); OSError if it fails."""

    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY)  # (a directory opens read-only too)
    try:
        if libc.syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), str(path))
    finally:
        os.close(fd)


def _pending(values: dict[str, float]) -> float:
    return values.get("Dirty", 0.0) + values.get("Writeback", 0.0)


def settle(
    path: Path,
    *,
    threshold_mib: float = SETTLED_MIB,
    timeout: float = SETTLE_TIMEOUT,
    meminfo: Path = Path("/proc/meminfo"),
) -> dict[str, Any]:
    """Wait until the machine's dirty and writeback page cache is below ``threshold_mib``
    (see the module); the figures of what was found, done and left."""

    start = time.monotonic()
    before = meminfo_mib(meminfo)
    synced = False
    error = ""
    if _pending(before) > threshold_mib:
        try:
            syncfs(path)
            synced = True
        except OSError as exc:
            error = str(exc)
    now = meminfo_mib(meminfo)
    while _pending(now) > threshold_mib and time.monotonic() - start < timeout:
        time.sleep(POLL)
        now = meminfo_mib(meminfo)
    out: dict[str, Any] = {
        "dirty_before_mib": before.get("Dirty", 0.0),
        "writeback_before_mib": before.get("Writeback", 0.0),
        "dirty_after_mib": now.get("Dirty", 0.0),
        "writeback_after_mib": now.get("Writeback", 0.0),
        "synced": synced,
        "settled": _pending(now) <= threshold_mib,
        "seconds": round(time.monotonic() - start, 3),
    }
    if error:
        out["error"] = error
    return out
