"""Remove what a lab run that is gone left behind, and only that.

A test run or demo that is interrupted (killed, a terminal closed, a machine
under a timeout) never reaches its clean-up: its hosts' namespaces stay, and with
them whatever runs there, and its container labs keep their engines' daemons (a
``runc restore`` with its CRIU and the restored app, containerd and its shims),
their cgroups, pod namespaces and mounts. The next run removes them here.

Everything the lab makes carries its owner, the *run tag*: the owning process's
pid and start time (clock ticks since boot, ``/proc/PID/stat``), so that a pid
reused by another process does not keep a dead run's leftovers alive, and a
live run's are never touched:

- host namespaces (:mod:`.netns`): ``migsgx-<pid>.<start>-<token>-<host>``;
- a container lab (:mod:`.containers`): its directory ``/run/migsgx-lab-<pid>-<token>``
  holds the tag in ``owner``; everything else of the lab is named by the token or
  lies in that directory: runc roots, containerd's root, state, socket and
  namespace, podman's store, cgroups ``/migsgx-lab-<token>-<host>``, pod namespaces
  ``migsgx-lab-<token>-<host>-<name>``.

A lab is swept only when its owner is gone: its processes (those whose command
line names the lab's directory, with their descendants: runc, CRIU, containerd and
its shims, conmon; then every process left in its cgroups) are killed, its pod
namespaces deleted, its cgroups removed, its mounts undone and its directory
deleted. Nothing without the lab's name and a dead owner is touched.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from .. import _proc
from ..containers.cgroups import CGROUP_ROOT, remove_cgroup
from ..errors import MigSGXError
from ..system.process import kill_tree
from .netns import NETNS_DIR, cleanup_stale, delete_namespace, owner_alive, run_tag, terminate

__all__ = [
    "LAB_PREFIX",
    "OWNER_FILE",
    "LabDirectory",
    "lab_directories",
    "owner_alive",
    "run_tag",
    "sweep",
    "sweep_labs",
    "unmount_below",
    "write_owner",
]

LAB_PREFIX: Final = "migsgx-lab-"
LAB_ROOT: Final = Path("/run")
OWNER_FILE: Final = "owner"
_LAB_NAME = re.compile(rf"^{LAB_PREFIX}(?P<pid>\d+)-(?P<token>[0-9a-f]+)$")


@dataclass(frozen=True)
class LabDirectory:
    """A container lab's directory and what its name and ``owner`` file say."""

    path: Path
    token: str
    pid: int
    start: str | None

    @property
    def pod_prefix(self) -> str:
        return f"{LAB_PREFIX}{self.token}-"

    def alive(self) -> bool:
        return owner_alive(self.pid, self.start)


def lab_directories(root: Path = LAB_ROOT) -> list[LabDirectory]:
    """Every container lab's directory under ``root`` (``/run``)."""

    found = []
    with contextlib.suppress(OSError):
        for entry in sorted(root.iterdir()):
            match = _LAB_NAME.match(entry.name)
            if match is None or not entry.is_dir():
                continue
            pid, start = int(match.group("pid")), None
            with contextlib.suppress(OSError, ValueError):
                owner, start = (entry / OWNER_FILE).read_text().split()
                pid = int(owner)
            found.append(LabDirectory(entry, match.group("token"), pid, start))
    return found


def write_owner(directory: Path) -> None:
    """Tag a lab's directory with this process's run tag."""

    pid, start = run_tag()
    (directory / OWNER_FILE).write_text(f"{pid} {start}\n")


def _naming(directory: Path) -> list[int]:
    """Processes with an argument that names ``directory`` or a path below it."""

    exact, below = str(directory).encode(), str(directory).encode() + b"/"
    return [
        pid
        for pid in _proc.pids()
        if pid != os.getpid() and any(arg == exact or below in arg for arg in _proc.argv(pid))
    ]


def _cgroups(token: str) -> list[Path]:
    """The lab's cgroups (``/migsgx-lab-<token>-<host>``) in every hierarchy."""

    bases = [CGROUP_ROOT]
    with contextlib.suppress(OSError):
        bases += [p for p in CGROUP_ROOT.iterdir() if p.is_dir() and not p.is_symlink()]
    return sorted(top for base in bases for top in base.glob(f"{LAB_PREFIX}{token}-*"))


def _cgroup_pids(top: Path) -> list[int]:
    pids: list[int] = []
    for dirpath, _dirs, _files in os.walk(top):
        with contextlib.suppress(OSError, ValueError):
            pids += [int(p) for p in (Path(dirpath) / "cgroup.procs").read_text().split()]
    return pids


def _sweep_lab(lab: LabDirectory) -> None:
    for pid in _naming(lab.path):
        with contextlib.suppress(MigSGXError):
            kill_tree(pid)
    tops = _cgroups(lab.token)
    for top in tops:
        for pid in _cgroup_pids(top):
            with contextlib.suppress(MigSGXError):
                terminate(pid, sig=signal.SIGKILL)
    for netns in sorted(NETNS_DIR.glob(f"{lab.pod_prefix}*")):
        with contextlib.suppress(MigSGXError):
            delete_namespace(netns.name)
    for top in tops:
        with contextlib.suppress(MigSGXError):
            remove_cgroup(top.name)
    unmount_below(lab.path)
    shutil.rmtree(lab.path, ignore_errors=True)


def unmount_below(base: Path) -> None:
    """Unmount whatever an engine left mounted under ``base`` (deepest first)."""

    try:
        lines = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return
    points = [line.split()[1] for line in lines if len(line.split()) > 1]
    prefix = str(base) + "/"
    for point in sorted((p for p in points if p.startswith(prefix)), key=len, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True, check=False, timeout=30)


def sweep_labs(root: Path = LAB_ROOT) -> list[Path]:
    """Sweep every container lab whose owner is gone; their directories."""

    swept = []
    for lab in lab_directories(root):
        if not lab.alive():
            _sweep_lab(lab)
            swept.append(lab.path)
    return swept


def sweep() -> list[str]:
    """Everything dead lab runs left: container labs first (their daemons reach into the
    hosts), then host namespaces with whatever still runs in them. What was removed."""

    removed = [str(path) for path in sweep_labs()]
    return removed + cleanup_stale()


def main() -> None:
    """``python -m migsgx.lab.sweep``: what ``make test`` runs first."""

    for name in sweep():
        print(f"removed the leftover of a dead lab run: {name}")


if __name__ == "__main__":
    main()
