"""The enclave process's log: its stderr, which the platform service keeps per launch.

Only event names and exception types are written, never a value: nothing secret
leaves the enclave this way (``docs/security.md``).
"""

from __future__ import annotations

import os
import sys

__all__ = ["log"]


def log(event: str) -> None:
    sys.stderr.write(f"enclave[{os.getpid()}]: {event}\n")
    sys.stderr.flush()
