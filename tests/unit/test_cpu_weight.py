"""CRIU's dump in a cgroup of its own CPU weight (``migrate --criu-weight``), and no
cgroup left behind: :mod:`migsgx.system.cpugroups`.

The cells that move threads use the machine's cgroup v1 ``cpu`` hierarchy (root,
a few milliseconds each); they are skipped where there is none.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from migsgx import _proc
from migsgx.system import cpugroups
from migsgx.system.cpugroups import CPU_V1, PREFIX, own_group, shares_of, sweep, weighted

needs_v1 = pytest.mark.skipif(
    os.geteuid() != 0 or own_group() is None, reason="needs root and a cgroup v1 cpu controller"
)


def _cpu_group_of(pid: int | str) -> str:
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "cpu" in controllers.split(","):
            return path
    raise AssertionError(f"process {pid} has no cpu cgroup")


def _thread_group(tid: int) -> str:
    for line in Path(f"/proc/self/task/{tid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "cpu" in controllers.split(","):
            return path
    raise AssertionError(f"thread {tid} has no cpu cgroup")


def test_a_weight_maps_to_cgroup_v1_shares() -> None:
    assert shares_of(100) == 1024  # a process's own
    assert shares_of(25) == 256
    assert shares_of(400) == 4096
    assert shares_of(1) == 10
    assert shares_of(10000) == 102400
    assert shares_of(0) == 2  # (v1's least)


def test_the_own_group_is_read_from_the_cpu_controller_line(tmp_path: Path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "tasks").write_text("")
    cgroup = tmp_path / "cgroup"
    cgroup.write_text("9:name=systemd:/\n4:memory:/x\n1:cpu,cpuacct:/a/b\n0::/\n")
    assert own_group(tmp_path, cgroup_file=cgroup) == tmp_path / "a" / "b"
    cgroup.write_text("0::/\n")  # cgroup v2 alone: no v1 cpu controller
    assert own_group(tmp_path, cgroup_file=cgroup) is None


def test_without_a_cpu_controller_the_weight_is_a_warning_not_a_failure(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    with weighted(25, root=tmp_path / "none") as group:
        assert group is None
    assert "CPU weight 25 not applied" in caplog.text
    with weighted(None) as group:  # (not asked: nothing at all)
        assert group is None


@needs_v1
def test_the_thread_and_what_it_starts_run_at_the_weight_then_nothing_is_left() -> None:
    base = own_group()
    assert base is not None
    own = _cpu_group_of("self")
    tid = threading.get_native_id()
    other = []
    bystander = threading.Thread(target=lambda: (time.sleep(0.3), other.append(1)))
    bystander.start()
    with weighted(25) as group:
        assert group is not None
        assert group.parent == base and group.name.startswith(PREFIX)
        assert int((group / "cpu.shares").read_text()) == 256
        assert tid in [int(x) for x in (group / "tasks").read_text().split()]
        # What this thread starts inside the block starts in the cgroup (CRIU, here sleep).
        child = subprocess.Popen(["sleep", "30"])
        try:
            assert _cpu_group_of(child.pid).endswith("/" + group.name)
        finally:
            child.kill()
            child.wait()
        # The process's other threads stay where they were (the enclave streams' ends).
        assert bystander.native_id is not None
        assert _thread_group(bystander.native_id) == own
    bystander.join()
    assert not group.exists()
    assert _thread_group(tid) == own


@needs_v1
def test_a_task_still_in_the_cgroup_when_the_block_ends_is_moved_out_first() -> None:
    with weighted(50) as group:
        assert group is not None
        child = subprocess.Popen(["sleep", "30"])  # (a CRIU that outlived the block)
    try:
        assert not group.exists()
        assert "/" + PREFIX not in _cpu_group_of(child.pid)
    finally:
        child.kill()
        child.wait()


@needs_v1
def test_a_killed_tools_cgroup_is_swept_with_what_it_held_a_live_ones_is_not() -> None:
    base = own_group()
    assert base is not None
    # A tool (its own process) that made its cgroup, and a CRIU it started there.
    tool = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    criu = subprocess.Popen(["sleep", "60"])
    group = base / f"{PREFIX}{tool.pid}-{_proc.start_time(tool.pid)}"
    try:
        group.mkdir()
        (group / "tasks").write_text(f"{criu.pid}\n")
        assert _cpu_group_of(criu.pid).endswith("/" + group.name)
        assert sweep(base) == []  # its tool runs: in use
        assert group.exists()
        # The guardian sweeps as its tool dies (still there, but named as dying).
        assert sweep(base, gone=(tool.pid,)) == [group]
        assert not group.exists()
        assert "/" + PREFIX not in _cpu_group_of(criu.pid)
        # The next start sweeps a killed tool's.
        group.mkdir()
        (group / "tasks").write_text(f"{criu.pid}\n")
        tool.kill()
        tool.wait()
        assert sweep(base) == [group]
        assert not group.exists()
    finally:
        for proc in (tool, criu):
            proc.kill()
            proc.wait()
        if group.exists():
            cpugroups.release(group)


@needs_v1
def test_the_cgroup_is_gone_when_the_block_raises() -> None:
    with pytest.raises(RuntimeError), weighted(25) as group:
        assert group is not None
        raise RuntimeError("CRIU's dump failed")
    assert not group.exists()
    assert "/" + PREFIX not in _thread_group(threading.get_native_id())


def test_the_cpu_hierarchy_is_where_this_machine_kind_mounts_it() -> None:
    assert Path("/sys/fs/cgroup/cpu") == CPU_V1


@needs_v1
def test_a_cgroup_made_inside_a_dead_tools_goes_with_it() -> None:
    base = own_group()
    assert base is not None
    tool = subprocess.Popen([sys.executable, "-c", "pass"])
    start = _proc.start_time(tool.pid)
    tool.wait()
    criu = subprocess.Popen(["sleep", "60"])
    group = base / f"{PREFIX}{tool.pid}-{start}"
    try:
        (group / "inner").mkdir(parents=True)
        (group / "inner" / "tasks").write_text(f"{criu.pid}\n")
        assert sweep(base) == [group]
        assert not group.exists()
        assert "/" + PREFIX not in _cpu_group_of(criu.pid)
    finally:
        criu.kill()
        criu.wait()
        if group.exists():
            cpugroups.release(group)
