"""``migrate --criu-weight``: CRIU's dump runs in the tool's CPU cgroup, and a tool killed
there leaves none behind.

One cell, a plain process (the kvstore example, real CRIU, two namespaced hosts),
reached through a named point (``MIGSGX_FAULT``, no sleeping): the tool holds
CRIU's dump at ``tool.in-dump`` (the tree frozen, CRIU waiting for the tool's
answer) until a file exists.  There the tool's ``migsgx-cpu-PID-START`` cgroup
holds CRIU at the weight asked for; then the tool is killed.  CRIU resumes the
tree, and the tool's guardian moves CRIU out of the cgroup and removes it: no
cgroup is left behind, and the source answers with every acknowledged write.
Skipped without a cgroup v1 ``cpu`` controller (the weight is not applied there).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
from bed_helpers import wait_until
from fault_helpers import (
    loaded_app,
    no_images_left,  # noqa: F401  (autouse: after every cell, no images left in /dev/shm)
    stayed,
)

from migsgx import _proc
from migsgx.lab.testbed import AgentProcess, MigrateRun, Testbed
from migsgx.system.cpugroups import PREFIX, own_group, shares_of

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(120),
    pytest.mark.skipif(own_group() is None, reason="no cgroup v1 cpu controller"),
]

#: The subnet of this module's testbed (the ``bed`` fixture of conftest.py).
BED_SUBNET = 243


def _groups() -> set[Path]:
    base = own_group()
    assert base is not None
    return set(base.glob(PREFIX + "*"))


def _tool_group(before: set[Path]) -> Path | None:
    """The cgroup a ``migrate`` tool made since ``before`` (its pid names it)."""

    for group in _groups() - before:
        pid = int(group.name.removeprefix(PREFIX).split("-")[0])
        if b"migrate" in b" ".join(_proc.argv(pid)):
            return group
    return None


def test_criu_runs_in_the_tools_cgroup_and_a_killed_tool_leaves_none(
    bed: Testbed, agent: AgentProcess, figures: dict[str, dict[str, object]], tmp_path: Path
) -> None:
    app, digest = loaded_app(bed)
    go_on = tmp_path / "go-on"  # (never made: the tool is killed while it waits)
    before = _groups()
    result: list[MigrateRun] = []
    tool = threading.Thread(
        target=lambda: result.append(
            bed.migrate(
                app.pid,
                agent,
                args=("--criu-weight", "25"),
                env={"MIGSGX_FAULT": f"tool.in-dump:wait-file={go_on}"},
            )
        ),
        daemon=True,
    )
    tool.start()
    try:
        found: list[Path] = []

        def located() -> bool:
            group = _tool_group(before)
            if group is not None:
                found.append(group)
            return group is not None or not tool.is_alive()

        wait_until(located, 60, "the tool's CPU cgroup")
        assert found, result[0].stderr if result else "the tool ended"
        group = found[0]
        assert int((group / "cpu.shares").read_text()) == shares_of(25)
        tool_pid = int(group.name.removeprefix(PREFIX).split("-")[0])
        # CRIU (the tool's child) waits in the cgroup for the tool's answer.
        wait_until(
            lambda: any(_proc.comm(t) == "criu" for t in _tasks(group)), 30, "CRIU in the cgroup"
        )
        killed = f"migsgx fault: tool.in-dump:kill at {time.monotonic():.6f}"  # (ours)
        os.kill(tool_pid, signal.SIGKILL)
        tool.join(60)
    finally:
        go_on.touch()
    assert result, "the tool did not end"
    run = result[0]
    assert run.returncode == -9, run.stderr
    # The guardian moved CRIU out and removed the cgroup.
    wait_until(lambda: not group.exists(), 30, f"{group} removed")
    assert _groups() - before == set()
    stayed(bed, figures, "inside the dump x kill -9 tool (--criu-weight)", run, app, digest,
           expected=-9, fault_log=killed)  # fmt: skip


def _tasks(group: Path) -> list[int]:
    try:
        return [int(x) for x in (group / "tasks").read_text().split()]
    except (OSError, ValueError):
        return []
