"""``kill-source`` at a checkpoint's fault point does not wait on the tracer (``_fault``).

A checkpoint storm hung at ``ckpt.after-commit:kill-source``: the application
is its pid namespace's init, and a killed init ends only once every task of
its namespace was reaped; CRIU traces them and lets them go only when the
tool goes on, and the tool waited for the init to be a zombie.  Here this
process is the tracer (``PTRACE_SEIZE`` on the init's child), as CRIU is:
``_fault`` must come back while the init still hangs in its exit, because a
dying process counts as gone (``agent.faults.dying``).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from migsgx import _proc
from migsgx.agent.checkpoint import _fault

PTRACE_SEIZE = 0x4206
WALL = 0x40000000  # (``__WALL``: a traced child that is not this process's own)


def _child(pid: int) -> int:
    deadline = time.monotonic() + 30
    while True:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        if children:
            return int(children[0])
        assert time.monotonic() < deadline, f"pid {pid} started no child"
        time.sleep(0.01)


@pytest.fixture
def traced_namespace() -> Iterator[tuple[int, int]]:
    """(a pid namespace's init, its child traced by this process)."""

    proc = subprocess.Popen(["unshare", "--pid", "--fork", "sh", "-c", "sleep 600 & wait"])
    tracee = 0
    try:
        init = _child(proc.pid)
        tracee = _child(init)
        libc = ctypes.CDLL(None, use_errno=True)
        libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
        if libc.ptrace(PTRACE_SEIZE, tracee, None, None) != 0:
            pytest.fail(f"PTRACE_SEIZE: {os.strerror(ctypes.get_errno())}")
        yield init, tracee
    finally:
        if tracee:
            with contextlib.suppress(ProcessLookupError, ChildProcessError):
                os.kill(tracee, signal.SIGKILL)
                os.waitpid(tracee, WALL)  # (as the tracer: the init can end now)
        proc.kill()
        proc.wait()


def test_kill_source_does_not_wait_for_a_traced_namespace_to_end(
    traced_namespace: tuple[int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    init, _ = traced_namespace
    monkeypatch.setenv("MIGSGX_FAULT", "ckpt.after-commit:kill-source")
    thread = threading.Thread(target=_fault, args=("ckpt.after-commit", init, []), daemon=True)
    thread.start()
    thread.join(60)  # (a bound on a hang, not a measure: it returns at once, or never)
    assert not thread.is_alive(), "kill-source waited for the init's end (CRIU holds it)"
    fields = _proc.stat(init)
    assert fields is not None and fields[_proc.STATE] not in ("Z", "X")  # (still in its exit)
