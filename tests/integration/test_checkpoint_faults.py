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

import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

from migsgx.criu import Criu
from migsgx.lab.testbed import AppProcess, Testbed
from migsgx.system.process import kill_tree

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


@pytest.fixture(scope="module")
def bed(
    criu: Criu,
    subreaper: None,
    _stale_namespaces_removed: None,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Testbed]:
    with Testbed(tmp_path_factory.mktemp("ckfault"), subnet=64) as testbed:
        yield testbed


def cli(*args: str, env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "migsgx", *args],
        capture_output=True,
        text=True,
        timeout=90,
        env={**os.environ, **(env or {})},
    )


def ask(bed: Testbed, app: AppProcess, line: str) -> str:
    return bed.ask(line, app.port, at="src", via="dst")


def wait_until(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


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
        assert ask(self.bed, self.app, "DIGEST") == self.digest
        assert ask(self.bed, self.app, "PUT after 01").startswith("OK")  # ECALLs work
        self.digest = ask(self.bed, self.app, "DIGEST")
        assert self.bed.runnable_copies(self.app)["src"] == 1

    def finish(self) -> None:
        for pid, _ in self.bed.copies(self.app)["src"]:
            kill_tree(pid)


@pytest.fixture
def case(bed: Testbed, tmp_path: Path) -> Iterator[Case]:
    app = bed.start_app("kvstore", ["--image", str(bed.image("kvstore"))])
    assert ask(bed, app, f"PUT kept {secrets.token_hex(32)}").startswith("OK")
    digest = ask(bed, app, "DIGEST")
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
def test_tool_killed_before_the_dump(case: Case) -> None:
    done = checkpoint(case, "ckpt.before-dump:exit")
    assert done.returncode == 70
    # The guardian aborted the enclave (its checkpoint gate is gone) and handed it back.
    case.one_copy_with_every_write()
    back = case.restore()
    assert back.returncode != 0 and "Traceback" not in back.stderr
    case.one_copy_with_every_write()


def test_tool_killed_in_post_dump_before_the_commit(case: Case) -> None:
    done = checkpoint(case, "ckpt.before-commit:exit")
    assert done.returncode == 70
    case.one_copy_with_every_write()  # CRIU resumed it, the guardian unfenced it
    back = case.restore()
    assert back.returncode != 0 and "[checkpoint-gate]" in back.stderr, back.stderr
    case.one_copy_with_every_write()


def test_tool_killed_after_the_commit(case: Case) -> None:
    done = checkpoint(case, "ckpt.after-commit:exit")
    assert done.returncode == 70
    # CRIU resumed the source, the fence stopped it: no runnable copy until the restore.
    wait_until(lambda: case.bed.runnable_copies(case.app)["src"] == 0, 15, "the fence")
    assert json.loads((case.ck / "migsgx.json").read_text())["files"]
    back = case.restore()  # removes the fenced source, restores the checkpoint
    assert back.returncode == 0, back.stderr
    case.one_copy_with_every_write()


def test_source_enclave_killed_before_the_commit(case: Case) -> None:
    """The one enclave holding the state died: lost as in a crash; nothing runs twice."""

    done = checkpoint(case, "ckpt.before-commit:kill-enclave")
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    wait_until(lambda: case.bed.runnable_copies(case.app)["src"] == 1, 15, "the source")
    assert ask(case.bed, case.app, "DIGEST").startswith("ERR")  # its enclave is gone
    back = case.restore()  # the abandoned checkpoint's files were removed
    assert back.returncode != 0 and "Traceback" not in back.stderr, back.stderr
    assert case.bed.runnable_copies(case.app)["src"] == 1


def test_source_application_killed_before_the_dump(case: Case) -> None:
    done = checkpoint(case, "ckpt.before-dump:kill-source")
    assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr
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
    assert ask(case.bed, case.app, "DIGEST") == case.digest


def test_restored_application_killed_while_held(case: Case) -> None:
    completed(case)
    first = case.restore({"MIGSGX_FAULT": "restore.loaded:kill-source"})
    assert first.returncode != 0 and "Traceback" not in first.stderr, first.stderr
    assert case.bed.copies(case.app)["src"] == []
    back = case.restore()  # nothing was activated: the checkpoint restores
    assert back.returncode == 0, back.stderr
    case.one_copy_with_every_write()
