"""A restore's activated enclaves keep their state when the restore tool and its guardian die.

From before its activation until the application has its connection, each
enclave a ``migsgx restore`` loads holds a duplicate of the tool's end of its
connection (``__mig_hold``, with a nonce the directory's journal records, and a
pidfd of the restored tree).  Killed there, the tool and its guardian are no end
of file for it: ``migsgx recover --checkpoint`` takes the duplicates back,
activates what is not active, continues the tree and attaches the enclaves
(``restored``); a second recover finds it done.  Should the tree die instead,
the enclaves let their duplicates go and end: nothing is left behind.
Each step is reached through a fault hook (``wait-file``), never by a sleep.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.register_assert_rewrite("bed_helpers")

from bed_helpers import ask, kvstore, wait_until  # noqa: E402
from test_attack_s28 import Case, Held, _end_copies, _restore_guardian  # noqa: E402

from migsgx import _proc  # noqa: E402
from migsgx.lab.testbed import Testbed  # noqa: E402
from migsgx.system.process import kill_tree  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.timeout(150)]

#: The subnet of this module's testbed (the ``bed`` fixture of conftest.py).
BED_SUBNET = 203


def _case(bed: Testbed, tmp_path: Path, enclaves: int) -> Iterator[Case]:
    app = kvstore(bed, "--enclaves", str(enclaves))
    for i in range(2 * enclaves):  # (keys spread over the enclaves)
        assert ask(bed, app, "src", f"PUT k{i} {secrets.token_hex(8)}").startswith("OK")
    c = Case(bed, app, tmp_path / "ck", ask(bed, app, "src", "DIGEST"), tmp_path)
    try:
        yield c
    finally:
        for tool in c.tools:
            tool.end()
        _end_copies(bed, app)


@pytest.fixture
def case(bed: Testbed, tmp_path: Path) -> Iterator[Case]:
    yield from _case(bed, tmp_path, 1)


@pytest.fixture
def pair(bed: Testbed, tmp_path: Path) -> Iterator[Case]:
    yield from _case(bed, tmp_path, 2)


def _holders(case: Case) -> list[int]:
    """The restore's enclave processes, as its journal names them."""

    journal = json.loads((case.ck / "checkpoint-journal.json").read_text())
    return [int(item[0]) for item in journal["holders"]]


def _activated(case: Case) -> tuple[Held, int, list[int]]:
    """Checkpoint, then a restore held right after the activation (gates consumed):
    the tool, its guardian and the enclaves it holds."""

    case.checkpoint()
    tool = case.held("restore-a", "restore.activated", *case.restore_args())
    enclaves = _holders(case)
    assert enclaves and all(_proc.alive(pid) for pid in enclaves)
    return tool, _restore_guardian(tool.proc.pid), enclaves


def _kill(*pids: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _both_killed(case: Case) -> list[int]:
    tool, guardian, enclaves = _activated(case)
    _kill(guardian, tool.proc.pid)
    tool.proc.wait(30)
    wait_until(lambda: not _proc.alive(guardian), 10, "the guardian to die")
    return enclaves


def _ended(enclaves: list[int]) -> None:
    wait_until(lambda: not any(_proc.alive(pid) for pid in enclaves), 15, "the enclaves to end")


def test_guardian_alone_killed_at_the_activation(case: Case) -> None:
    """The tool lives and finishes the restore itself: one copy, every write; the
    application, attached, let the duplicate go, so its end of file ends the enclave."""

    tool, guardian, enclaves = _activated(case)
    _kill(guardian)
    assert tool.release() == 0, tool.text()
    case.one_copy_with_every_write()
    code, found = case.recover()
    assert code == 0 and found["outcome"] == "done", found
    _end_copies(case.bed, case.app)
    _ended(enclaves)


def test_tool_and_guardian_killed_two_enclaves_recover_finishes(pair: Case) -> None:
    """Both enclaves activated, the tool and its guardian ``kill -9``: recover takes
    both duplicates back, continues the tree and attaches them (``restored``); a
    second recover finds it done, and the checkpoint never restores again."""

    enclaves = _both_killed(pair)
    assert all(_proc.alive(pid) for pid in enclaves)  # (no end of file: they hold on)
    code, found = pair.recover()
    assert code == 0 and (found["decision"], found["outcome"]) == ("commit", "restored"), found
    pair.one_copy_with_every_write(within=3)
    code, found = pair.recover()
    assert code == 0 and found["outcome"] == "done", found
    again = pair.restore()
    assert again.returncode != 0 and "Traceback" not in again.stderr, again.stderr
    assert pair.bed.runnable_copies(pair.app) == {"src": 1, "dst": 0}


def test_the_tree_killed_after_the_recover_ends_the_enclaves(case: Case) -> None:
    """After the recover finished the restore, the restored tree ``kill -9``: its
    enclaves end with it (no duplicate left anywhere), nothing runs."""

    enclaves = _both_killed(case)
    code, found = case.recover()
    assert code == 0 and found["outcome"] == "restored", found
    case.one_copy_with_every_write(within=3)
    _end_copies(case.bed, case.app)
    _ended(enclaves)
    assert case.bed.runnable_copies(case.app) == {"src": 0, "dst": 0}


def test_the_held_tree_killed_before_any_recover_ends_the_enclaves(case: Case) -> None:
    """The tool and its guardian dead after the activation, then the held tree
    ``kill -9`` (the application is gone, its state with it, as in its crash): the
    enclaves' hold watched the tree, so they let their duplicates go and end instead
    of living on; recover then says ``done`` and nothing runs."""

    enclaves = _both_killed(case)
    held = json.loads((case.ck / "restore-held.json").read_text())["pid"]
    kill_tree(held)
    _ended(enclaves)
    code, found = case.recover()
    assert code == 0 and found["outcome"] == "done", found
    assert case.bed.runnable_copies(case.app) == {"src": 0, "dst": 0}
