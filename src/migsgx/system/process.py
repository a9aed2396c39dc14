"""Process trees and namespaces, as the migration needs them.

Below both the agent and the container drivers (CRIU's page server is in
:mod:`migsgx.criu.pageserver`).


* A restored tree is *held* with SIGSTOP (CRIU's ``leave_stopped``): CRIU
  queues the signal while it still traces the tasks, so they stop before
  running one instruction of their own, and they stay stopped whatever
  happens to CRIU or the agent afterwards.  Only :func:`continue_tree` makes
  them run.  (Holding CRIU itself at ``pre-resume`` is not safe: if CRIU or
  its caller dies there, the tracer goes away and the tasks run.)
* The same fence protects the source: once the destination holds a copy,
  the source tree gets a SIGSTOP while CRIU still has it frozen, so that even
  if the tool dies and CRIU resumes it, it stops instead of running.
* Sockets are created in another process's network namespace by a thread
  that joins it (``setns`` is per thread); abstract Unix socket names are
  looked up in that namespace.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Final, TypeVar

from .. import _proc
from .._proc import children
from .._proc import state as process_state
from ..errors import MigrationError

__all__ = [
    "children",
    "continue_tree",
    "describe_tree",
    "is_pidns_init",
    "kill_tree",
    "process_state",
    "socket_in_netns",
    "stop_tree",
    "tree_pids",
    "wait_stopped",
]

_CLONE_NEWNET: Final = 0x40000000
T = TypeVar("T")


# --- process trees -------------------------------------------------------------------
def tree_pids(root: int) -> list[int]:
    """``root`` and all its descendants (parents before children)."""

    order: list[int] = []
    pending = [root]
    seen: set[int] = set()
    while pending and len(order) < 65536:
        pid = pending.pop(0)
        if pid in seen or not os.path.exists(f"/proc/{pid}"):
            continue
        seen.add(pid)
        order.append(pid)
        pending.extend(children(pid))
    return order


def pid_exists(pid: int) -> bool:
    """Whether ``pid`` exists (a zombie too; one of another user too)."""

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def runnable(pid: int) -> bool:
    """Alive and not stopped: it can run application code."""

    return process_state(pid) not in ("", "Z", "X", "T", "t")


def is_pidns_init(pid: int) -> bool:
    """Whether ``pid`` is the init (pid 1) of a pid namespace of its own."""

    nspid = _proc.status_field(pid, "NSpid")
    if nspid is None and _proc.stat(pid) is None:
        raise MigrationError(f"no process {pid}")
    levels = (nspid or "").split()
    return len(levels) > 1 and levels[-1] == "1"


def _signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def stop_tree(pids: list[int]) -> None:
    _signal_all(pids, signal.SIGSTOP)


def continue_tree(root: int) -> list[int]:
    pids = tree_pids(root)
    _signal_all(pids, signal.SIGCONT)
    return pids


def kill_tree(root: int, *, timeout: float = 10.0) -> None:
    """SIGKILL ``root`` and its descendants, wait until none can run, reap those that are ours."""

    pids = tree_pids(root)
    _signal_all(pids, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while any(process_state(p) not in ("", "Z", "X") for p in pids):
        if time.monotonic() > deadline:
            raise MigrationError(f"processes of tree {root} survive SIGKILL")
        _reap_children(pids)
        time.sleep(0.01)
    _reap_children(pids)


def _reap_children(pids: list[int]) -> None:
    """Wait for those of ``pids`` that are this process's children (a child or an orphan it
    adopted as subreaper) and ended: a killed child nobody waits for stays a zombie."""

    for pid in pids:
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, os.WNOHANG)


def wait_stopped(root: int, *, timeout: float = 10.0) -> list[int]:
    """Wait until every task of the tree is stopped; returns their pids."""

    deadline = time.monotonic() + timeout
    while True:
        pids = tree_pids(root)
        states = [process_state(p) for p in pids]
        if pids and all(s in ("T", "t") for s in states):
            return pids
        if not pids or any(s in ("", "Z", "X") for s in states):
            raise MigrationError(f"the restored tree {root} died before it was held")
        if time.monotonic() > deadline:
            raise MigrationError(f"the restored tree {root} did not stop within {timeout} s")
        time.sleep(0.002)


def describe_tree(root: int) -> dict[int, str]:
    return {pid: process_state(pid) for pid in tree_pids(root)}


# --- namespaces -----------------------------------------------------------------------
def in_netns(netns: Path | str, work: Callable[[], T]) -> T:
    """Run ``work`` on a fresh thread that joined the network namespace file ``netns``."""

    result: list[T] = []
    failure: list[BaseException] = []

    def body() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
            try:
                if libc.setns(fd, _CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns({netns}): {os.strerror(err)}")
            finally:
                os.close(fd)
            result.append(work())
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=body, name="migsgx-setns", daemon=True)
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return result[0]


def same_netns(pid: int) -> bool:
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat("/proc/self/ns/net").st_ino
    except OSError:
        return False


def socket_in_netns(pid: int, family: int, kind: int) -> socket.socket:
    """A socket living in the network namespace of process ``pid``."""

    if same_netns(pid):
        return socket.socket(family, kind)
    return in_netns(f"/proc/{pid}/ns/net", lambda: socket.socket(family, kind))


def socket_inodes(pid: int) -> set[int]:
    return _proc.socket_inodes([pid])


_SO_ACCEPTCON: Final = 0x10000


def abstract_listeners(pid: int, prefix: str) -> Iterator[str]:
    """Names (without the leading NUL) of abstract Unix sockets ``pid`` listens on."""

    inodes = socket_inodes(pid)
    try:
        lines = Path(f"/proc/{pid}/net/unix").read_text().splitlines()[1:]
    except OSError:
        return
    for line in lines:
        parts = line.split()
        if len(parts) < 8 or not parts[7].startswith("@" + prefix):
            continue
        if int(parts[6]) in inodes and int(parts[3], 16) & _SO_ACCEPTCON:
            yield parts[7][1:]
