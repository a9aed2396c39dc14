"""No module leaves a zombie child of the test process behind.

A process the tests start and kill must also be waited for: a killed child that
nobody waits for stays a zombie of the pytest process until the run ends (a full
run once collected about ninety of them). Two kinds of zombie children exist:

- a process this process started (``subprocess.Popen``) and never waited for:
  the test that started it owns the wait; such a zombie is a bug, and
  :func:`no_zombie_children` fails the module that left it;
- an orphan this process adopted as the child subreaper of restored trees
  (``tests/integration/conftest.py``): nobody else can wait for it, so the
  subreaper reaps it after every test (:func:`reap_orphans`).

Popen children are told apart from adopted orphans by the live ``Popen``
objects that still wait for them (their ``returncode`` is unset): reaping one of
those would steal its exit status from the code that waits for it.
"""

from __future__ import annotations

import contextlib
import gc
import os
import subprocess
from collections.abc import Iterator

import pytest

from migsgx import _proc

__all__ = ["no_zombie_children", "reap_orphans", "unwaited_popens", "zombie_children"]


def zombie_children(parent: int | None = None) -> dict[int, str]:
    """pid -> command name of every zombie whose parent is ``parent`` (this process)."""

    parent = os.getpid() if parent is None else parent
    found: dict[int, str] = {}
    for pid in _proc.pids():
        fields = _proc.stat(pid)  # (None: gone meanwhile)
        if fields and fields[_proc.STATE] == "Z" and int(fields[_proc.PPID]) == parent:
            found[pid] = _proc.comm(pid)
    return found


def unwaited_popens() -> dict[int, subprocess.Popen[bytes]]:
    """pid -> every ``Popen`` object alive in this process that has not seen its child end."""

    return {
        obj.pid: obj
        for obj in gc.get_objects()
        if isinstance(obj, subprocess.Popen) and obj.returncode is None
    }


def reap_orphans() -> list[int]:
    """Wait for every zombie child no ``Popen`` object waits for; their pids."""

    zombies = zombie_children()
    if not zombies:
        return []
    # ``Popen`` objects dropped while their child ran: Python itself waits for them when the
    # next one is made (``subprocess._cleanup``); done now, they are neither reaped twice
    # nor blamed.
    cleanup = getattr(subprocess, "_cleanup", None)
    if cleanup is not None:
        cleanup()
    owned = unwaited_popens()
    reaped = []
    for pid in zombies:
        if pid in owned:
            continue
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)  # a zombie: returns at once
            reaped.append(pid)
    return reaped


def _describe(pid: int, name: str, popen: subprocess.Popen[bytes] | None) -> str:
    argv = popen.args if popen is not None else None
    return f"{pid} ({name}{', started as ' + repr(argv) if argv is not None else ''})"


@pytest.fixture(scope="module", autouse=True)
def no_zombie_children() -> Iterator[None]:
    """At the module's end (after its fixtures stopped what they started): no zombie child.

    Adopted orphans are reaped first; what is left is a child some test or fixture
    started, killed and never waited for. It is reaped here too (the next module
    starts clean), and the module fails with its pid, name and command line.
    """

    yield
    reap_orphans()
    left = zombie_children()
    if not left:
        return
    owned = unwaited_popens()
    described = [_describe(pid, name, owned.get(pid)) for pid, name in sorted(left.items())]
    for pid in left:
        if pid in owned:
            owned[pid].wait()
        else:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
    pytest.fail(
        f"{len(left)} zombie child(ren) of the test process left by this module "
        f"(started, ended and never waited for): {', '.join(described)}",
        pytrace=False,
    )
