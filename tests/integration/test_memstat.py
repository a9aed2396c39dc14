"""The memory figures of ``migsgx bench`` on a real child process.

The child maps a file and reads it (file pages: what a library's code is to a
process that runs it for the first time) and fills an anonymous buffer, each
on command; the window's overhead must count the buffer and leave the file
pages to :meth:`PeakWindow.code_faulted`.  A memory file mapped by this
process and a child counts by its share in each (:func:`memstat.shared_excess`).
"""

from __future__ import annotations

import mmap
import os
import subprocess
import sys
from pathlib import Path

import pytest

from migsgx.lab import memstat

MIB = 1 << 20

CHILD = r"""
import mmap, sys
path, anon = sys.argv[1], int(sys.argv[2])
print("ready", flush=True)
sys.stdin.readline()
with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
    total = sum(m[off] for off in range(0, len(m), 4096))
    buf = bytearray(anon)
    for off in range(0, anon, 4096):
        buf[off] = 1
    print("touched", total, flush=True)
    sys.stdin.readline()
"""


def test_file_pages_faulted_in_a_window_are_code_not_overhead(tmp_path: Path) -> None:
    data = tmp_path / "library.bin"
    data.write_bytes(bytes(range(256)) * (16 * MIB // 256))
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(data), str(6 * MIB)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert child.stdin is not None and child.stdout is not None
    try:
        assert child.stdout.readline() == "ready\n"
        window = memstat.PeakWindow.start([child.pid])
        child.stdin.write("go\n")
        child.stdin.flush()
        assert child.stdout.readline().startswith("touched")
        code = window.code_faulted(child.pid)
        overhead = window.overhead()[child.pid]
        peak = memstat.peak_rss(child.pid) - window.rest[child.pid]
        assert code >= 15 * MIB  # the file's pages, read once each
        assert 6 * MIB <= overhead < 9 * MIB  # the buffer (and the interpreter's change)
        assert peak >= overhead + code  # VmHWM alone counts both
        assert window.total() == overhead
    finally:
        child.stdin.write("done\n")
        child.stdin.flush()
        child.wait(timeout=30)


SHARER = r"""
import mmap, os, sys
fd, pages = int(sys.argv[1]), int(sys.argv[2])
m = mmap.mmap(fd, pages * 4096, mmap.MAP_SHARED)
for i in range(pages // 2):
    m[i * 4096] = 2
print("mapped", flush=True)
sys.stdin.readline()
"""


def test_shared_pages_count_by_their_share_in_each_process() -> None:
    """A memfd both map: the pages both touched count half in each, the rest whole."""

    pages = 64
    fd = os.memfd_create("memstat-test")
    os.ftruncate(fd, pages * 4096)
    mine = mmap.mmap(fd, pages * 4096, mmap.MAP_SHARED)
    for i in range(pages):
        mine[i * 4096] = 1
    assert memstat.shared_excess(os.getpid()) == 0  # nobody else maps it yet
    child = subprocess.Popen(
        [sys.executable, "-c", SHARER, str(fd), str(pages)],
        pass_fds=(fd,), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert child.stdin is not None and child.stdout is not None
    try:
        sampler = memstat.SharedSampler([os.getpid(), child.pid], interval=0.01)
        assert child.stdout.readline() == "mapped\n"
        sampler.sample()
        both = pages // 2 * 4096
        assert memstat.shared_excess(os.getpid()) == both // 2
        assert memstat.shared_excess(child.pid) == both // 2
        sampler.stop()
        assert sampler.discount(child.pid) == both // 2
        assert sampler.discount(os.getpid()) == both // 2
        # Found later, with its rest as read before it mapped anything shared.
        late = memstat.SharedSampler([], interval=0.01, discover=lambda: {child.pid: 0})
        late.sample()
        late.stop()
        assert late.discount(child.pid) == both // 2
    finally:
        child.stdin.write("done\n")
        child.stdin.flush()
        child.wait(timeout=30)
        mine.close()
        os.close(fd)
    with pytest.raises(memstat.MemStatError, match=str(child.pid)):
        memstat.shared_excess(child.pid)
