"""A thread in a cgroup of its own CPU weight for a while, and what it starts meanwhile.

On two cores CRIU's dump and the enclave streams beside it (sealing, sending,
receiving, loading) compete for the CPU in the frozen window.  A niceness
(:mod:`.niceness`) moves CRIU against every process of the machine; a cgroup
moves it as one group.  :func:`weighted` puts the calling thread into a child
cgroup of the tool's own, ``migsgx-cpu-PID-START`` (the tool's pid and its
start time, as the images directories of :mod:`migsgx.agent.dumpdirs` are
named), with the CPU weight asked for, for the block: the processes the
thread starts meanwhile (CRIU, an engine's ``runc`` or ``podman``) and the
threads it starts (the page relay's) begin in that cgroup, so their CPU
competes at that weight.  When the block ends the thread and whatever is still
in the cgroup go back to the tool's own, and the cgroup is removed.

Weights are cgroup v2's (``cpu.weight``: 1-10000, 100 the default a process
gets); this kernel's CPU controller is mounted as cgroup v1 here (``cpu``
hierarchy), where the same weight is ``cpu.shares`` = weight x 1024 / 100,
and a single thread can move (its id written to ``tasks``).  cgroup v2 moves
whole processes unless the subtree is threaded, which the tool's own cgroup
is not: there the weight is not applied (a warning), as a niceness the
process may not take is not; a weight is a hint, never a reason to fail a
migration.

A tool killed inside the block leaves its cgroup behind, with CRIU perhaps
still in it: its guardian (on the tool's death) and every later
:func:`weighted` and tool start remove every ``migsgx-cpu-`` cgroup whose tool
is gone (:func:`sweep`), moving what it still holds to the cgroup above.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
import time
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Final

from .. import _proc

__all__ = ["CPU_V1", "PREFIX", "own_group", "release", "shares_of", "sweep", "weighted"]

log = logging.getLogger(__name__)

#: Where this kernel's cgroup v1 ``cpu`` controller is mounted (this machine kind).
CPU_V1: Final = Path("/sys/fs/cgroup/cpu")
PREFIX: Final = "migsgx-cpu-"
_NAME: Final = re.compile(r"migsgx-cpu-([1-9][0-9]{0,9})-([0-9]{1,20})")
#: How long a removal waits for tasks that were leaving the cgroup as it was emptied.
RELEASE_TRIES: Final = 20


def shares_of(weight: int) -> int:
    """cgroup v1's ``cpu.shares`` for a cgroup v2 ``cpu.weight`` (100: 1024)."""

    return max(2, min(262144, round(weight * 1024 / 100)))


def own_group(root: Path = CPU_V1, *, cgroup_file: Path = Path("/proc/self/cgroup")) -> Path | None:
    """This process's cgroup in the v1 ``cpu`` hierarchy mounted at ``root``; None
    without one."""

    try:
        lines = cgroup_file.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) == 3 and "cpu" in parts[1].split(","):
            group = root / parts[2].lstrip("/")
            return group if (group / "tasks").exists() else None
    return None


def _write(path: Path, value: int) -> None:
    with open(path, "w", encoding="ascii") as f:
        f.write(f"{value}\n")


def _tasks(group: Path) -> list[int]:
    try:
        return [int(x) for x in (group / "tasks").read_text().split()]
    except (OSError, ValueError):
        return []


def release(group: Path) -> bool:
    """Every task of ``group`` (and of the cgroups inside it) back to the cgroup above,
    then ``group`` removed; False if it could not be (it stays for the next
    :func:`sweep`)."""

    parent = group.parent
    with contextlib.suppress(OSError):  # (cgroups made inside it go first, the same way)
        for inner in group.iterdir():
            if inner.is_dir():
                release(inner)
    for _ in range(RELEASE_TRIES):
        for tid in _tasks(group):
            with contextlib.suppress(OSError):  # (gone meanwhile)
                _write(parent / "tasks", tid)
        try:
            group.rmdir()
            return True
        except FileNotFoundError:
            return True
        except OSError:
            time.sleep(0.01)  # (a task forked into it as it was emptied)
    log.warning("the CPU cgroup %s could not be removed: it still holds tasks", group)
    return False


def sweep(
    base: Path | None = None, *, gone: Collection[int] = (), root: Path = CPU_V1
) -> list[Path]:
    """Remove every ``migsgx-cpu-`` cgroup in ``base`` (default: this process's own) whose
    tool is gone, or is one of ``gone`` (dying); the cgroups removed."""

    base = base if base is not None else own_group(root)
    if base is None:
        return []
    removed = []
    with contextlib.suppress(OSError):
        for name in os.listdir(base):
            found = _NAME.fullmatch(name)
            if found is None:
                continue
            pid, start = int(found.group(1)), int(found.group(2))
            live = pid not in gone and _proc.alive(pid) and _proc.start_time(pid) == start
            if not live and release(base / name):
                removed.append(base / name)
    return removed


@contextlib.contextmanager
def weighted(weight: int | None, *, root: Path = CPU_V1) -> Iterator[Path | None]:
    """The calling thread in a cgroup of CPU weight ``weight`` inside the block (see
    the module); None: nothing changes.  Yields the cgroup (None if not applied)."""

    if weight is None:
        yield None
        return
    base = own_group(root, cgroup_file=Path("/proc/thread-self/cgroup"))
    if base is None:
        log.warning("CPU weight %d not applied: no cgroup v1 cpu controller at %s", weight, root)
        yield None
        return
    sweep(base, root=root)
    group = base / f"{PREFIX}{os.getpid()}-{_proc.start_time(os.getpid())}"
    tid = threading.get_native_id()
    try:
        group.mkdir(exist_ok=True)
        _write(group / "cpu.shares", shares_of(weight))
        _write(group / "tasks", tid)
    except OSError as exc:
        log.warning("CPU weight %d not applied: %s", weight, exc)
        release(group)
        yield None
        return
    try:
        yield group
    finally:
        with contextlib.suppress(OSError):
            _write(base / "tasks", tid)
        release(group)
