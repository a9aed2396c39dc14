"""The fault hook that holds the engine's CRIU mid-dump until the cancel (``agent/dumphold.py``).

A real child process named ``criu`` with a pages image open stands in for the
engine's CRIU: the hold stops it once that image reached 1 MiB, and the dump's
cancel continues it.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from migsgx.agent.dumphold import PAGES_WRITTEN, MidDumpHold, engine_criu
from migsgx.criu.cancel import DumpCancel
from migsgx.system.process import process_state

_NAMED_CRIU = (
    "import sys; open('/proc/self/comm', 'w').write('criu'); pages = open(sys.argv[1], 'ab'); "
    "print(flush=True); input()"
)


@pytest.fixture
def criu(tmp_path: Path) -> Iterator[subprocess.Popen[str]]:
    """A process named criu with ``tmp_path/pages-1.img`` open, as CRIU has while it dumps."""

    child = subprocess.Popen([sys.executable, "-c", _NAMED_CRIU, str(tmp_path / "pages-1.img")],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert child.stdout is not None
    child.stdout.readline()  # (named by now)
    yield child
    child.kill()
    child.wait()


def _state_becomes(pid: int, states: str) -> bool:
    for _ in range(500):
        if process_state(pid) in states:
            return True
        time.sleep(0.01)
    return False


def test_criu_is_held_from_the_first_mib_of_pages_until_the_cancel(
    tmp_path: Path, criu: subprocess.Popen[str]
) -> None:
    cancel = DumpCancel()
    images: Path | None = None
    hold = MidDumpHold(lambda: images, lambda: cancel)
    assert criu.pid in engine_criu()
    (tmp_path / "pages-1.img").write_bytes(b"\1" * PAGES_WRITTEN)
    assert not hold()  # no dump of the tool's yet
    images = tmp_path
    (tmp_path / "pages-1.img").write_bytes(b"\1" * (PAGES_WRITTEN - 1))
    assert not hold()
    assert process_state(criu.pid) != "T"
    (tmp_path / "pages-1.img").write_bytes(b"\1" * PAGES_WRITTEN)
    assert hold()
    assert _state_becomes(criu.pid, "T")  # stopped mid-dump
    assert hold()  # (once true, stays true)
    cancel.cancel("an enclave stream failed")
    assert _state_becomes(criu.pid, "SR")  # continued by the cancel's stops
    assert cancel.cut == 0  # (continuing CRIU is no cut of its own)


def test_criu_held_by_a_tool_that_died_is_continued_by_its_guardian(
    tmp_path: Path, criu: subprocess.Popen[str]
) -> None:
    """No cancel ever comes (the tool was killed while it held CRIU): the guardian's
    notes name the held CRIU, and it continues that one process only."""

    import os
    import signal

    from migsgx.agent.dumphold import release_noted
    from migsgx.agent.held import start_time

    notes: list[str] = []
    hold = MidDumpHold(lambda: tmp_path, lambda: None, notes.append)
    (tmp_path / "pages-1.img").write_bytes(b"\1" * PAGES_WRITTEN)
    assert hold()
    assert _state_becomes(criu.pid, "T")
    assert notes == [f"criu-held {criu.pid} {start_time(criu.pid)}"]
    # Not the noted process (another start time), or not CRIU: left as it is.
    stale = f"criu-held {criu.pid} {start_time(criu.pid) + 1}"
    assert release_noted([stale, "criu-held x 1", "criu-held \u00b2 1", "criu-held"]) == []
    other = subprocess.Popen([sys.executable, "-c", "input()"], stdin=subprocess.PIPE)
    try:
        os.kill(other.pid, signal.SIGSTOP)
        assert _state_becomes(other.pid, "T")
        noted = [*notes, f"criu-held {other.pid} {start_time(other.pid)}"]
        assert process_state(criu.pid) == "T"
        assert release_noted(noted) == [criu.pid]
        assert _state_becomes(criu.pid, "SR")
        assert process_state(other.pid) == "T"
    finally:
        other.kill()
        other.wait()


def test_the_guardian_waits_for_a_continued_criu_to_end_and_kills_one_that_does_not(
    criu: subprocess.Popen[str],
) -> None:
    """A continued CRIU puts the container's freezer back as it found it when it lets go,
    so the guardian thaws only after it ended: one that ends is waited for; one still
    there after the wait is killed, and only while it is CRIU."""

    from migsgx.agent.dumphold import wait_released

    ending = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.3)"])
    assert wait_released([ending.pid], wait=30.0) == []
    assert ending.wait(timeout=1) == 0  # (ended by itself, within the wait)
    other = subprocess.Popen([sys.executable, "-c", "input()"], stdin=subprocess.PIPE)
    try:
        assert wait_released([criu.pid, other.pid], wait=0.2) == [criu.pid]
        assert criu.wait(timeout=5) == -9
        assert other.poll() is None  # not CRIU: never killed
    finally:
        other.kill()
        other.wait()
