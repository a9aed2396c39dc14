"""A failed step's logs: their useful end in its error, whole copies kept for a post-mortem.

A failed CRIU dump or restore says why in its log (``dump.log``,
``restore.log``) and runc in its own (``runc.log``), but the directories
they are written to belong to the migration and go with it: the agent removes
a failed session's images, runc's log is removed after each command.  An
error message carries only an excerpt (:func:`log_excerpt`, which leaves out the
lines CRIU logs on every run here).  Where
``$MIGSGX_KEEP_LOGS`` names a directory (the storm's ``--keep-failed`` sets
it), each such log is copied there whole at the failure, named by the time, the
process and what failed, before its directory goes.  Unset, nothing is kept.

The logs hold what CRIU and runc write: file names, pids, addresses, never an
enclave's secret (enclave memory is not part of the process images CRIU logs).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from pathlib import Path
from typing import Final

__all__ = ["KEEP_LOGS_ENV", "harmless", "keep_log", "log_excerpt"]

KEEP_LOGS_ENV: Final = "MIGSGX_KEEP_LOGS"


def keep_log(path: Path, what: str) -> Path | None:
    """Copy the log ``path`` (``what`` failed) into ``$MIGSGX_KEEP_LOGS``, if set; the
    copy's path.  Never raises: a log that cannot be kept must not hide the failure."""

    target = os.environ.get(KEEP_LOGS_ENV, "")
    if not target:
        return None
    label = "".join(c if c.isalnum() or c in "-." else "-" for c in what)[:60]
    name = f"{time.time():.6f}-{os.getpid()}-{label}-{path.name}"
    with contextlib.suppress(OSError):
        directory = Path(target)
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        return Path(shutil.copyfile(path, directory / name))
    return None


#: Errors CRIU logs on every run here that say nothing about the failure: root
#: lacks CAP_SYS_RESOURCE, so CRIU cannot raise its own RLIMIT_NOFILE.
_HARMLESS = ("Can't setup RLIMIT_NOFILE",)


def harmless(line: str) -> bool:
    return any(marker in line for marker in _HARMLESS)


def log_excerpt(path: Path, lines: int = 12, *, max_bytes: int = 1 << 20) -> str:
    """The useful end of a CRIU log: its last error lines, else its last lines."""

    try:
        with path.open("rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - max_bytes))
            text = f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    all_lines = [line for line in text.splitlines() if line.strip() and not harmless(line)]
    errors = [line for line in all_lines if "Error" in line]
    return "\n".join((errors or all_lines)[-lines:])
