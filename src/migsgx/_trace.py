"""Steps marked with their time, for a storm's timeline of a fault (a test hook).

``MIGSGX_TRACE`` (any non-empty value) in the environment of the migration
tool makes it, its guardian and the container drivers mark each step they
reach on stderr: ``migsgx step: NAME at T``, T on the system-wide monotonic
clock, as a fault hook marks its fault (``migsgx.agent.faults``).  The storm
reads them (``migsgx.lab.storm_timeline``).  Unset, nothing is written.
Standard library only, below every package, so that the drivers mark too.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Final

__all__ = ["TRACE_ENV", "step"]

TRACE_ENV: Final = "MIGSGX_TRACE"


def step(name: str) -> None:
    """With ``$MIGSGX_TRACE`` set: mark step ``name`` on stderr, with its time."""

    if os.environ.get(TRACE_ENV):
        sys.stderr.write(f"migsgx step: {name} at {time.monotonic():.6f}\n")
        sys.stderr.flush()
