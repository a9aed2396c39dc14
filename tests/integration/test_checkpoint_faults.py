"""The checkpoint and restore rows of the fault matrix (issue 9), with real CRIU.

Each cell checkpoints (or restores) the example kvstore application, with a
fault injected at a named step through ``MIGSGX_FAULT`` (``migsgx/agent/faults.py``):
the tool killed (``exit``: it ends at once, as with ``kill -9``), the source
application or its enclave SIGKILLed, or a file of the checkpoint damaged.  Then,
after at most one more ``migsgx restore`` (the recovery a user runs), it asserts
exactly one runnable copy holding every acknowledged write, or, where the one
enclave holding the state died, that nothing else is lost and nothing runs twice.
The table in ``docs/migration.md`` ("Checkpoints") is this one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

pytest.register_assert_rewrite("bed_helpers")

from bed_helpers import ask, kvstore, wait_until  # noqa: E402
from pair_helpers import enclave_pair  # noqa: E402

from migsgx.lab.hosts import start_service  # noqa: E402
from migsgx.lab.testbed import AppProcess, Testbed  # noqa: E402
from migsgx.system.process import kill_tree  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


#: The subnet of this module's testbed (the ``bed`` fixture of conftest.py).
BED_SUBNET = 64


def cli(*args: str, env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "migsgx", *args],
        capture_output=True,
        text=True,
        timeout=90,
        env={**os.environ, **(env or {})},
    )


@dataclass
class Case:
    bed: Testbed
    app: AppProcess
    ck: Path
    digest: str

    def restore(self, env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        bed = self.bed
        return cli(
            "restore", "--dir", str(self.ck), "--netns", bed.host("src").netns,
            "--platform-socket", str(bed.services["src"].socket), env=env,
        )  # fmt: skip

    def one_copy_with_every_write(self) -> None:
        wait_until(lambda: self.bed.runnable_copies(self.app)["src"] == 1, 15, "one copy")
        assert ask(self.bed, self.app, "src", "DIGEST") == self.digest
        assert ask(self.bed, self.app, "src", "PUT after 01").startswith("OK")  # ECALLs work
        self.digest = ask(self.bed, self.app, "src", "DIGEST")
        assert self.bed.runnable_copies(self.app)["src"] == 1

    def finish(self) -> None:
        for pid, _ in self.bed.copies(self.app)["src"]:
            kill_tree(pid)


@pytest.fixture
def case(bed: Testbed, tmp_path: Path) -> Iterator[Case]:
    app = kvstore(bed)
    assert ask(bed, app, "src", f"PUT kept {secrets.token_hex(32)}").startswith("OK")
    digest = ask(bed, app, "src", "DIGEST")
    c = Case(bed, app, tmp_path / "ck", digest)
    yield c
    c.finish()


def checkpoint(case: Case, fault: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {"MIGSGX_FAULT": fault} if fault else None
    return cli("checkpoint", str(case.app.pid), "--dir", str(case.ck), env=env)


def completed(case: Case) -> None:
    done = checkpoint(case)
    assert done.returncode == 0, done.stderr
    wait_until(lambda: not os.path.exists(f"/proc/{case.app.pid}"), 10, "the source to end")


# --- checkpoint rows ------------------------------------------------------------------------------
_FAULT_AT = re.compile(r"migsgx fault: (\S+) at ([0-9.]+)")


def source_back(case: Case, run: subprocess.CompletedProcess[str]) -> float:
    """Seconds from the fault to the source answering with every acknowledged write."""

    found = _FAULT_AT.findall(run.stderr)
    assert found, run.stderr
    deadline = time.monotonic() + 60
    while True:
        with contextlib.suppress(Exception):  # not answering yet (stopped, enclave not back)
            if ask(case.bed, case.app, "src", "DIGEST") == case.digest:
                back = time.monotonic() - float(found[0][1])
                cell = {"cell": found[0][0], "back_seconds": round(back, 3)}
                print("ckpt-fault " + json.dumps(cell))
                return back
        assert time.monotonic() < deadline, "the source never ran again"
        time.sleep(0.02)


def phase(case: Case) -> str | None:
    with contextlib.suppress(OSError, ValueError):
        return str(json.loads((case.ck / "checkpoint-journal.json").read_text())["phase"])
    return None


@pytest.mark.parametrize("point", ["ckpt.before-dump", "ckpt.before-commit"])
def test_tool_killed_before_the_commit(case: Case, point: str) -> None:
    """The guardian aborts the enclave, resumes the source and resolves the checkpoint itself."""

    done = checkpoint(case, f"{point}:exit")
    assert done.returncode == 70
    # (before-commit: CRIU resumed the tree, the guardian unfenced it)
    source_back(case, done)
    # ``recover --checkpoint``'s logic, run by the guardian: the files, which never
    # open (the gate went with the abort), are removed.
    wait_until(lambda: phase(case) == "aborted", 30, "the guardian's resolution")
    assert not list(case.ck.glob("*.img")) and not list(case.ck.glob("enclave-*"))
    case.one_copy_with_every_write()
    back = case.restore()
    assert back.returncode != 0 and "Traceback" not in back.stderr, back.stderr
    case.one_copy_with_every_write()


def test_tool_killed_after_the_commit(case: Case) -> None:
    env = {"MIGSGX_FAULT": "ckpt.after-commit:exit",
           "MIGSGX_PLATFORM_SOCKET": str(case.bed.services["src"].socket)}  # fmt: skip
    done = cli("checkpoint", str(case.app.pid), "--dir", str(case.ck), env=env)
    assert done.returncode == 70
    # CRIU resumed the source, the fence stopped it; the guardian read the gates
    # (committed) and removed the fenced source: the checkpoint is the one copy.
    wait_until(lambda: case.bed.copies(case.app)["src"] == [], 30, "the fenced source to go")
    assert json.loads((case.ck / "migsgx.json").read_text())["files"]
    back = case.restore()
    assert back.returncode == 0, back.stderr
    case.one_copy_with_every_write()


@pytest.mark.parametrize("point", ["ckpt.before-dump", "ckpt.before-commit"])
def test_source_enclave_killed_before_the_commit(case: Case, point: str) -> None:
    """The one enclave holding the state died: lost as in a crash; nothing runs twice."""

    done = checkpoint(case, f"{point}:kill-enclave")
    # Nothing saved and the source runs, but not as before: 11 (before: 6, "runs on").
    assert done.returncode == 11 and "Traceback" not in done.stderr, done.stderr
    assert "[source-enclave-lost]" in done.stderr and "enclave 0 (MRENCLAVE " in done.stderr
    wait_until(lambda: case.bed.runnable_copies(case.app)["src"] == 1, 15, "the source")
    assert ask(case.bed, case.app, "src", "DIGEST").startswith("ERR")  # its enclave is gone
    assert ask(case.bed, case.app, "src", "PING") == "PONG"  # the application answers
    back = case.restore()  # the abandoned checkpoint's files were removed
    assert back.returncode != 0 and "Traceback" not in back.stderr, back.stderr
    assert case.bed.runnable_copies(case.app)["src"] == 1


def test_source_application_killed_before_the_dump(case: Case) -> None:
    done = checkpoint(case, "ckpt.before-dump:kill-source")
    assert done.returncode == 8 and "Traceback" not in done.stderr, done.stderr  # source-gone
    assert case.bed.copies(case.app)["src"] == []
    back = case.restore()
    assert back.returncode != 0 and "Traceback" not in back.stderr
    assert case.bed.copies(case.app)["src"] == []


# --- restore rows ---------------------------------------------------------------------------------
def test_restore_tool_killed_with_the_tree_held(case: Case) -> None:
    completed(case)
    first = case.restore({"MIGSGX_FAULT": "restore.held:exit"})
    assert first.returncode == 70
    assert case.bed.runnable_copies(case.app)["src"] == 0  # held: stopped
    back = case.restore()  # removes the held tree, restores again
    assert back.returncode == 0, back.stderr
    case.one_copy_with_every_write()


def test_restore_tool_killed_with_the_enclaves_loaded(case: Case) -> None:
    completed(case)
    first = case.restore({"MIGSGX_FAULT": "restore.loaded:exit"})
    assert first.returncode == 70  # the loaded enclaves never ran: the gate holds
    back = case.restore()
    assert back.returncode == 0, back.stderr
    case.one_copy_with_every_write()


def test_restore_tool_killed_after_the_activation(case: Case) -> None:
    """The enclaves run, the tree neither continued nor attached: the guardian finishes."""

    completed(case)
    first = case.restore({"MIGSGX_FAULT": "restore.activated:exit"})
    assert first.returncode == 70
    case.one_copy_with_every_write()  # continued and attached by the restore's guardian
    again = case.restore()  # the checkpoint was consumed: refused, nothing else changes
    assert again.returncode != 0 and "Traceback" not in again.stderr, again.stderr
    assert case.bed.runnable_copies(case.app)["src"] == 1
    assert ask(case.bed, case.app, "src", "DIGEST") == case.digest


def test_restored_application_killed_while_held(case: Case) -> None:
    completed(case)
    first = case.restore({"MIGSGX_FAULT": "restore.loaded:kill-source"})
    assert first.returncode != 0 and "Traceback" not in first.stderr, first.stderr
    assert case.bed.copies(case.app)["src"] == []
    back = case.restore()  # nothing was activated: the checkpoint restores
    assert back.returncode == 0, back.stderr
    case.one_copy_with_every_write()


# --- the metadata, rewritten together with the files -------------------------------------------
def _rewrite_metadata(ck: Path, change: str) -> None:
    """What a forger does: change the checkpoint, then make ``migsgx.json`` agree with it."""

    meta = json.loads((ck / "migsgx.json").read_text())
    if change == "page-and-digests":
        pages = max(ck.glob("pages-*.img"), key=lambda p: p.stat().st_size)
        data = bytearray(pages.read_bytes())
        data[len(data) // 2] ^= 0x01
        pages.write_bytes(bytes(data))
    else:  # only the metadata: a different restore option
        meta["tcp_close"] = not meta["tcp_close"]
    for name in meta["files"]:
        content = (ck / name).read_bytes()
        meta["files"][name] = [len(content), hashlib.sha256(content).hexdigest()]
    (ck / "migsgx.json").write_text(json.dumps(meta, indent=2) + "\n")


@pytest.mark.parametrize("change", ["page-and-digests", "options-only"])
def test_metadata_rewritten_with_the_files_is_refused(case: Case, change: str) -> None:
    """Every file digest agrees with the rewritten metadata; the enclave's gate does not."""

    completed(case)
    intact = case.ck.with_name("intact")
    shutil.copytree(case.ck, intact)
    _rewrite_metadata(case.ck, change)
    back = case.restore()
    assert back.returncode == 1 and "Traceback" not in back.stderr, back.stderr
    assert "[checkpoint-damaged]" in back.stderr and "metadata" in back.stderr, back.stderr
    assert case.bed.copies(case.app)["src"] == []  # nothing ran
    # The gate was only read: the genuine checkpoint restores, once.
    case.ck = intact
    back = case.restore()
    assert back.returncode == 0, back.stderr
    case.one_copy_with_every_write()


# --- the platform service killed (kill -9) during a checkpoint or a restore ---------------------
def _platform_back(bed: Testbed) -> None:
    """An operator starts the killed platform service again (its enclaves reattach to it)."""

    bed.services["src"].stop()
    bed.services["src"] = start_service(bed.state("src"), prefix=bed.host("src").command([]))


def _platform_env(case: Case, point: str) -> dict[str, str]:
    return {
        "MIGSGX_FAULT": f"{point}:kill-platform",
        "MIGSGX_PLATFORM_SOCKET": str(case.bed.services["src"].socket),
    }


@pytest.mark.parametrize("point", ["ckpt.before-dump", "ckpt.before-commit"])
def test_platform_killed_during_the_checkpoint(case: Case, point: str) -> None:
    """No commit can be recorded: the source runs on with every write, nothing restores."""

    try:
        done = cli("checkpoint", str(case.app.pid), "--dir", str(case.ck),
                   env=_platform_env(case, point))  # fmt: skip
        assert "migsgx fault:" in done.stderr, done.stderr
        assert done.returncode == 6 and "Traceback" not in done.stderr, done.stderr
    finally:
        _platform_back(case.bed)
    case.one_copy_with_every_write()  # the enclave never gave its state up
    back = case.restore()  # the abandoned checkpoint's files were removed
    assert back.returncode != 0 and "Traceback" not in back.stderr, back.stderr
    case.one_copy_with_every_write()
    # The next checkpoint and restore, with the platform back, work.
    case.ck = case.ck.with_name("again")
    completed(case)
    back = case.restore()
    assert back.returncode == 0, back.stderr
    case.one_copy_with_every_write()


def test_platform_killed_after_the_commit(case: Case) -> None:
    """The commit is recorded: the checkpoint is complete and restores once the service is back."""

    try:
        done = cli("checkpoint", str(case.app.pid), "--dir", str(case.ck),
                   env=_platform_env(case, "ckpt.after-commit"))  # fmt: skip
        assert "migsgx fault:" in done.stderr, done.stderr
        assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
        wait_until(lambda: not os.path.exists(f"/proc/{case.app.pid}"), 10, "the source to end")
        down = case.restore()  # no platform service answers: refused before CRIU runs
        assert down.returncode != 0 and "Traceback" not in down.stderr, down.stderr
        assert case.bed.copies(case.app)["src"] == []
    finally:
        _platform_back(case.bed)
    back = case.restore()
    assert back.returncode == 0, back.stderr
    case.one_copy_with_every_write()


@pytest.mark.parametrize("point", ["restore.held", "restore.loaded"])
def test_platform_killed_during_the_restore(case: Case, point: str) -> None:
    """Nothing was activated (the gate holds): the held tree goes, the next restore works."""

    completed(case)
    try:
        first = case.restore(_platform_env(case, point))
        assert "migsgx fault:" in first.stderr, first.stderr
        assert first.returncode == 1 and "Traceback" not in first.stderr, first.stderr
        wait_until(lambda: case.bed.copies(case.app)["src"] == [], 15, "nothing left")
    finally:
        _platform_back(case.bed)
    back = case.restore()
    assert back.returncode == 0, back.stderr
    case.one_copy_with_every_write()


# --- migsgx recover --checkpoint: the gates decide, the journal names the parties ---------------
def recover_checkpoint(case: Case) -> tuple[int, dict[str, str]]:
    done = cli("recover", "--checkpoint", str(case.ck), "--json",
               "--platform-socket", str(case.bed.services["src"].socket))  # fmt: skip
    assert "Traceback" not in done.stderr, done.stderr
    [resolution] = json.loads(done.stdout)
    return done.returncode, resolution


def test_recover_after_the_tool_died_after_the_commit(case: Case) -> None:
    done = checkpoint(case, "ckpt.after-commit:exit")
    assert done.returncode == 70
    wait_until(lambda: case.bed.runnable_copies(case.app)["src"] == 0, 15, "the fence")
    for _ in range(2):  # idempotent
        code, found = recover_checkpoint(case)
        assert code == 0 and found["decision"] == "commit", found
        assert found["outcome"] == "restorable", found
        assert case.bed.copies(case.app)["src"] == []  # the fenced source is gone for good
    back = case.restore()
    assert back.returncode == 0, back.stderr
    case.one_copy_with_every_write()
    code, found = recover_checkpoint(case)
    assert code == 0 and found["outcome"] == "done", found
    case.one_copy_with_every_write()


def test_recover_after_the_tool_died_before_the_commit(case: Case) -> None:
    done = checkpoint(case, "ckpt.before-commit:exit")
    assert done.returncode == 70
    for _ in range(2):  # idempotent
        code, found = recover_checkpoint(case)
        assert code == 0 and found["decision"] == "abort", found
        assert found["outcome"] == "stayed", found
        assert not list(case.ck.glob("*.img"))  # never restorable: the files went
        case.one_copy_with_every_write()


@pytest.mark.parametrize(
    ("point", "outcome"),
    [
        ("restore.before-criu", "restorable"),  # enclaves loaded, nothing restored yet
        ("restore.held", "restorable"),  # CRIU restored the tree, held
        ("restore.loaded", "restorable"),  # right before the activation (the consume)
        ("restore.activated", "done"),  # the gates consumed: the restore's guardian finishes
    ],
)
def test_recover_after_a_restore_died(case: Case, point: str, outcome: str) -> None:
    """The restoring tool ``kill -9`` at each restore step: one recover, then one copy."""

    completed(case)
    first = case.restore({"MIGSGX_FAULT": f"{point}:exit"})
    assert first.returncode == 70, first.stderr
    code, found = recover_checkpoint(case)
    assert code == 0 and found["outcome"] == outcome, found
    if outcome == "restorable":
        assert case.bed.copies(case.app)["src"] == []  # a held tree never ran; it went
        back = case.restore()
        assert back.returncode == 0, back.stderr
    case.one_copy_with_every_write()
    again = case.restore()  # consumed: refused, nothing else changes
    assert again.returncode != 0 and "Traceback" not in again.stderr, again.stderr
    code, found = recover_checkpoint(case)
    assert code == 0 and found["outcome"] == "done", found
    case.one_copy_with_every_write()


@pytest.mark.parametrize(
    "point",
    ["ckpt.before-dump", "ckpt.before-commit", "ckpt.before-commit:fail,ckpt.rolled-back"],
    ids=["before-dump", "before-commit", "rolled-back"],
)
def test_recover_after_the_tool_and_its_guardian_died_before_the_commit(
    case: Case, point: str
) -> None:
    """Nobody holds the enclave's connection but the enclave itself (``__mig_hold``).

    It keeps its state (and with it every acknowledged write) instead of ending
    with its driver; ``recover --checkpoint`` takes the duplicate back, aborts
    the pending gate, continues the source and hands the enclave back to it.
    ``rolled-back``: the tool rolled back (its enclave aborted) and died with its
    guardian before the hand-back (fault point ``ckpt.rolled-back``): the aborted
    enclave keeps its duplicate until its application took the connection back
    (before, it let go at the abort and ended with the tool and the guardian; the
    application never answered again).
    """

    done = checkpoint(case, f"{point}:kill-guardian")
    assert done.returncode == 70, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    for attempt in range(2):  # idempotent
        code, found = recover_checkpoint(case)
        if attempt == 0:
            source_back(case, done)  # (fault to recovered: includes recover's start)
        assert code == 0 and found["decision"] == "abort", found
        assert found["outcome"] == "stayed", found
        assert ("handed back" in found["detail"]) == (attempt == 0), found
        assert not list(case.ck.glob("*.img")) and not list(case.ck.glob("enclave-*"))
        case.one_copy_with_every_write()
    back = case.restore()  # the gate was aborted: nothing restores
    assert back.returncode != 0 and "Traceback" not in back.stderr, back.stderr
    case.one_copy_with_every_write()


def test_recover_after_the_guardian_died_right_after_its_abort(case: Case) -> None:
    """The tool dies before the commit, its guardian right after the enclave answered
    its abort (``guardian.abort-answered``), before the hand-back.

    The aborted enclave keeps its duplicate of its connection until the application
    has the connection back (``__mig_unhold``), so it keeps its state: one
    ``recover --checkpoint`` takes the duplicate back and hands the enclave to the
    application.  Before, the abort let the duplicate go, the guardian's death was
    an end of file, and the application ran on without its enclave.
    """

    done = checkpoint(case, "ckpt.before-commit:exit,guardian.abort-answered:kill")
    assert done.returncode == 70, done.stderr
    assert "migsgx fault: guardian.abort-answered:kill" in done.stderr, done.stderr
    code, found = recover_checkpoint(case)
    assert code == 0 and found["decision"] == "abort", found
    assert found["outcome"] == "stayed" and "handed back" in found["detail"], found
    assert not list(case.ck.glob("*.img")) and not list(case.ck.glob("enclave-*"))
    case.one_copy_with_every_write()
    back = case.restore()  # the gate was aborted: nothing restores
    assert back.returncode != 0 and "Traceback" not in back.stderr, back.stderr
    case.one_copy_with_every_write()


# --- several enclaves: the first committed gate is the commit point -------------------------------
@pytest.fixture
def pair(bed: Testbed, tmp_path: Path) -> Iterator[Case]:
    """A kvstore with two enclaves, acknowledged writes in both."""

    app = kvstore(bed, "--enclaves", "2")
    for i in range(6):  # (keys spread over both enclaves)
        assert ask(bed, app, "src", f"PUT k{i} {secrets.token_hex(8)}").startswith("OK")
    c = Case(bed, app, tmp_path / "ck", ask(bed, app, "src", "DIGEST"))
    yield c
    c.finish()


def test_tool_killed_between_two_gate_commits_the_guardian_commits_the_rest(pair: Case) -> None:
    """The guardian finds one enclave committed (gone): it aborts none, commits the
    pending one on the connection it holds, and the checkpoint restores whole."""

    env = {"MIGSGX_FAULT": "ckpt.between-commits:exit",
           "MIGSGX_PLATFORM_SOCKET": str(pair.bed.services["src"].socket)}  # fmt: skip
    done = cli("checkpoint", str(pair.app.pid), "--dir", str(pair.ck), env=env)
    assert done.returncode == 70, done.stderr
    wait_until(lambda: pair.bed.copies(pair.app)["src"] == [], 30, "the fenced source to go")
    wait_until(lambda: phase(pair) == "committed", 30, "the guardian to commit the rest")
    code, found = recover_checkpoint(pair)
    assert code == 0 and found["outcome"] == "restorable", found
    back = pair.restore()
    assert back.returncode == 0, back.stderr
    pair.one_copy_with_every_write()


def test_an_abort_racing_a_committed_sibling_gate_is_refused(pair: Case) -> None:
    """The race of a guardian that saw every enclave pending while the dead tool's
    last commit still ran: its abort reaches the second enclave after the first
    committed its gate.  The platform store refuses it (one checkpoint group), the
    enclave stays frozen with its gate pending, and the guardian's roll-forward
    makes the checkpoint whole: restorable, one copy with every write."""

    env = {"MIGSGX_FAULT": "ckpt.between-commits:abort-rest",
           "MIGSGX_PLATFORM_SOCKET": str(pair.bed.services["src"].socket)}  # fmt: skip
    done = cli("checkpoint", str(pair.app.pid), "--dir", str(pair.ck), env=env)
    assert done.returncode == 70, done.stderr
    wait_until(lambda: phase(pair) == "committed", 30, "the guardian to commit the rest")
    wait_until(lambda: pair.bed.copies(pair.app)["src"] == [], 30, "the fenced source to go")
    code, found = recover_checkpoint(pair)
    assert code == 0 and found["outcome"] == "restorable", found
    back = pair.restore()
    assert back.returncode == 0, back.stderr
    pair.one_copy_with_every_write()


def test_tool_and_guardian_killed_between_two_gate_commits_recover_commits_the_rest(
    pair: Case,
) -> None:
    """Nobody holds the pending enclave but itself (``__mig_hold``): ``recover
    --checkpoint`` takes its duplicate back and commits it; the checkpoint is whole."""

    done = checkpoint(pair, "ckpt.between-commits:kill-guardian")
    assert done.returncode == 70, done.stderr
    code, found = recover_checkpoint(pair)
    assert code == 0 and (found["decision"], found["outcome"]) == ("commit", "restorable"), found
    assert "rolled forward" in found["detail"], found
    assert pair.bed.copies(pair.app)["src"] == []  # the fenced source is gone for good
    code, found = recover_checkpoint(pair)  # idempotent
    assert code == 0 and found["outcome"] == "restorable", found
    back = pair.restore()
    assert back.returncode == 0, back.stderr
    pair.one_copy_with_every_write()


def test_one_enclave_dead_the_other_aborted_goes_back_to_the_application(
    bed: Testbed, tmp_path: Path
) -> None:
    """Two enclaves; in post-dump, before any gate commits, the first enclave and the tool die.

    The guardian's aborts: the first is gone (its connection closed), the second
    aborts, which the platform store checked against the checkpoint's group (no
    gate of it can commit from then on).  Before, a checkpoint's guardian that
    found any enclave not pending took the roll-forward path: the gates said
    nothing committed, the survivor was aborted and offered back alone, which
    the application (all or none) refused, and its state ended with its
    connection.  Now both connections go back, the dead one's at end of file
    (a crash of that enclave); the survivor answers with every acknowledged write.
    """

    two = enclave_pair(bed)
    app = two.app
    pair = Case(bed, app, tmp_path / "ck", "")
    try:
        done = checkpoint(pair, "ckpt.before-commit:kill-enclave-and-exit")
        assert done.returncode == 70 and "Traceback" not in done.stderr, done.stderr
        assert "died undecided: their state is lost" in done.stderr, done.stderr
        two.survivor_answers(30)
        two.survivor_kept_every_write()
        code, found = recover_checkpoint(pair)
        assert code == 0 and (found["decision"], found["outcome"]) == ("abort", "stayed"), found
        assert not list(pair.ck.glob("*.img")) and not list(pair.ck.glob("enclave-*"))
        back = pair.restore()  # aborted: nothing restores
        assert back.returncode != 0 and "Traceback" not in back.stderr, back.stderr
        assert bed.runnable_copies(app)["src"] == 1
    finally:
        pair.finish()


def test_one_enclave_dead_tool_and_guardian_too_one_recover_gives_the_rest_back(
    bed: Testbed, tmp_path: Path
) -> None:
    """The same, the guardian killed as well: ``recover --checkpoint`` reads the gates
    (none committed), takes the survivor back, aborts it and hands it back with an
    end-of-file connection in place of the dead one's (all or none).  Before, it
    offered the survivor alone, the application refused, and its state ended."""

    two = enclave_pair(bed)
    app = two.app
    pair = Case(bed, app, tmp_path / "ck", "")
    try:
        done = checkpoint(pair, "ckpt.before-commit:kill-enclave-guardian-and-exit")
        assert done.returncode == 70 and "Traceback" not in done.stderr, done.stderr
        code, found = recover_checkpoint(pair)
        assert code == 0 and (found["decision"], found["outcome"]) == ("abort", "stayed"), found
        assert "2 enclave(s) handed back" in found["detail"], found
        assert "died undecided" in found["detail"], found
        two.survivor_kept_every_write(writes_after=False)
        assert not list(pair.ck.glob("*.img")) and not list(pair.ck.glob("enclave-*"))
        assert bed.runnable_copies(app)["src"] == 1
    finally:
        pair.finish()
