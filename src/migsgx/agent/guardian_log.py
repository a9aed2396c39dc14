"""What every part of the guardian shares: its log, its patience, its pause.

The guardian reports on the tool's stderr until it has to wait for something
(a decision, a platform service, an enclave that does not answer, a first attempt
that takes longer than a second); from then on
it reports into a file (:func:`log_to`), so that the tool's caller, which reads
that stderr to its end, is not held by it.  ``migsgx recover`` cuts a pause
short with SIGUSR1 (:func:`pause`).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from typing import Final

__all__ = ["RECOVER_PATIENCE", "listen", "log", "log_to", "pause"]

#: How long the guardian keeps delivering a decision that the destination has
#: not confirmed (it holds the committed source enclaves meanwhile), and how long
#: it keeps asking source enclaves that cannot abort yet.
RECOVER_PATIENCE: Final = 600.0

_NUDGED: list[bool] = []
_LOGGING_ELSEWHERE: list[bool] = []


def _nudged(signum: int, frame: object) -> None:
    """SIGUSR1: ``migsgx recover`` asks for an attempt now."""

    _NUDGED.append(True)


def listen() -> None:
    """From now on SIGUSR1 cuts a :func:`pause` short (set before the tool can name us)."""

    signal.signal(signal.SIGUSR1, _nudged)


def pause(seconds: float) -> bool:
    """Sleep up to ``seconds``; True if SIGUSR1 cut it short."""

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if _NUDGED:
            _NUDGED.clear()
            return True
        time.sleep(0.05)
    return False


def log(text: str) -> None:
    sys.stderr.write(f"migsgx guardian[{os.getpid()}]: {text}\n")
    sys.stderr.flush()


def log_to(path: Path, why: str = "still in doubt") -> None:
    """From now on report into ``path``: the tool's caller must not wait on our stderr."""

    if _LOGGING_ELSEWHERE:
        return
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    except OSError:
        fd = os.open(os.devnull, os.O_WRONLY)
    log(f"{why}: the guardian goes on, reporting to {path}")
    os.dup2(fd, 2)
    os.close(fd)
    _LOGGING_ELSEWHERE.append(True)
