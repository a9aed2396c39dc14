"""Enclave memory faulted in ahead of a load."""

from __future__ import annotations

import os
import threading

from migsgx.enclave.memory import EnclaveMemory
from migsgx.lab import memstat


def _rss_self() -> int:
    return memstat.rss(os.getpid())


def test_prefault_makes_pages_resident_and_leaves_them_zero() -> None:
    memory = EnclaveMemory(64 << 20)
    before = _rss_self()
    assert memory.prefault(32 << 20, threading.Event()) == 32 << 20
    assert _rss_self() - before >= 30 << 20
    assert memory.view(0, 32 << 20).tobytes().count(0) == 32 << 20
    memory.wipe()


def test_prefault_stops_when_asked_and_stays_within_memory() -> None:
    memory = EnclaveMemory(8 << 20)
    stop = threading.Event()
    stop.set()
    assert memory.prefault(8 << 20, stop) == 0
    assert memory.prefault(1 << 30, threading.Event()) == 8 << 20
    memory.wipe()
