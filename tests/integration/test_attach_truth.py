"""A restored application whose enclaves could not be attached: every recover says so.

The restore is held by a fault hook right after the activation (``wait-file``);
whoever continues the tree then (``migsgx recover --checkpoint`` once the tool
and its guardian were ``kill -9``, the guardian once the tool alone was, or the
restore tool itself) has its attach fail (``restore.attach:fail``: an
application that does not take its enclaves).  The journal records it
(``unattached``), so that every later recover tells the truth: ``in-doubt``
(exit 7) while the enclaves live, the attach tried again (``restored`` once it
succeeds, every write kept), and ``lost`` (exit 10) once the tree and its
enclaves are gone; never ``done``.  Real CRIU, the example kvstore with one
enclave, one bed.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess

import pytest

pytest.register_assert_rewrite("bed_helpers")

from bed_helpers import wait_until  # noqa: E402
from test_attack_s28 import (  # noqa: E402
    Case,
    Held,
    _argv,
    _end_copies,
    _restore_guardian,
    case,  # noqa: F401 (the fixture)
    cli,
)

from migsgx import _proc  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.timeout(150)]

#: The subnet of this module's testbed (the ``bed`` fixture of conftest.py).
BED_SUBNET = 71


def _held_restore(c: Case, faults: str) -> Held:
    go = c.tmp / "go-restore"
    log = c.tmp / "restore.err"
    env = {**os.environ, "MIGSGX_FAULT": f"restore.activated:wait-file={go},{faults}".strip(","),
           "MIGSGX_PLATFORM_SOCKET": c.socket}  # fmt: skip
    with log.open("wb") as err:
        proc = subprocess.Popen(_argv(*c.restore_args()), stdout=subprocess.DEVNULL,
                                stderr=err, stdin=subprocess.DEVNULL, env=env)  # fmt: skip
    held = Held(proc, log, go)
    c.tools.append(held)
    held.reached("restore.activated")
    return held


def _recover(c: Case, fault: str = "") -> tuple[int, dict[str, str]]:
    env = {"MIGSGX_FAULT": fault} if fault else None
    done = cli("recover", "--checkpoint", str(c.ck), "--json",
               "--platform-socket", c.socket, env=env)  # fmt: skip
    assert "Traceback" not in done.stderr, done.stderr
    [resolution] = json.loads(done.stdout)
    return done.returncode, resolution


def _kill(*pids: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _enclaves(c: Case) -> list[int]:
    journal = json.loads((c.ck / "checkpoint-journal.json").read_text())
    return [int(item[0]) for item in journal["holders"]]


@pytest.mark.parametrize("party", ["recover", "tool", "guardian"])
def test_a_failed_attach_is_told_by_every_later_recover(case: Case, party: str) -> None:  # noqa: F811
    c = case
    c.checkpoint()
    if party == "recover":
        # The tool and its guardian die: recover finishes, its attach fails.
        tool = _held_restore(c, "")
        guardian = _restore_guardian(tool.proc.pid)
        _kill(guardian, tool.proc.pid)
        tool.proc.wait(30)
        wait_until(lambda: not _proc.alive(guardian), 10, "the guardian to die")
        code, found = _recover(c, "restore.attach:fail")
        assert (code, found["outcome"]) == (7, "in-doubt"), found
    elif party == "tool":
        # The tool's own attach fails: it says so and ends; its guardian lets go.
        done = cli(*c.restore_args(), env={"MIGSGX_FAULT": "restore.attach:fail"})
        assert done.returncode == 7 and "Traceback" not in done.stderr, done.stderr
        assert "runs without its enclaves" in done.stderr, done.stderr
    else:
        # The tool dies: its guardian finishes, its attach fails.
        tool = _held_restore(c, "restore.attach:fail")
        guardian = _restore_guardian(tool.proc.pid)
        _kill(tool.proc.pid)
        tool.proc.wait(30)
        wait_until(lambda: not _proc.alive(guardian), 60, "the guardian to end")
        assert "could not attach the enclaves" in tool.text(), tool.text()
    enclaves = _enclaves(c)
    assert c.bed.runnable_copies(c.app)["src"] == 1  # continued, without its enclaves
    assert enclaves and all(_proc.alive(pid) for pid in enclaves)  # they hold the state
    # Said again, not ``done``: the attach is tried again (here failing again).
    code, found = _recover(c, "restore.attach:fail")
    assert (code, found["outcome"]) == (7, "in-doubt"), found
    assert "without its 1 enclave(s)" in found["detail"], found
    if party != "guardian":
        code, found = _recover(c)  # the application takes them now: restored
        assert (code, found["outcome"]) == (0, "restored"), found
        c.one_copy_with_every_write(within=3)
        code, found = _recover(c)
        assert (code, found["outcome"]) == (0, "done"), found
        return
    _end_copies(c.bed, c.app)  # the application ends: its enclaves end with it
    wait_until(lambda: not any(_proc.alive(p) for p in enclaves), 15, "the enclaves to end")
    for _ in range(2):  # every later recover says it, the same way
        code, found = _recover(c)
        assert (code, found["outcome"]) == (10, "lost"), found
        assert "their state is gone" in found["detail"], found
