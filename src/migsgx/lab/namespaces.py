"""Named network namespaces on this machine, whoever's network they belong to.

A name is ``migsgx-<pid>.<start>-<token>-<host>``: the owning process's run tag
(pid and start time, :func:`run_tag`) and a random token, so parallel runs never
collide and :func:`cleanup_stale` can tell the ones a gone process left behind (a
pid reused since does not keep them).  Here: ending what runs inside one, deleting
one, and listing them (a thread enters one with
:func:`migsgx.system.process.in_netns`).  The hosts and the links between them
(what one run builds and removes) are :mod:`.netns`.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Final

from migsgx.agent.ckpt_journal import start_time
from migsgx.errors import MigSGXError, register_error
from migsgx.system.process import pid_exists

from .. import _proc

__all__ = [
    "NETNS_DIR",
    "PREFIX",
    "NetnsError",
    "cleanup_stale",
    "delete_namespace",
    "list_namespaces",
    "owner_alive",
    "run_tag",
    "terminate",
]

PREFIX: Final = "migsgx-"
NETNS_DIR: Final = Path("/run/netns")
_OWNED_NAME = re.compile(r"^(?P<pid>\d+)(?:\.(?P<start>\d+))?-(?P<token>[0-9a-f]+)-")


class NetnsError(MigSGXError):
    """A network namespace could not be created, used or removed."""

    code = "netns"


register_error(NetnsError)


def _ip(*args: str) -> str:
    try:
        return subprocess.run(
            ["ip", *args], capture_output=True, text=True, check=True, timeout=30
        ).stdout
    except subprocess.CalledProcessError as exc:
        raise NetnsError(
            f"ip {' '.join(args)} failed: {exc.stderr.strip() or exc.returncode}"
        ) from exc
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NetnsError(f"cannot run ip {' '.join(args)}: {exc}") from exc


def run_tag(pid: int | None = None) -> tuple[int, str]:
    """This process's (or ``pid``'s) run tag: its pid and start time ("" if it is gone)."""

    pid = os.getpid() if pid is None else pid
    return pid, start_time(pid)


def owner_alive(pid: int, start: str | None) -> bool:
    """Whether the owner ``pid``, started at ``start`` (when recorded), still runs.

    Without a recorded start time only the pid can be asked (what older names carry).
    """

    if not pid_exists(pid):
        return False
    return start is None or start_time(pid) == start


def list_namespaces(prefix: str = PREFIX) -> list[str]:
    """Named network namespaces whose name starts with ``prefix``."""

    try:
        names = os.listdir(NETNS_DIR)
    except FileNotFoundError:
        return []
    return sorted(name for name in names if name.startswith(prefix))


def _zombie_or_gone(pid: int) -> bool:
    return not _proc.alive(pid)


def terminate(pid: int, *, sig: int = signal.SIGKILL, timeout: float = 5.0) -> None:
    """Signal ``pid`` and wait until it is gone; reap it when it is our child.

    A restored process is usually not our child; it is reaped here when this
    process is its subreaper, and otherwise waited for until it is a zombie.
    """

    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
    deadline = time.monotonic() + timeout
    while True:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            if _zombie_or_gone(pid):
                return
        else:
            if done == pid:
                return
        if time.monotonic() > deadline:
            raise NetnsError(f"process {pid} did not end within {timeout} s")
        time.sleep(0.01)


def _kill_inside(netns: str) -> None:
    """Kill whatever still runs in ``netns`` (restored processes, grandchildren)."""

    with contextlib.suppress(NetnsError):
        for pid in (int(p) for p in _ip("netns", "pids", netns).split()):
            with contextlib.suppress(NetnsError):
                terminate(pid)


def delete_namespace(netns: str) -> None:
    """Kill whatever runs in ``netns``, then delete it (gone already: nothing to do)."""

    _kill_inside(netns)
    if (NETNS_DIR / netns).exists():
        _ip("netns", "delete", netns)


def cleanup_stale(prefix: str = PREFIX, *, everything: bool = False) -> list[str]:
    """Delete namespaces left by processes that are gone; returns their names.

    A name records the run tag of the process that made it (its pid and start
    time; older names the pid only); with ``everything`` all namespaces with
    ``prefix`` go, in use or not.
    """

    removed = []
    for netns in list_namespaces(prefix):
        owner = _OWNED_NAME.match(netns[len(prefix) :])
        if not everything and (
            owner is None or owner_alive(int(owner.group("pid")), owner.group("start"))
        ):
            continue
        delete_namespace(netns)
        removed.append(netns)
    return removed
