"""The enclave logs of a platform service: one file per launch, a bounded number of them.

A log is named by a random instance id, never by anything an enclave author
chose, and is readable by the service's user only (0600): the enclave writes
through the descriptor it inherits and cannot open the file again, nor another
enclave's.  The service keeps at most :data:`MAX_LOGS` of them, dropping the
oldest of enclaves that ended first; in the sandbox each is at most 16 MiB
(``RLIMIT_FSIZE``), so the directory is bounded too.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Collection
from pathlib import Path
from typing import BinaryIO, Final

__all__ = ["MAX_LOGS", "open_instance_log", "prune_logs"]

MAX_LOGS: Final = 256
_PATTERN: Final = "enclave-*.log"


def open_instance_log(log_dir: Path) -> tuple[Path, BinaryIO]:
    """A fresh log file for one enclave process, opened for appending."""

    path = log_dir / f"enclave-{secrets.token_hex(8)}.log"
    fd = os.open(
        path,
        os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC,
        0o600,
    )
    return path, os.fdopen(fd, "ab")


def prune_logs(log_dir: Path, live: Collection[Path], max_logs: int = MAX_LOGS) -> None:
    """Leave room for one more log: delete the oldest beyond ``max_logs - 1``, never a live one."""

    logs = sorted(log_dir.glob(_PATTERN), key=_mtime)
    if len(logs) < max_logs:
        return
    for path in logs[: len(logs) - max_logs + 1]:
        if path not in live:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return 0.0
