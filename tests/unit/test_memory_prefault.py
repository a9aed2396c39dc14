"""Enclave memory, and the sequential mode's staging buffers, faulted in ahead."""

from __future__ import annotations

import os
import threading

from migsgx._populate import populate, round_up
from migsgx.datapath.staging import Staging
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


def test_staging_prefault_ahead_faults_in_the_state_size_and_no_more() -> None:
    staging = Staging(64 << 20)
    before = _rss_self()
    staging.prefault_ahead(Staging.staged_size(16 << 20, 128 << 10, 16))
    done = staging.wait_ahead()
    assert done == round_up(Staging.staged_size(16 << 20, 128 << 10, 16))
    assert 16 << 20 <= _rss_self() - before <= 24 << 20
    assert bytes(staging.buffer[: 1 << 20]).count(0) == 1 << 20  # faulting in writes nothing
    staging.close()


def test_staging_prefault_ahead_is_capped_and_stopped_by_close() -> None:
    staging = Staging(8 << 20)
    staging.prefault_ahead(1 << 40)  # an untrusted hint: at most the buffer
    assert staging.wait_ahead() == 8 << 20
    staging.close()
    big = Staging(1 << 30)
    big.prefault_ahead(1 << 30)
    big.close()  # stops it at its next step, then unmaps
    assert big.prefaulted <= 1 << 30
    assert big.buffer.closed


def test_populate_of_nothing_or_stopped() -> None:
    staging = Staging(1 << 20)
    stop = threading.Event()
    assert populate(staging.buffer, 0, stop) == 0
    stop.set()
    assert populate(staging.buffer, 1 << 20, stop) == 0
    staging.close()


def test_wait_prefault_reports_the_end_of_a_prefault_ahead() -> None:
    memory = EnclaveMemory(64 << 20)
    assert memory.wait_prefault(0.0) is None  # none started
    memory.prefault_ahead(32 << 20)
    assert memory.wait_prefault(60.0) == 32 << 20
    assert memory.prefaulting_ahead  # waited for, not stopped: the load stops it
    assert memory.finish_prefault(32 << 20) == 32 << 20
    memory.wipe()
