"""A tool run by ``ip netns exec`` mounts its images tmpfs in a mount namespace of its own.

``ip netns exec`` unshares the mount namespace (to mount the network
namespace's ``/sys``), with ``/`` a slave of the host's: the tool's images
tmpfs (:mod:`migsgx.containers.imagefs`) is invisible outside, so neither
``migsgx recover`` (another namespace) nor an operator on the host can
unmount it.  This checks, with a real tmpfs and a real namespace, that none
has to: once the last process of that namespace (the tool, its guardian) is
gone, the kernel drops the namespace, its mounts and the tmpfs with its pages;
what stays on the host is the empty mount point in ``/dev/shm``, which the
sweep of dead tools' images directories removes.  The RAM freed is a figure
(``images-tmpfs-namespace`` JSON), not an assert.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from migsgx import _proc
from migsgx.agent.dumpdirs import scratch_base, sweep_dump_dirs
from migsgx.containers.imagefs import SOURCE_PREFIX, leftover_mounts

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

_SRC = str(Path(__file__).resolve().parents[2] / "src")
_MIB = 32
#: The tool's part: its images tmpfs on its own images directory, full of pages.
_TOOL = f"""
import os, sys
from pathlib import Path
from migsgx.agent.dumpdirs import make_dump_dir
from migsgx.containers.imagefs import ImageFs
images = make_dump_dir()
fs = ImageFs(images)
fs.mount()
with open(images / "pages-1.img", "wb") as out:
    block = os.urandom(1 << 20)
    for _ in range({_MIB}):
        out.write(block)
print(images, flush=True)
sys.stdin.read()
"""


def _shmem_kib() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("Shmem:"):
            return int(line.split()[1])
    raise AssertionError("no Shmem in /proc/meminfo")


def _namespaces_holding(source: str) -> list[int]:
    """Pids whose mount namespace holds a mount with ``source`` (any namespace)."""

    found = []
    for pid in _proc.pids():
        with contextlib.suppress(OSError):
            if f" {source} " in Path(f"/proc/{pid}/mountinfo").read_text():
                found.append(pid)
    return found


@pytest.fixture
def netns(require_root: None) -> Iterator[str]:
    name = f"migsgx-imgns-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=10)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], timeout=10, check=False)


def test_images_tmpfs_of_a_tool_in_a_private_mount_namespace_goes_with_it(netns: str) -> None:
    freed: list[float] = []
    for _ in range(3):
        tool = subprocess.Popen(
            ["ip", "netns", "exec", netns, sys.executable, "-c", _TOOL],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONPATH": _SRC},
        )  # fmt: skip
        try:
            assert tool.stdout is not None
            images = Path(tool.stdout.readline().strip())
            source = f"{SOURCE_PREFIX}{tool.pid}"  # (ip netns exec execs: the same pid)
            # Mounted in the tool's namespace only: the host cannot see it, so cannot sweep it.
            assert (images, tool.pid) in leftover_mounts(Path(f"/proc/{tool.pid}/mountinfo")
                                                         .read_text())  # fmt: skip
            assert all(pid != tool.pid for _, pid in leftover_mounts(
                Path("/proc/self/mountinfo").read_text()))  # fmt: skip
            assert images.parent == scratch_base() and images.is_dir()
            assert not (images / "pages-1.img").exists()  # (the host sees the bare mount point)
            inside = os.statvfs(f"/proc/{tool.pid}/root{images}")  # (through its namespace)
            assert (inside.f_blocks - inside.f_bfree) * inside.f_frsize >= _MIB << 20
            held = _shmem_kib()
        finally:
            tool.kill()  # the tool dies (killed mid-dump); nothing else is in its namespace
            tool.wait()
        deadline = time.monotonic() + 30
        while _namespaces_holding(source):  # the kernel drops a dead namespace at once
            assert time.monotonic() < deadline, f"{source} still mounted somewhere"
            time.sleep(0.05)
        freed.append(round((held - _shmem_kib()) / 1024, 1))
        # What stays is the empty mount point: a dead tool's images directory, swept.
        assert images.is_dir() and not any(images.iterdir())
        assert images in sweep_dump_dirs()
        assert not images.exists()
    print(
        "images-tmpfs-namespace",
        json.dumps({"written_mib": _MIB, "freed_mib": {
            "min": min(freed), "median": statistics.median(freed), "max": max(freed),
            "runs": freed}}),
    )  # fmt: skip
