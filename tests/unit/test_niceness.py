"""A thread's niceness for a block, inherited by the processes it starts there."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Callable
from typing import TypeVar

import pytest

from migsgx.system import niceness as nice

T = TypeVar("T")
CHILD = "import os; print(os.getpriority(os.PRIO_PROCESS, 0))"


def _in_thread(fn: Callable[[], T]) -> list[T]:
    """Run ``fn`` in a fresh thread (its niceness is its own) and return what it gave."""

    out: list[T] = []
    t = threading.Thread(target=lambda: out.append(fn()))
    t.start()
    t.join()
    return out


def test_a_child_started_inside_the_block_keeps_the_niceness_the_thread_gets_back() -> None:
    def body() -> tuple[int, int, int]:
        before = nice.current()
        with nice.niceness(3):
            inside = nice.current()
            child = int(subprocess.check_output([sys.executable, "-c", CHILD], text=True))
        assert inside == min(19, before + 3)
        return before, child, nice.current()

    ((before, child, after),) = _in_thread(body)
    assert child == min(19, before + 3)
    assert after == before


def test_only_the_calling_thread_changes() -> None:
    main = nice.current()

    def body() -> int:
        with nice.niceness(2):
            return os.getpriority(os.PRIO_PROCESS, threading.main_thread().native_id)

    assert _in_thread(body) == [main]


@pytest.mark.skipif(os.geteuid() != 0, reason="coming back from a raised niceness needs root")
def test_nice_at_gives_the_value_back_inside_a_nicer_block() -> None:
    def body() -> tuple[int, int]:
        own = nice.current()
        with nice.niceness(5), nice.nice_at(own):
            inside = nice.current()
        return own, inside

    ((own, inside),) = _in_thread(body)
    assert inside == own


def test_zero_changes_nothing() -> None:
    def body() -> tuple[int, int]:
        before = nice.current()
        with nice.niceness(0):
            return before, nice.current()

    ((before, inside),) = _in_thread(body)
    assert inside == before
