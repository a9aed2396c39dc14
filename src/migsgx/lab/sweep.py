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

- every process a run starts, wherever it runs: the run's environment carries
  ``MIGSGX_LAB_RUN=<pid>.<start>`` (:func:`tag_run`: the test suite's conftest,
  :class:`~.testbed.Testbed` and :class:`~.containers.ContainerLab` set it), and
  what they start inherits it: platform services and their enclave runtimes
  started outside any host namespace (the shared world's service, a service
  started with no prefix), and those that outlived their service.

A lab is swept only when its owner is gone: its processes (those whose command
line names the lab's directory, with their descendants: runc, CRIU, containerd and
its shims, conmon; then every process left in its cgroups) are killed, its pod
namespaces deleted, its cgroups removed, its mounts undone and its directory
deleted.  A tagged process is killed (with its descendants) only when the run its
tag names is gone.  Nothing without the lab's name or tag and a dead owner is
touched: not a live run's, not a user's (a process that replaced its whole
environment, as ``env -i`` does, carries no tag and is not found here either).
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
    "RUN_ENV",
    "LabDirectory",
    "lab_directories",
    "owner_alive",
    "run_tag",
    "sweep",
    "sweep_labs",
    "sweep_tagged",
    "tag_run",
    "unmount_below",
    "write_owner",
]

LAB_PREFIX: Final = "migsgx-lab-"
LAB_ROOT: Final = Path("/run")
OWNER_FILE: Final = "owner"
_LAB_NAME = re.compile(rf"^{LAB_PREFIX}(?P<pid>\d+)-(?P<token>[0-9a-f]+)$")
#: The run tag every process a lab run starts inherits (``PID.START``).
RUN_ENV: Final = "MIGSGX_LAB_RUN"
_RUN_VALUE = re.compile(rb"^(?P<pid>[1-9][0-9]{0,9})\.(?P<start>[0-9]{1,20})$")


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


def tag_run() -> str:
    """Tag every process this one starts from now on with its run tag (:data:`RUN_ENV`
    in its environment, which children inherit): should this run die, the next
    sweep finds them wherever they run.  The tag."""

    pid, start = run_tag()
    os.environ[RUN_ENV] = f"{pid}.{start}"
    return os.environ[RUN_ENV]


def _run_of(pid: int) -> tuple[int, str] | None:
    """The run tag in ``pid``'s environment, if any (``None``: untagged, or gone)."""

    try:
        environ = (_proc.PROC / str(pid) / "environ").read_bytes()
    except OSError:
        return None
    prefix = RUN_ENV.encode() + b"="
    for item in environ.split(b"\0"):
        if item.startswith(prefix):
            match = _RUN_VALUE.match(item[len(prefix) :])
            return (int(match["pid"]), match["start"].decode()) if match else None
    return None


def sweep_tagged() -> list[str]:
    """Kill the processes (with their descendants) whose run tag names a dead run;
    what was killed, one line each."""

    killed = []
    mine = os.getpid()
    for pid in _proc.pids():
        tag = _run_of(pid)
        if pid == mine or tag is None or owner_alive(*tag):
            continue
        name = b" ".join(_proc.argv(pid)[:4]).decode(errors="replace")[:120]
        with contextlib.suppress(MigSGXError):
            kill_tree(pid)
            killed.append(f"process {pid} ({name}) of run {tag[0]}.{tag[1]}")
    return killed


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
    hosts), then the processes their tag names (wherever they run), then host
    namespaces with whatever still runs in them. What was removed."""

    removed = [str(path) for path in sweep_labs()]
    removed += sweep_tagged()
    return removed + cleanup_stale()


def main() -> None:
    """``python -m migsgx.lab.sweep``: what ``make test`` runs first."""

    for name in sweep():
        print(f"removed the leftover of a dead lab run: {name}")


if __name__ == "__main__":
    main()
