"""Processes as ``/proc`` shows them, read so that a process that ends mid-read is simply gone.

Every layer looks processes up: the platform service its enclave runtimes, the
CRIU driver the helpers CRIU forks, the agent its guardians and held trees, the
port check the sockets a tree holds.  Each read here answers "gone" (``None``,
``""``, an empty list) when the process ended or its pid was never there, never
an exception: between listing ``/proc`` and reading ``/proc/PID/...`` any
process may exit, and a zombie's ``cmdline`` is empty.  Standard library only,
at the package root, so the platform service (below ``migsgx.system``) may use
it as well as the agent.

``stat`` fields are numbered from the one after the command name (which may
hold spaces and parentheses): :data:`STATE` is ``stat``'s third field in
``proc(5)``'s numbering, :data:`STARTTIME` its 22nd.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Final

__all__ = [
    "CSTIME",
    "CUTIME",
    "FLAGS",
    "MINFLT",
    "PPID",
    "STARTTIME",
    "STATE",
    "STIME",
    "UTIME",
    "alive",
    "argv",
    "children",
    "comm",
    "descendants",
    "fd_links",
    "holds",
    "parent",
    "pids",
    "scanned_children",
    "socket_inodes",
    "start_time",
    "stat",
    "state",
    "status_field",
]

PROC: Final = Path("/proc")

# Indexes into :func:`stat` (the fields after the command name).
STATE: Final = 0
PPID: Final = 1
FLAGS: Final = 6
MINFLT: Final = 7
UTIME: Final = 11
STIME: Final = 12
CUTIME: Final = 13
CSTIME: Final = 14
STARTTIME: Final = 19

_DEAD: Final = ("Z", "X")


def pids() -> list[int]:
    """Every process visible in this pid namespace now (some may be gone by the time
    the caller looks at them)."""

    return [int(entry) for entry in os.listdir(PROC) if entry.isdigit()]


def stat(pid: int) -> list[str] | None:
    """The fields of ``/proc/PID/stat`` after the command name; None once ``pid`` is gone."""

    try:
        raw = (PROC / str(pid) / "stat").read_text()
        return raw[raw.rindex(")") + 2 :].split()
    except (OSError, ValueError):  # (gone; or a read cut short by its exit)
        return None


def state(pid: int) -> str:
    """The one-letter state (``R``, ``S``, ``T``, ``Z`` ...); '' once ``pid`` is gone."""

    fields = stat(pid)
    return fields[STATE] if fields else ""


def alive(pid: int) -> bool:
    """Whether ``pid`` exists and has not died (a zombie has)."""

    return state(pid) not in ("", *_DEAD)


def parent(pid: int) -> int | None:
    """The parent of ``pid``; None once it is gone."""

    fields = stat(pid)
    return int(fields[PPID]) if fields and len(fields) > PPID else None


def start_time(pid: int) -> int:
    """When ``pid`` started (clock ticks since boot); 0 once it is gone.

    With the pid it names one process for good: a recycled pid starts later.
    """

    fields = stat(pid)
    return int(fields[STARTTIME]) if fields and len(fields) > STARTTIME else 0


def argv(pid: int) -> list[bytes]:
    """The command line of ``pid``, one item an argument; [] once it is gone, for a
    zombie, for a kernel thread, and for a moment inside ``exec`` (the kernel sets the
    new arguments up after its parent may already have gone on)."""

    try:
        raw = (PROC / str(pid) / "cmdline").read_bytes()
    except OSError:
        return []
    items = raw.split(b"\0")
    if items[-1] == b"":
        items.pop()  # (the terminating NUL)
    return items


def comm(pid: int) -> str:
    """The command name (``/proc/PID/comm``, at most 15 bytes); '' once ``pid`` is gone."""

    try:
        return (PROC / str(pid) / "comm").read_text().strip()
    except OSError:
        return ""


def status_field(pid: int, name: str, *, proc: Path = PROC) -> str | None:
    """The value of line ``NAME:`` of ``/proc/PID/status``; None once ``pid`` is gone
    or when it has no such line (``proc``: another tree laid out as ``/proc``)."""

    try:
        text = (proc / str(pid) / "status").read_text()
    except OSError:
        return None
    prefix = name + ":"
    for line in text.splitlines():
        if line.startswith(prefix):
            return line[len(prefix) :].strip()
    return None


def children(pid: int) -> list[int]:
    """The children of every thread of ``pid`` (a child forked by another thread than
    the main one is listed under that thread only); none once it is gone."""

    out: list[int] = []
    try:
        tasks = os.listdir(PROC / str(pid) / "task")
    except OSError:
        return out
    for tid in tasks:
        try:
            text = (PROC / str(pid) / "task" / tid / "children").read_text()
        except OSError:
            continue
        out.extend(int(p) for p in text.split())
    return out


def _by_parent() -> dict[int, list[int]]:
    """Every process under its parent's pid, from one scan (one that ends meanwhile is
    left out)."""

    below: dict[int, list[int]] = {}
    for pid in pids():
        ppid = parent(pid)
        if ppid is not None:
            below.setdefault(ppid, []).append(pid)
    return below


def scanned_children(pid: int) -> list[int]:
    """The processes whose parent is ``pid``, from a scan of every process.

    Slower than :func:`children`, but it also lists a child while the kernel's
    ``children`` file may pass over it (one reparented, or whose sibling exits
    during the read: ``proc(5)`` calls that file unreliable under load).
    """

    return _by_parent().get(pid, [])


def descendants(root: int) -> list[int]:
    """Every process below ``root``, from one scan of every process's parent (one
    that ends during the scan is left out; one that was reparented after its
    parent died is no longer below it)."""

    below = _by_parent()
    found: list[int] = []
    todo = [root]
    while todo:
        for child in below.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def fd_links(pid: int, *, gone_ok: bool = True) -> Iterator[tuple[int, str]]:
    """(descriptor, what it links to) of each open descriptor of ``pid``: ``socket:[INODE]``,
    ``anon_inode:[userfaultfd]``, a path ...  Descriptors closed meanwhile are passed
    over; nothing once ``pid`` is gone (``gone_ok=False``: ``OSError`` then, for a
    caller to whom a process that ended is a failure)."""

    directory = PROC / str(pid) / "fd"
    try:
        names = os.listdir(directory)
    except OSError:
        if not gone_ok:
            raise
        return
    for name in names:
        with contextlib.suppress(OSError):
            yield int(name), os.readlink(directory / name)


def socket_inodes(pids: Iterable[int]) -> set[int]:
    """The inodes of every socket one of ``pids`` holds a descriptor of."""

    return {
        int(link[8:-1]) for pid in pids for _, link in fd_links(pid) if link.startswith("socket:[")
    }


def holds(pid: int, link: str) -> bool:
    """Whether ``pid`` has a descriptor linking to ``link`` (``socket:[INODE]`` ...)."""

    return any(target == link for _, target in fd_links(pid))
