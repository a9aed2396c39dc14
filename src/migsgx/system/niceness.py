"""A thread's niceness for a while, and so that of the processes it starts meanwhile.

Linux keeps a niceness per thread (``setpriority(PRIO_PROCESS, 0, ...)`` sets
the calling thread's alone), and a child process starts with the niceness of
the thread that forked it.  So a tool that starts CRIU from one thread can run
CRIU at another niceness than its other threads (the enclave streams beside
it) without touching CRIU or those threads: :func:`niceness` around the call.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

__all__ = ["current", "nice_at", "niceness"]

log = logging.getLogger(__name__)


def current() -> int:
    """The calling thread's niceness."""

    return os.getpriority(os.PRIO_PROCESS, 0)


@contextlib.contextmanager
def niceness(delta: int) -> Iterator[None]:
    """The calling thread ``delta`` nicer (negative: less nice) inside the block."""

    with nice_at(current() + delta):
        yield


@contextlib.contextmanager
def nice_at(value: int) -> Iterator[None]:
    """The calling thread at niceness ``value`` (clamped to -20..19) inside the block.

    Lowering the niceness, and coming back from a raised one, needs
    ``CAP_SYS_NICE`` (or room under ``RLIMIT_NICE``); without it the change,
    or the way back, is skipped with a warning: a niceness is a hint, never a
    reason to fail a migration.  The thread's own niceness changes nothing.
    """

    before = current()
    value = max(-20, min(19, value))
    if value == before:
        yield
        return
    try:
        os.setpriority(os.PRIO_PROCESS, 0, value)
    except OSError as exc:
        log.warning("niceness %d not applied: %s", value, exc)
        yield
        return
    try:
        yield
    finally:
        try:
            os.setpriority(os.PRIO_PROCESS, 0, before)
        except OSError as exc:
            log.warning("niceness %d not restored: %s", before, exc)
