"""Keep a failed step's logs for a post-mortem: ``$MIGSGX_KEEP_LOGS``.

A failed CRIU dump or restore says why in its log (``dump.log``,
``restore.log``) and runc in its own (``runc.log``), but the directories
they are written to belong to the migration and go with it: the agent removes
a failed session's images, runc's log is removed after each command.  An
error message carries only an excerpt (:func:`migsgx.criu.log_excerpt`).  Where
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

__all__ = ["KEEP_LOGS_ENV", "keep_log"]

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
