"""The fault hooks' ``kill-source`` on a task frozen in its cgroup (``agent.faults.dying``).

A committed container's source stays frozen until it is released; ``kill-source``
at ``tool.before-release`` SIGKILLs it there and waits for the kill to take.
Under cgroup v1's freezer a frozen task takes its SIGKILL only once thawed: the
tool waited for good (a podman storm's migration hung 600 s).  A pending SIGKILL
counts as dying.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import time
from pathlib import Path

import pytest

from migsgx.agent.faults import dying

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

V1 = Path("/sys/fs/cgroup/freezer")
V2 = Path("/sys/fs/cgroup/cgroup.controllers")


def _freeze(group: Path, pid: int) -> None:
    group.mkdir()
    (group / "cgroup.procs").write_text(f"{pid}\n")
    if V1.is_dir():
        (group / "freezer.state").write_text("FROZEN\n")
        deadline = time.monotonic() + 10
        while (group / "freezer.state").read_text().strip() != "FROZEN":
            assert time.monotonic() < deadline, "the cgroup did not freeze"
            time.sleep(0.01)
    else:
        (group / "cgroup.freeze").write_text("1\n")


def _thaw(group: Path) -> None:
    if V1.is_dir():
        (group / "freezer.state").write_text("THAWED\n")
    else:
        (group / "cgroup.freeze").write_text("0\n")


def test_a_frozen_task_holding_a_sigkill_is_dying(tmp_path: Path) -> None:
    if not (V1.is_dir() or V2.exists()):
        pytest.fail("no cgroup freezer on this host")
    group = (V1 if V1.is_dir() else V2.parent) / f"migsgx-test-{secrets.token_hex(4)}"
    proc = subprocess.Popen(["sleep", "60"])
    try:
        _freeze(group, proc.pid)
        assert not dying(proc.pid)  # frozen, not killed: alive
        os.kill(proc.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while not dying(proc.pid):  # (before: never, under v1's freezer)
            assert time.monotonic() < deadline, "a frozen, killed task is not dying"
            time.sleep(0.01)
        _thaw(group)
        assert proc.wait(timeout=10) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            if group.exists():
                _thaw(group)
            proc.wait()
        deadline = time.monotonic() + 10
        while group.exists():
            try:
                group.rmdir()
            except OSError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
