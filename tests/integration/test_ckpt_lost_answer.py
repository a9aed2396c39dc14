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
from pathlib import Path

import pytest
from bed_helpers import ask, enclave_processes, end_copies, wait_until
from fault_helpers import (  # (no_images_left: autouse, after every cell no images left)
    EXIT_IN_DOUBT,
    no_images_left,  # noqa: F401
    stop_guardian_of,
)
from platform_faults import (  # (faulty_platform: a fixture)
    AFTER,
    BEFORE,
    cli,
    faulty_platform,  # noqa: F401
    loaded,
    restart_platform,
)

from migsgx import _proc
from migsgx.lab.testbed import Testbed

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

#: The subnet of this module's testbed (the ``bed`` fixture of conftest.py).
BED_SUBNET = 181


@pytest.mark.parametrize("point", [AFTER, BEFORE])
@pytest.mark.usefixtures("faulty_platform")
def test_checkpoint_platform_service_dies_before_it_answers_the_gate_commit(
    bed: Testbed, tmp_path: Path, point: str
) -> None:
    """Both: the tool ends in doubt (7), the files kept (before: the source ran on, the
    gate committed and the record retired, the files removed or restorable).  ``after``:
    once the service is back, one ``recover --checkpoint`` finds it restorable, and one
    restore gives one copy with every write (the source does not run).  ``before``: one
    ``recover --checkpoint`` finds it stayed: the source, with every write."""

    app, digest = loaded(bed, f"{point}:exit")
    enclaves = enclave_processes(bed, "src")  # (this application's: the service is new)
    assert len(enclaves) == 1, enclaves
    ck = tmp_path / "ck"
    sock = {"MIGSGX_PLATFORM_SOCKET": str(bed.services["src"].socket)}
    try:
        run = cli("checkpoint", str(app.pid), "--dir", str(ck), env=sock)
        assert "Traceback" not in run.stderr, run.stderr
        assert run.returncode == EXIT_IN_DOUBT, run.stderr
        assert "migsgx.json" in {p.name for p in ck.iterdir()}, run.stderr
        restart_platform(bed, "")
        again = cli("recover", "--checkpoint", str(ck), "--json", env=sock)
        assert again.returncode == 0 and "Traceback" not in again.stderr, again.stderr
        [ours] = json.loads(again.stdout)
        if point == AFTER:
            assert ours["outcome"] == "restorable", again.stdout
            wait_until(lambda: bed.runnable_copies(app)["src"] == 0, 15, "the source to end")
            # The frozen source enclave, asked once more, finds its gate committed and ends.
            wait_until(lambda: not any(map(_proc.alive, enclaves)), 30, "the source enclave")
            restored = cli(
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
