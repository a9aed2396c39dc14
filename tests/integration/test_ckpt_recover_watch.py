"""``migsgx recover --checkpoint`` re-reads who holds a source enclave's connection too.

A checkpoint whose tool and guardian both died before the commit leaves each
source enclave holding a duplicate of its connection (``__mig_hold``), and the
set of the application's processes named with that hold.  ``recover
--checkpoint`` takes the duplicate back, aborts the pending gate and hands the
enclave back to the application; before it continues the source tree it
re-reads who holds the connection (root: ``/proc`` and ``sock_diag``) and tells
the enclave (``__mig_watch``), as every other driver giving a source back does.
The enclave then follows the processes that really hold the connection, not
those named with the hold.

Real platform service, real enclave process, real application forking real
children (``test_holders_after_fork.py``'s), the real ``migsgx checkpoint``
killed with its guardian at ``ckpt.before-dump`` (``kill-guardian``: its holds
made and journaled), the real ``migsgx recover --checkpoint``.  The moments of
the forks and closes are the test's (files the application waits for); the
application is a runtime without ``__mig_unhold`` (``app.resume-taken:no-unhold``),
so the duplicate stays after the hand-back and its watch decides; no sleep
decides anything.

A child forked after the hold whose parent exited runs outside the fenced tree: no
watch is sent while it runs (``agent/holders.py``), and the set named with the hold
decides; its own end of the connection keeps the enclave.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from platform_fixtures import World, make_image, pid_alive, shared_world, wait_until
from test_holders_after_fork import SECRET, Forking, _enclave_logs, run_forking

from migsgx.agent.ckpt_journal import read_journal
from migsgx.lab.hosts import ServiceProcess
from migsgx.sgx.image import EnclaveImage

pytestmark = pytest.mark.integration

ENDED = b"a process of the application ended after the abort"
LET_GO = b"the application ended after the abort: its duplicate is let go"
OLD_RUNTIME = {"MIGSGX_FAULT": "app.resume-taken:no-unhold"}


@pytest.fixture(scope="session")
def world() -> World:
    return shared_world()


@pytest.fixture(scope="module")
def probe(world: World) -> EnclaveImage:
    return make_image(world.author)


@pytest.fixture
def forking(
    request: pytest.FixtureRequest, service: ServiceProcess, probe: EnclaveImage, tmp_path: Path
) -> Iterator[Forking]:
    """``test_holders_after_fork.py``'s application (P, C1 forked before the hold)."""

    mode, env = request.param
    yield from run_forking(mode, env, service, probe, tmp_path)


def _checkpoint_dies_with_its_guardian(app: Forking, ck: Path) -> None:
    """``migsgx checkpoint`` holds the enclave connection (naming P and C1), journals
    the hold, then it and its guardian are killed (``ckpt.before-dump:kill-guardian``)."""

    done = subprocess.run(
        [sys.executable, "-m", "migsgx", "checkpoint", str(app.parent), "--dir", str(ck)],
        capture_output=True, stdin=subprocess.DEVNULL, text=True, timeout=120,
        env={**os.environ, "MIGSGX_FAULT": "ckpt.before-dump:kill-guardian"},
    )  # fmt: skip
    assert done.returncode == 70, done.stderr
    assert "migsgx fault: ckpt.before-dump:kill-guardian" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert pid_alive(app.enclave)  # it holds its duplicate: no end of file


def _recover(ck: Path) -> None:
    """One ``migsgx recover --checkpoint``: nothing committed, the enclave goes back."""

    done = subprocess.run(
        [sys.executable, "-m", "migsgx", "recover", "--checkpoint", str(ck), "--json"],
        capture_output=True, stdin=subprocess.DEVNULL, text=True, timeout=120,
    )  # fmt: skip
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode == 0, done.stderr
    [found] = json.loads(done.stdout)
    assert found["decision"] == "abort" and found["outcome"] == "stayed", found
    assert "handed back" in found["detail"], found


@pytest.mark.parametrize("forking", [("fork", OLD_RUNTIME)], indirect=True)
def test_recover_sends_no_watch_while_a_holder_outside_the_fence_runs(
    forking: Forking, world: World, tmp_path: Path
) -> None:
    """After the hold, C1 (named with it) forks C2, which keeps the connection, and
    exits; the tool and its guardian are dead.  C2, re-parented, is outside the
    source's tree and runs: an ECALL it wrote between ``__mig_watch``'s frame and its
    descriptor message would put the shared stream out of step (the enclave's serve
    loop would end on a protocol error and wipe the aborted source's state).  So
    ``recover --checkpoint`` hands the enclave back without a watch: it keeps the set
    named with the hold (P and C1).  P is killed without its ``__mig_unhold``: the
    duplicate goes, and C2's own end keeps the enclave: C2 finds the state intact,
    and the enclave ends with C2.
    """

    app, work, ck = forking, forking.work, tmp_path / "ck"
    _checkpoint_dies_with_its_guardian(app, ck)
    (work / "go").touch()  # after the hold: C1 forks C2 and exits
    assert wait_until(lambda: (work / "c2").exists() and not pid_alive(app.child), 30)
    c2 = int((work / "c2").read_text())
    journal = read_journal(ck)
    assert journal is not None and len(journal["holders"]) == 1, journal
    _recover(ck)
    assert pid_alive(app.enclave)  # back with its application
    logs = _enclave_logs(world)
    before = {line: logs.count(line) for line in (ENDED, LET_GO)}

    def seen(line: bytes) -> bool:
        return _enclave_logs(world).count(line) > before[line]

    os.kill(app.parent, signal.SIGKILL)  # P dies before any __mig_unhold
    app.app.wait()
    assert wait_until(lambda: seen(LET_GO), 30), "no watch was sent: the hold's set decides"
    assert pid_alive(app.enclave)  # C2's own end of the connection keeps it
    (work / "use").touch()
    assert wait_until((work / "answer").exists, 30), "C2 never called its enclave"
    assert (work / "answer").read_text() == SECRET  # the state is intact
    os.kill(c2, signal.SIGKILL)  # the last real holder ends: so does the enclave
    assert wait_until(lambda: not pid_alive(app.enclave), 30), "the enclave outlived C2"


@pytest.mark.parametrize("forking", [("close", OLD_RUNTIME)], indirect=True)
def test_recover_does_not_let_a_named_process_that_closed_the_connection_keep_the_enclave(
    forking: Forking, tmp_path: Path
) -> None:
    """The reverse: after the hold C1 (named with it) closes its copy of the
    connection and lives on.  ``recover --checkpoint`` hands the enclave back to P
    having re-read the holders (P alone); P is killed without its ``__mig_unhold``,
    and the enclave ends with its last real holder, as a crash of the application
    would end it.

    Before, C1 stayed named: alive, it kept the duplicate, and the enclave, for good.
    """

    app, work, ck = forking, forking.work, tmp_path / "ck"
    _checkpoint_dies_with_its_guardian(app, ck)
    (work / "go").touch()  # after the hold: C1 closes the connection and lives on
    assert wait_until((work / "closed").exists, 30)
    _recover(ck)
    assert pid_alive(app.enclave)  # the state lives with its application
    os.kill(app.parent, signal.SIGKILL)
    app.app.wait()
    assert pid_alive(app.child)  # C1 lives on, without the connection
    assert wait_until(lambda: not pid_alive(app.enclave), 30), "the enclave outlived its holders"
