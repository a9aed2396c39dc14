"""The CLI over damaged records: one clear line, a documented exit status, nothing touched.

``migsgx recover`` and ``migsgx restore --dir`` start from files a crash, a full
disk or a local user may have damaged.  Whatever is there, each ends with one
``migsgx: error [code]: ...`` line on stderr and the status ``docs/migration.md``
documents for it, never with a traceback or an ``[internal]`` error, and a
refused restore leaves the checkpoint directory exactly as it was.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from migsgx import cli
from migsgx.agent.ckpt_journal import CHECKPOINT_META, JOURNAL
from migsgx.agent.journal import Journal, journal_dir

NO_PID = 2**22 + 7  # above pid_max's default: never a live process
_PAGES = b"pages of the checkpointed process"

DAMAGE = {
    "truncated": lambda raw: raw[: len(raw) // 2],
    "empty": lambda raw: b"",
    "bit-flipped": lambda raw: bytes([raw[0] ^ 0x04]) + raw[1:],
    "not-utf8": lambda raw: b"\xff\xfe" + raw,
    "nested": lambda raw: b"[" * 100_000,
    "oversized": lambda raw: b" " * (1 << 20) + raw,
    "a-list": lambda raw: b"[1, 2, 3]",
}
FORGED_META = {
    "enclave-count-text": {"enclaves": "two"},
    "enclave-count-huge": {"enclaves": 10**30},
    "enclave-count-bool": {"enclaves": True},
    "digests-not-pairs": {"files": {"pages-1.img": 7}},
    "digests-a-list": {"files": ["pages-1.img"]},
    "format-object": {"format": {"v": 1}},
}


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exited:
        cli.main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err and "[internal]" not in err, err
    code = exited.value.code
    assert isinstance(code, int)
    return code, err


def _one_error_line(err: str, *codes: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("migsgx: error ["), err
    assert any(f"[{c}]" in lines[0] for c in codes), err


# --- migsgx recover --state: the tool's journal ---------------------------------------------------
@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_recover_reports_a_damaged_journal_in_doubt(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], damage: str
) -> None:
    journal = Journal.start(tmp_path / "agent", bytes(range(16)), ("10.0.0.2", 7070), NO_PID, "-")
    journal.update(tool_pid=NO_PID, phase="fenced")
    journal.path.write_bytes(DAMAGE[damage](journal.path.read_bytes()))
    before = journal.path.read_bytes()
    code, err = _run(["recover", "--state", str(tmp_path), "--json"], capsys)
    # Not "nothing to do": a migration started, and its journal cannot say where it went.
    assert code == cli.EXIT_IN_DOUBT
    _one_error_line(err, "in-doubt")
    assert journal.path.read_bytes() == before  # left for the operator, untouched


@pytest.mark.parametrize(
    "field,value",
    [("to", []), ("mid", "not hex"), ("enclave_mids", [7]), ("fenced", ["1"]), ("tool_pid", True)],
)
def test_recover_reports_a_forged_journal_in_doubt(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], field: str, value: object
) -> None:
    journal = Journal.start(tmp_path / "agent", bytes(range(16)), ("10.0.0.2", 7070), NO_PID, "-")
    data = {**journal.data, field: value}
    journal.path.write_text(json.dumps(data))
    code, err = _run(["recover", "--state", str(tmp_path), "--json"], capsys)
    assert code == cli.EXIT_IN_DOUBT
    _one_error_line(err, "in-doubt")
    assert [p for p, _ in Journal.damaged(tmp_path / "agent")] == [journal.path]
    assert list(journal_dir(tmp_path / "agent").iterdir()) == [journal.path]


# --- migsgx restore --dir / recover --checkpoint: the checkpoint's metadata -----------------------
def _checkpoint(directory: Path, **meta: object) -> dict[str, bytes]:
    (directory / "pages-1.img").write_bytes(_PAGES)
    digests = {"pages-1.img": [len(_PAGES), hashlib.sha256(_PAGES).hexdigest()]}
    record = {"format": 1, "enclaves": 0, "pid": NO_PID, "start": "1", "files": digests, **meta}
    (directory / CHECKPOINT_META).write_text(json.dumps(record))
    return _snapshot(directory)


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_restore_refuses_damaged_metadata_and_touches_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], damage: str
) -> None:
    _checkpoint(tmp_path)
    meta = tmp_path / CHECKPOINT_META
    meta.write_bytes(DAMAGE[damage](meta.read_bytes()))
    before = _snapshot(tmp_path)
    code, err = _run(["restore", "--dir", str(tmp_path)], capsys)
    assert code == cli.EXIT_CONFIG
    _one_error_line(err, "record-damaged", "config")
    assert _snapshot(tmp_path) == before


@pytest.mark.parametrize("forgery", sorted(FORGED_META))
def test_restore_refuses_forged_metadata_and_touches_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], forgery: str
) -> None:
    before = _checkpoint(tmp_path, **FORGED_META[forgery])
    code, err = _run(["restore", "--dir", str(tmp_path)], capsys)
    assert code in (cli.EXIT_CONFIG, cli.EXIT_ERROR)
    _one_error_line(err, "record-damaged", "config", "checkpoint-damaged")
    assert _snapshot(tmp_path) == before


def test_restore_refuses_a_truncated_page_image_and_touches_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _checkpoint(tmp_path)
    (tmp_path / "pages-1.img").write_bytes(_PAGES[:5])
    before = _snapshot(tmp_path)
    code, err = _run(["restore", "--dir", str(tmp_path)], capsys)
    assert code == cli.EXIT_ERROR
    _one_error_line(err, "checkpoint-damaged")
    assert "pages-1.img" in err and _snapshot(tmp_path) == before


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_recover_checkpoint_over_damaged_records_ends_cleanly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], damage: str
) -> None:
    _checkpoint(tmp_path, enclaves=1)
    for name in (CHECKPOINT_META, JOURNAL):
        path = tmp_path / name
        raw = path.read_bytes() if path.exists() else json.dumps({"phase": "fenced"}).encode()
        path.write_bytes(DAMAGE[damage](raw))
    code, err = _run(["recover", "--checkpoint", str(tmp_path), "--json"], capsys)
    # No usable metadata: the commit never came; the source (none here) runs on.
    assert code in (cli.EXIT_OK, cli.EXIT_IN_DOUBT), err
    assert not err or err.count("\n") == 1


# --- migsgx checkpoint: never over an existing (maybe forged) checkpoint -------------------------
def test_checkpoint_into_a_directory_holding_a_forged_checkpoint_touches_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        before = _checkpoint(tmp_path, enclaves="forged")
        code, err = _run(["checkpoint", str(proc.pid), "--dir", str(tmp_path)], capsys)
        assert code == cli.EXIT_CONFIG
        _one_error_line(err, "config")
        assert _snapshot(tmp_path) == before
        assert proc.poll() is None  # the source was never touched: it runs on
    finally:
        proc.kill()
        proc.wait()
