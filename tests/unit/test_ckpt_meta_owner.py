"""A checkpoint's ``migsgx.json`` orders a kill only as the reader's own file.

The metadata names the source tree a dead checkpoint tool left fenced, which
``migsgx recover --checkpoint`` and ``migsgx restore`` kill before anything
else; a checkpoint directory may be writable by others.  A metadata file
another user wrote (or one others may write, or a link) naming someone's
stopped process must kill nothing: one ``[record-damaged]`` line, exit 3.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from migsgx import cli
from migsgx.agent.ckpt_journal import CHECKPOINT_META, start_time
from migsgx.system.process import process_state, wait_stopped

HOWS = ["others-write", "link"] + (["other-user"] * (os.geteuid() == 0))


@pytest.fixture
def victim() -> Iterator[subprocess.Popen[bytes]]:
    """Someone's stopped ``sleep`` (a fenced source of another migration, say)."""

    proc = subprocess.Popen(["sleep", "60"])
    os.kill(proc.pid, signal.SIGSTOP)
    wait_stopped(proc.pid)  # (stopped for sure: else "not killed" would prove nothing)
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


def _plant(directory: Path, proc: subprocess.Popen[bytes], how: str, enclaves: int) -> None:
    record = {"format": 1, "enclaves": enclaves, "pid": proc.pid,
              "start": start_time(proc.pid), "files": {}}  # fmt: skip
    path = directory / CHECKPOINT_META
    if how == "link":
        elsewhere = directory.parent / "elsewhere.json"
        elsewhere.write_text(json.dumps(record))
        path.symlink_to(elsewhere)
        return
    path.write_text(json.dumps(record))
    if how == "others-write":
        path.chmod(0o666)
    elif how == "other-user":
        os.chown(path, 65534, 65534)


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exited:
        cli.main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err and "[internal]" not in err, err
    assert isinstance(exited.value.code, int)
    return exited.value.code, err


def _alive_and_stopped(proc: subprocess.Popen[bytes]) -> bool:
    return proc.poll() is None and process_state(proc.pid) in ("T", "t")


@pytest.mark.parametrize("how", HOWS)
def test_recover_over_foreign_metadata_kills_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], victim: subprocess.Popen[bytes], how: str
) -> None:
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    _plant(checkpoint, victim, how, enclaves=0)
    code, err = _run(["recover", "--checkpoint", str(checkpoint), "--json"], capsys)
    assert _alive_and_stopped(victim)
    assert code == cli.EXIT_CONFIG, err
    assert err.count("\n") == 1 and "[record-damaged]" in err and CHECKPOINT_META in err, err


@pytest.mark.parametrize("how", HOWS)
def test_restore_over_foreign_metadata_kills_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], victim: subprocess.Popen[bytes], how: str
) -> None:
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    _plant(checkpoint, victim, how, enclaves=1)
    argv = ["restore", "--dir", str(checkpoint), "--platform-socket", str(tmp_path / "none")]
    code, err = _run(argv, capsys)
    assert _alive_and_stopped(victim)
    assert code == cli.EXIT_CONFIG, err
    assert err.count("\n") == 1 and "[record-damaged]" in err, err


def test_the_users_own_metadata_still_ends_its_fenced_source(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], victim: subprocess.Popen[bytes]
) -> None:
    """(The rule refuses only others' files: a dead tool's own checkpoint is restorable.)"""

    _plant(tmp_path, victim, "own", enclaves=0)
    code, err = _run(["recover", "--checkpoint", str(tmp_path), "--json"], capsys)
    assert code == cli.EXIT_OK, err
    assert victim.wait(timeout=10) in (-signal.SIGKILL, 0)
