"""Nothing launches from a checkpoint's enclave image before it is checked as recorded.

``migsgx recover --checkpoint`` reads the gates through a fresh enclave of each
image of the directory, and ``migsgx restore`` loads the state into one.  Both
go through one check (:func:`migsgx.datapath.ckpt_image.checked_image`): the
image must have the size and SHA-256 that ``migsgx.json`` records.  Each cell
checkpoints the example kvstore (one enclave, real CRIU), kills the tool after
the commit (the source stays fenced: stopped, never to run again), then damages
the image (one flipped byte, or the valid image of another enclave in its
place).  ``recover`` and ``restore`` refuse, naming the file and what differs:
no enclave process started (the platform service's children and its per-launch
logs are scanned), the fenced source untouched, every file of the directory as
it was, nothing left behind.  Put back, one ``recover`` (``restorable``, the
fenced source removed) and one ``restore`` give one copy with every write.
Before, ``recover`` launched whatever image the directory held (exit 7 at best).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import cbor2
import pytest

pytest.register_assert_rewrite("bed_helpers")

from bed_helpers import ask, kvstore, wait_until  # noqa: E402
from state_helpers import children_of  # noqa: E402
from test_checkpoint_faults import Case, checkpoint, recover_checkpoint  # noqa: E402

from migsgx import _proc  # noqa: E402
from migsgx.lab.testbed import Testbed  # noqa: E402
from migsgx.sgx.image import EnclaveImage  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.timeout(150)]

#: The subnet of this module's testbed (the ``bed`` fixture of conftest.py).
BED_SUBNET = 101

IMAGE = "enclave-0.image"


@pytest.fixture
def case(bed: Testbed, tmp_path: Path) -> Iterator[Case]:
    app = kvstore(bed)
    assert ask(bed, app, "src", f"PUT kept {secrets.token_hex(32)}").startswith("OK")
    c = Case(bed, app, tmp_path / "ck", ask(bed, app, "src", "DIGEST"))
    yield c
    c.finish()


def _launches(bed: Testbed) -> tuple[set[int], set[str]]:
    """The source platform service's enclave processes, and its per-launch logs (one
    file per enclave it ever started, ``sgx/enclave_logs.py``)."""

    service = bed.services["src"]
    logs = {p.name for p in (service.state / "logs").glob("enclave-*.log")}
    return set(children_of(service.process.pid)), logs


def _files(directory: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.iterdir())
        if p.is_file()
    }


def _damage(case: Case, how: str) -> bytes:
    """Damage the checkpoint's image; returns the recorded bytes (to put back)."""

    path = case.ck / IMAGE
    recorded = path.read_bytes()
    if how == "flipped-byte":
        data = bytearray(recorded)
        data[len(data) // 2] ^= 0x01
        damaged = bytes(data)
    else:  # the valid, signed image of another enclave of the same author
        other = EnclaveImage.load(case.bed.image("model"))
        damaged = bytes(cbor2.dumps(other.files))
    os.chmod(path, 0o600)
    path.write_bytes(damaged)
    return recorded


@pytest.mark.parametrize("how", ["flipped-byte", "other-enclave"])
def test_an_image_not_as_recorded_launches_nothing(case: Case, how: str) -> None:
    done = checkpoint(case, "ckpt.after-commit:exit")
    assert done.returncode == 70, done.stderr
    wait_until(lambda: case.bed.runnable_copies(case.app)["src"] == 0, 15, "the fence")
    journal = json.loads((case.ck / "checkpoint-journal.json").read_text())
    guardian = journal["guardian"][0]
    wait_until(lambda: not _proc.alive(guardian), 30, "the guardian to end")  # (it reads no gate)
    fenced = case.bed.copies(case.app)["src"]
    assert fenced and all(state in ("T", "t") for _, state in fenced), fenced
    recorded = _damage(case, how)
    before, launches = _files(case.ck), _launches(case.bed)
    assert launches[1], "the service keeps a log per launch (the application's enclave's)"

    for _ in range(2):  # idempotent: refused again, still nothing changed
        code, found = recover_checkpoint(case)
        assert _launches(case.bed) == launches, found  # no enclave process started
        assert code == 7 and found["outcome"] == "in-doubt", found  # (the gates unread)
        assert "[checkpoint-damaged]" in found["detail"], found
        assert f"{case.ck / IMAGE} is not the one the checkpoint recorded" in found["detail"]
        assert "SHA-256 " in found["detail"] or " bytes where " in found["detail"], found
        assert "nothing was launched" in found["detail"], found
        back = case.restore()
        assert back.returncode == 1 and "Traceback" not in back.stderr, back.stderr
        assert "[checkpoint-damaged]" in back.stderr, back.stderr
        assert f"{case.ck / IMAGE} is not the one the checkpoint recorded" in back.stderr
        assert _launches(case.bed) == launches  # none started by the restore either
        assert _files(case.ck) == before  # the checkpoint as it was, nothing left behind
        assert case.bed.copies(case.app)["src"] == fenced  # the fenced source untouched

    (case.ck / IMAGE).write_bytes(recorded)  # put back: the checkpoint works as before
    code, found = recover_checkpoint(case)
    assert code == 0 and found["outcome"] == "restorable", found
    assert case.bed.copies(case.app)["src"] == []  # the fenced source went for good
    back = case.restore()
    assert back.returncode == 0, back.stderr
    case.one_copy_with_every_write()
