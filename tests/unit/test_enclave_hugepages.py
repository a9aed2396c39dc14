"""Enclave memory in 2 MiB pages: the hint given, harmless without them, dirty tracking exact.

The destination of a stop-and-copy migration advises the memory it is about to
load for transparent huge pages (``EnclaveMemory.advise_huge``) when its host's
agent asks (``__mig_in_start(True)``; off by default: measured slower here).  These cells read the
kernel's own word for it (``/proc/self/smaps``: the ``hg`` flag, and
``AnonHugePages`` where huge pages came), and check that write-protect dirty
tracking still reports every written 4 KiB page of memory that huge pages back.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from typing import Any

import pytest
from platform_fixtures import World, make_image
from test_peer import Migration, _instance

from migsgx._populate import HUGE_PAGE, advise_huge, thp_mode
from migsgx.enclave.dirty import open_tracker
from migsgx.enclave.memory import PAGE_SIZE, EnclaveMemory
from migsgx.enclave.migrator import Migrator
from migsgx.errors import ProtocolError

pytestmark = pytest.mark.timeout(60)

THP_BUILT = os.path.exists("/sys/kernel/mm/transparent_hugepage/enabled")
needs_thp = pytest.mark.skipif(not THP_BUILT, reason="a kernel without transparent huge pages")
MIB = 1 << 20
USED = 6 * MIB + 3 * PAGE_SIZE  # three whole huge pages and a part of a fourth

ENCLAVE = f"""
import hashlib

import numpy as np

from migsgx.enclave import Enclave, ecall


class Probe(Enclave):
    def __init__(self, ctx):
        super().__init__(ctx)
        self.cells = ctx.memory.array("cells", {USED}, np.uint8)

    @ecall
    def fill(self, seed):
        rng = np.random.default_rng(int.from_bytes(hashlib.sha256(seed).digest()[:8], "big"))
        self.cells[:] = rng.integers(0, 256, self.cells.size, dtype=np.uint8)
        return hashlib.sha256(self.cells.tobytes()).hexdigest()

    @ecall
    def digest(self):
        return hashlib.sha256(self.cells.tobytes()).hexdigest()
"""


def _vmas(address: int, length: int) -> list[dict[str, Any]]:
    """This process's mappings that overlap ``[address, address + length)``, from smaps."""

    out: list[dict[str, Any]] = []
    current: dict[str, Any] | None = None
    with open("/proc/self/smaps", encoding="ascii", errors="replace") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                current = {"start": lo, "end": hi, "flags": set(), "huge_kb": 0}
                if lo < address + length and hi > address:
                    out.append(current)
            elif current is not None and head == "VmFlags:":
                current["flags"] = set(line.split()[1:])
            elif current is not None and head == "AnonHugePages:":
                current["huge_kb"] = int(line.split()[1])
    return out


def _advised(address: int, length: int) -> int:
    """Bytes of ``[address, address + length)`` in mappings flagged for huge pages."""

    total = 0
    for vma in _vmas(address, length):
        if "hg" in vma["flags"]:
            total += min(vma["end"], address + length) - max(vma["start"], address)
    return total


def _huge_kb(address: int, length: int) -> int:
    return sum(v["huge_kb"] for v in _vmas(address, length))


def _kernel_at_least(major: int, minor: int) -> bool:
    parts = os.uname().release.split(".")
    return (int(parts[0]), int("".join(c for c in parts[1] if c.isdigit()) or 0)) >= (major, minor)


@needs_thp
@pytest.mark.skipif(
    not _kernel_at_least(6, 7), reason="the kernel aligns large anonymous mappings from 6.7 on"
)
def test_the_mapping_starts_on_a_huge_page_boundary() -> None:
    # A declared size that is no multiple of 2 MiB: the mapping is rounded up, so
    # the kernel places it on a 2 MiB boundary where huge pages can begin.
    memory = EnclaveMemory(6 * MIB + PAGE_SIZE)
    assert memory.address % HUGE_PAGE == 0
    assert len(memory.view()) == 6 * MIB + PAGE_SIZE  # never used beyond its size
    memory.wipe()


@needs_thp
def test_the_hint_covers_whole_huge_pages_from_the_start_and_no_more() -> None:
    memory = EnclaveMemory(16 * MIB)
    assert memory.huge_advised == 0
    assert _advised(memory.address, memory.size) == 0  # not before it is asked
    assert memory.advise_huge(5 * MIB + PAGE_SIZE) == 4 * MIB
    assert memory.huge_advised == 4 * MIB
    # The kernel's flag on exactly the first 4 MiB; the partial 2 MiB after stays small.
    assert _advised(memory.address, memory.size) == 4 * MIB
    assert _advised(memory.address + 4 * MIB, 12 * MIB) == 0
    assert memory.advise_huge(HUGE_PAGE - PAGE_SIZE) == 0  # less than one huge page
    assert memory.advise_huge(1 << 40) == 16 * MIB  # capped at the memory
    memory.wipe()


def test_a_kernel_that_refuses_the_hint_costs_nothing() -> None:
    class Refusing:
        def __len__(self) -> int:
            return 8 * MIB

        def madvise(self, *args: int) -> None:
            raise OSError(22, "Invalid argument")  # EINVAL: no transparent huge pages

    assert advise_huge(Refusing(), 8 * MIB) == 0  # type: ignore[arg-type]
    assert thp_mode() in ("always", "madvise", "never", "")


_THP_OFF = """
import ctypes, json, threading
from migsgx.enclave.dirty import open_tracker
from migsgx.enclave.memory import EnclaveMemory

libc = ctypes.CDLL(None, use_errno=True)
assert libc.prctl(41, 1, 0, 0, 0) == 0  # PR_SET_THP_DISABLE: this process as with 'never'
memory = EnclaveMemory(8 << 20)
advised = memory.advise_huge(8 << 20)
memory.prefault(8 << 20, threading.Event())
view = memory.view()
view[: 4] = b"kept"
with open_tracker(memory.address, memory.size) as tracker:
    for page in (5, 700, 2047):
        view[page * 4096 + 9] = 1
    written = tracker.collect()
huge_kb = 0
with open("/proc/self/smaps") as f:
    inside = False
    for line in f:
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            lo = int(head.split("-")[0], 16)
            inside = memory.address <= lo < memory.address + memory.size
        elif inside and head == "AnonHugePages:":
            huge_kb += int(line.split()[1])
print(json.dumps({"advised": advised, "written": written, "huge_kb": huge_kb,
                  "kept": bytes(view[:4]).decode()}))
"""


def test_the_hint_is_harmless_where_huge_pages_are_off() -> None:
    out = subprocess.run(
        [sys.executable, "-c", _THP_OFF], capture_output=True, text=True, timeout=60, check=True
    )
    got = json.loads(out.stdout)
    assert got["huge_kb"] == 0  # no huge page, whatever the advice said
    assert got["kept"] == "kept"
    assert got["written"] == [5, 700, 2047]


@needs_thp
def test_dirty_tracking_over_huge_pages_finds_every_written_4k_page() -> None:
    memory = EnclaveMemory(8 * MIB)
    memory.advise_huge(8 * MIB)
    memory.prefault(8 * MIB, threading.Event())
    if _huge_kb(memory.address, memory.size) == 0:
        memory.wipe()
        pytest.skip("the kernel found no free huge page just now")
    view = memory.view()
    with open_tracker(memory.address, memory.size) as tracker:
        assert tracker.collect() == []  # faulted in before: clean
        _ = bytes(view[600 * PAGE_SIZE : 601 * PAGE_SIZE])  # reading is no write
        assert tracker.collect() == []
        written = [1, 511, 512, 600, 1500, 2047]  # both sides of a huge page's edge
        for page in written:
            view[page * PAGE_SIZE + 17] = 7
        # A write to a protected huge page splits its mapping: 4 KiB exact.
        assert tracker.collect() == written
        assert tracker.collect() == []
        view[600 * PAGE_SIZE] = 8
        assert tracker.collect() == [600]
    view.release()
    memory.wipe()


@pytest.fixture(scope="module")
def image(world: World) -> Any:
    return make_image(world.author, ENCLAVE, memory_size="16MiB")


def test_in_start_takes_a_boolean(world: World, image: Any) -> None:
    fresh = Migrator(_instance(image, world.host_b))
    with pytest.raises(ProtocolError, match="huge_pages"):
        fresh.in_start(1)  # type: ignore[arg-type]
    fresh.in_start(True)
    assert fresh.huge_pages is True


@needs_thp
@pytest.mark.parametrize("hint", [None, 8 * USED])
def test_a_destination_asked_loads_into_memory_advised_for_huge_pages(
    world: World, image: Any, hint: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = Migrator.in_start
    monkeypatch.setattr(Migrator, "in_start", lambda self: original(self, True))
    move = Migration(world, image)
    used = move.out.status()["memory_used"]
    loaded = move.transfer(hint=hint)
    assert move.destination is not None
    memory = move.destination.memory
    assert loaded["memory_bytes"] == used
    whole = used // HUGE_PAGE * HUGE_PAGE
    # With a hint larger than the memory, the prefault advised all of it.
    assert loaded["huge_advised_bytes"] == (whole if hint is None else memory.size)
    assert _advised(memory.address, whole) == whole
    # The source's memory was never advised: only a destination asks.
    assert _advised(move.source.memory.address, move.source.memory.size) == 0
    move.commit()
    assert move.destination.call("digest") == move.digest


def test_a_destination_by_default_keeps_4k_pages(world: World, image: Any) -> None:
    move = Migration(world, image)
    loaded = move.transfer(hint=USED)
    assert move.destination is not None
    memory = move.destination.memory
    assert loaded["huge_advised_bytes"] == 0
    assert _advised(memory.address, memory.size) == 0
    move.commit()
    assert move.destination.call("digest") == move.digest
