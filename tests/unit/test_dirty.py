"""The kernel's written-page tracking over a real mapping: exact pages, re-arming, faults."""

from __future__ import annotations

import random

import numpy as np
import pytest

from migsgx.enclave.dirty import FAULT_ENV, DirtyTracker, _pages_of, open_tracker
from migsgx.enclave.memory import PAGE_SIZE, EnclaveMemory
from migsgx.errors import (
    DirtyTrackingLostError,
    DirtyTrackingUnavailableError,
    MigrationError,
)

pytestmark = pytest.mark.timeout(30)

PAGES = 2048  # 8 MiB


@pytest.fixture
def memory() -> EnclaveMemory:
    return EnclaveMemory(PAGES * PAGE_SIZE)


def _touch(mem: EnclaveMemory, pages: list[int], value: int = 1) -> None:
    view = mem.view()
    for p in pages:
        view[p * PAGE_SIZE + 17] = value
    view.release()


def test_finds_exactly_the_written_pages_and_rearms(memory: EnclaveMemory) -> None:
    with open_tracker(memory.address, memory.size) as tracker:
        assert tracker.collect() == []  # untouched memory is clean (WP_UNPOPULATED)
        written = sorted(random.Random(7).sample(range(PAGES), 300))
        _touch(memory, written)
        assert tracker.collect() == written
        assert tracker.collect() == []  # the scan re-armed them
        _touch(memory, written[:5], 2)  # populated pages, written again
        assert tracker.collect() == written[:5]


def test_a_scan_with_a_limit_leaves_pages_beyond_it_for_a_later_scan(
    memory: EnclaveMemory,
) -> None:
    with open_tracker(memory.address, memory.size) as tracker:
        _touch(memory, [3, 200, 201])
        assert tracker.collect(limit=200 * PAGE_SIZE) == [3]
        _touch(memory, [3])
        # The used memory grew over 200 and 201: their writes were kept, not lost.
        assert tracker.collect(limit=300 * PAGE_SIZE) == [3, 200, 201]
        assert tracker.collect() == []
        with pytest.raises(ValueError):
            tracker.collect(limit=PAGE_SIZE + 1)


def test_reading_does_not_count_as_writing(memory: EnclaveMemory) -> None:
    with open_tracker(memory.address, memory.size) as tracker:
        _touch(memory, [0, 1, 2])
        tracker.collect()
        assert sum(memory.view()[: 3 * PAGE_SIZE]) == 3
        assert tracker.collect() == []


def test_contiguous_runs_and_region_edges(memory: EnclaveMemory) -> None:
    with open_tracker(memory.address, memory.size) as tracker:
        pages = [0, *range(100, 700), PAGES - 1]
        _touch(memory, pages)
        assert tracker.collect() == pages


def test_many_separate_regions_need_several_scan_calls(memory: EnclaveMemory) -> None:
    # 1024 separate regions do not fit one PAGEMAP_SCAN vector: the walk resumes.
    with open_tracker(memory.address, memory.size) as tracker:
        pages = list(range(0, PAGES, 2))
        _touch(memory, pages)
        assert tracker.collect() == pages


def test_protect_all_starts_over(memory: EnclaveMemory) -> None:
    with open_tracker(memory.address, memory.size) as tracker:
        _touch(memory, [3, 4])
        tracker.protect_all()
        assert tracker.collect() == []


def test_closed_tracker_is_lost_not_empty(memory: EnclaveMemory) -> None:
    tracker = open_tracker(memory.address, memory.size)
    tracker.close()
    with pytest.raises(DirtyTrackingLostError):
        tracker.collect()


def test_unavailable_by_fault_hook(memory: EnclaveMemory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(FAULT_ENV, "unavailable")
    with pytest.raises(DirtyTrackingUnavailableError) as info:
        open_tracker(memory.address, memory.size)
    assert isinstance(info.value, MigrationError)
    assert info.value.code == "dirty-tracking-unavailable"


def test_hiding_tracker_by_fault_hook(
    memory: EnclaveMemory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(FAULT_ENV, "hide=5")
    with open_tracker(memory.address, memory.size) as tracker:
        _touch(memory, [4, 5, 6])
        assert tracker.collect() == [4, 6]
        _touch(memory, [5, 7])
        # The report lies; the enclave's write log (precopy.md, 3.2) does not.
        assert tracker.collect_with_log() == ([7], [5, 7])


def test_region_not_registrable_is_unavailable() -> None:
    # Page 1 is below mmap_min_addr: never mapped, so registration fails.
    with pytest.raises(DirtyTrackingUnavailableError):
        DirtyTracker(PAGE_SIZE, PAGE_SIZE)


def test_misaligned_region_is_misuse(memory: EnclaveMemory) -> None:
    with pytest.raises(ValueError):
        DirtyTracker(memory.address + 1, PAGE_SIZE)


def test_wipe_still_works_after_taking_the_address(memory: EnclaveMemory) -> None:
    assert memory.address % PAGE_SIZE == 0
    memory.wipe()


def test_regions_become_their_pages_in_order() -> None:
    base = 1 << 40
    regions = np.zeros(4, dtype=[("start", "<u8"), ("end", "<u8"), ("categories", "<u8")])
    for row, (first, count) in enumerate([(0, 2), (5, 1), (9, 3), (100, 1)]):
        regions[row] = (base + first * PAGE_SIZE, base + (first + count) * PAGE_SIZE, 2)
    assert _pages_of(regions, base).tolist() == [0, 1, 5, 9, 10, 11, 100]
    assert _pages_of(regions[:0], base).tolist() == []
