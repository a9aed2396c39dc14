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


def test_prefault_ahead_keeps_what_arrived_and_gives_back_the_rest() -> None:
    memory = EnclaveMemory(64 << 20)
    memory.view(0, 4096)[:4] = b"keep"
    before = _rss_self()
    assert memory.prefault_ahead(1 << 40) == 64 << 20  # capped at the declared size
    assert memory.prefaulting_ahead
    done = memory.finish_prefault(8 << 20)
    assert not memory.prefaulting_ahead
    assert 0 <= done <= 64 << 20
    assert memory.view(0, 4).tobytes() == b"keep"  # faulting in changes no byte
    # At most the 8 MiB kept (and the interpreter's own noise) stays resident.
    assert _rss_self() - before <= 12 << 20
    assert memory.view(8 << 20, 32 << 20).tobytes().count(0) == 32 << 20
    assert memory.finish_prefault(0) == 0  # nothing running: nothing to stop
    memory.wipe()


def test_wipe_stops_a_prefault_ahead() -> None:
    memory = EnclaveMemory(256 << 20)
    memory.prefault_ahead(256 << 20)
    memory.wipe()
    assert not memory.prefaulting_ahead
