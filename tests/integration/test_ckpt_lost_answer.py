"""A checkpoint's platform service that dies inside its gate commit: the enclave lives,
its answer lost.

The source enclave sends the gate's commit, which retires its persistent record
in the same update; the service receives it (``platform.before-commit``) or
writes it (``platform.after-commit``) and ends before it answers.  The enclave
cannot tell which.  Before, the commit's failure looked like "nothing given
up": CRIU resumed the tree, the abort destroyed the gate best effort (the
service gone: nothing) and the source ran on while the store could hold the
committed gate and no persistent record, the files on disk: a second copy on
``migsgx restore``.  Now the enclave marks its decision unknown and aborts only
once a platform service answered the gate's abort (a committed gate: it is
committed); the tool ends in doubt (7), the fence and the files kept, and one
``migsgx recover --checkpoint`` resolves it from the store once the service is
back (``docs/spec/commit.md``, section 5).

The moment is reached in the source's platform service itself
(``MIGSGX_FAULT=platform.after-commit:exit``: it ends there).  One bed; each
cell restarts the source's platform service with its fault, then starts the
application (its enclave a child of that service, which outlives it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
from bed_helpers import ask, enclave_processes, end_copies, kvstore, wait_until
from fault_helpers import (  # (no_images_left: autouse, after every cell no images left)
    EXIT_IN_DOUBT,
    no_images_left,  # noqa: F401
    stop_guardian_of,
)

from migsgx import _proc
from migsgx.lab.hosts import start_service
from migsgx.lab.testbed import AppProcess, Testbed

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

#: The subnet of this module's testbed (the ``bed`` fixture of conftest.py).
BED_SUBNET = 181

BEFORE, AFTER = "platform.before-commit", "platform.after-commit"


@pytest.fixture
def faulty_platform(bed: Testbed) -> Iterator[None]:
    """The source's platform service restarted with ``MIGSGX_FAULT`` by the cell; a
    plain one again afterwards."""

    yield
    _restart_platform(bed, "")


def _restart_platform(bed: Testbed, fault: str) -> None:
    bed.services["src"].stop()
    saved = os.environ.pop("MIGSGX_FAULT", None)
    if fault:
        os.environ["MIGSGX_FAULT"] = fault  # (inherited by the service alone: see below)
    try:
        bed.services["src"] = start_service(bed.state("src"), prefix=bed.host("src").command([]))
    finally:
        os.environ.pop("MIGSGX_FAULT", None)
        if saved is not None:
            os.environ["MIGSGX_FAULT"] = saved


def _loaded(bed: Testbed, fault: str) -> tuple[AppProcess, str]:
    """A kvstore (its enclave launched by a platform service with ``fault``) with
    acknowledged writes; their digest."""

    _restart_platform(bed, f"{fault}:exit")
    app = kvstore(bed)
    for i in range(3):
        assert ask(bed, app, "src", f"PUT k{i} {f'v{i}'.encode().hex()}") == f"OK {i + 1}"
    return app, ask(bed, app, "src", "DIGEST")


def _cli(*args: str, env: Mapping[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "migsgx", *args], capture_output=True, text=True, timeout=150,
        env={**os.environ, **env}, stdin=subprocess.DEVNULL,
    )  # fmt: skip


@pytest.mark.parametrize("point", [AFTER, BEFORE])
def test_checkpoint_platform_service_dies_before_it_answers_the_gate_commit(
    bed: Testbed, faulty_platform: None, tmp_path: Path, point: str
) -> None:
    """Both: the tool ends in doubt (7), the files kept (before: the source ran on, the
    gate committed and the record retired, the files removed or restorable).  ``after``:
    once the service is back, one ``recover --checkpoint`` finds it restorable, and one
    restore gives one copy with every write (the source does not run).  ``before``: one
    ``recover --checkpoint`` finds it stayed: the source, with every write."""

    app, digest = _loaded(bed, point)
    enclaves = enclave_processes(bed, "src")  # (this application's: the service is new)
    assert len(enclaves) == 1, enclaves
    ck = tmp_path / "ck"
    sock = {"MIGSGX_PLATFORM_SOCKET": str(bed.services["src"].socket)}
    try:
        run = _cli("checkpoint", str(app.pid), "--dir", str(ck), env=sock)
        assert "Traceback" not in run.stderr, run.stderr
        assert run.returncode == EXIT_IN_DOUBT, run.stderr
        assert "migsgx.json" in {p.name for p in ck.iterdir()}, run.stderr
        _restart_platform(bed, "")
        again = _cli("recover", "--checkpoint", str(ck), "--json", env=sock)
        assert again.returncode == 0 and "Traceback" not in again.stderr, again.stderr
        [ours] = json.loads(again.stdout)
        if point == AFTER:
            assert ours["outcome"] == "restorable", again.stdout
            wait_until(lambda: bed.runnable_copies(app)["src"] == 0, 15, "the source to end")
            # The frozen source enclave, asked once more, finds its gate committed and ends.
            wait_until(lambda: not any(map(_proc.alive, enclaves)), 30, "the source enclave")
            restored = _cli(
                "restore", "--dir", str(ck), "--netns", bed.host("src").netns,
                "--platform-socket", str(bed.services["src"].socket), env={},
            )  # fmt: skip
            assert restored.returncode == 0, restored.stderr
            wait_until(lambda: bed.runnable_copies(app)["src"] == 1, 15, "one copy")
            assert ask(bed, app, "src", "DIGEST") == digest
            assert ask(bed, app, "src", "PUT after 01").startswith("OK")  # (its record works)
        else:
            assert ours["outcome"] == "stayed", again.stdout
            wait_until(lambda: bed.runnable_copies(app)["src"] == 1, 15, "the source back")
            assert ask(bed, app, "src", "DIGEST") == digest
            assert ask(bed, app, "src", "PUT after 01").startswith("OK")  # (its record works)
    finally:
        stop_guardian_of(app.pid)
        end_copies(bed, app)
