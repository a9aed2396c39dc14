"""``$MIGSGX_KEEP_LOGS``: a failed step's log is copied whole, or nothing happens."""

from __future__ import annotations

from pathlib import Path

import pytest

from migsgx.criu import KEEP_LOGS_ENV, keep_log


def test_a_log_is_copied_whole_named_by_what_failed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = tmp_path / "work" / "restore.log"
    log.parent.mkdir()
    log.write_bytes(b"(00.1) Error (criu/mount-v2.c:396): x\n" * 1000)
    monkeypatch.setenv(KEEP_LOGS_ENV, str(tmp_path / "kept" / "pending"))
    kept = keep_log(log, "runc restore kvstore/1")
    assert kept is not None and kept.parent == tmp_path / "kept" / "pending"
    assert kept.name.endswith("-runc-restore-kvstore-1-restore.log")
    assert kept.read_bytes() == log.read_bytes()


def test_nothing_is_kept_unless_asked_and_a_missing_log_raises_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = tmp_path / "dump.log"
    log.write_text("x")
    monkeypatch.delenv(KEEP_LOGS_ENV, raising=False)
    assert keep_log(log, "criu dump") is None
    monkeypatch.setenv(KEEP_LOGS_ENV, str(tmp_path / "kept"))
    assert keep_log(tmp_path / "missing.log", "criu dump") is None
    assert list((tmp_path / "kept").iterdir()) == []
