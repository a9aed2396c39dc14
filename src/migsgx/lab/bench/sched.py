"""Scheduling policies set from outside on a benchmark's processes, for A/B runs.

A policy set on every thread of a process holds for the threads it starts later
(a new thread inherits its creator's), so setting it before a migration starts
covers the threads that move the state.  Linux treats a thread id as a pid here.
"""

from __future__ import annotations

import contextlib
import os

__all__ = ["POLICIES", "set_policy"]

POLICIES = {"other": os.SCHED_OTHER, "batch": os.SCHED_BATCH}


def set_policy(pid: int, policy: str) -> int:
    """Put every thread of ``pid`` under ``policy`` (``POLICIES``); return how many."""

    done = 0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return 0
    for tid in tids:
        with contextlib.suppress(ProcessLookupError):
            os.sched_setscheduler(int(tid), POLICIES[policy], os.sched_param(0))
            done += 1
    return done
