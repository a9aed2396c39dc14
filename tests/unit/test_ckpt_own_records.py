"""A checkpoint directory's restore record (``restore-held.json``) and journal are
written and read as the tool's own only: neither is covered by the checkpoint's
digests, and they name a tree to kill or to continue, descriptors to take and an
application to hand them to."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from migsgx.agent import ckpt_journal
from migsgx.agent.ckpt_journal import HELD, JOURNAL, start_time
from migsgx.agent.ckpt_recover import resolve_checkpoint
from migsgx.agent.ckpt_restore import _write_held
from migsgx.system.process import process_state, wait_stopped


@pytest.fixture
def stopped() -> Iterator[subprocess.Popen[bytes]]:
    """A stopped process: what a restore's held tree, or anyone's stopped task, looks like."""

    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    os.kill(proc.pid, signal.SIGSTOP)
    wait_stopped(proc.pid)  # (stopped for sure: else "not killed" would prove nothing)
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


def _record(proc: subprocess.Popen[bytes]) -> bytes:
    return json.dumps({"pid": proc.pid, "start": start_time(proc.pid)}).encode()


def test_the_record_is_never_written_through_a_planted_link(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious")
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    (checkpoint / HELD).symlink_to(victim)
    _write_held(checkpoint, os.getpid())
    assert victim.read_text() == "precious"
    assert not (checkpoint / HELD).is_symlink()
    assert json.loads((checkpoint / HELD).read_text())["pid"] == os.getpid()
    assert (checkpoint / HELD).stat().st_mode & 0o777 == 0o600


def test_the_tools_own_record_ends_its_held_tree(
    tmp_path: Path, stopped: subprocess.Popen[bytes]
) -> None:
    _write_held(tmp_path, stopped.pid)
    ckpt_journal.remove_held_leftover(tmp_path)
    # Killed: kill_tree reaps its own children, so the status went with its reap (0),
    # unless this wait came first; `sleep 60` ends no other way this soon.
    assert stopped.wait(timeout=10) in (-signal.SIGKILL, 0)
    assert not (tmp_path / HELD).exists()


def test_a_record_others_may_write_kills_nothing(
    tmp_path: Path, stopped: subprocess.Popen[bytes]
) -> None:
    (tmp_path / HELD).write_bytes(_record(stopped))
    (tmp_path / HELD).chmod(0o666)
    ckpt_journal.remove_held_leftover(tmp_path)
    assert stopped.poll() is None


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user needs root")
def test_a_record_of_another_user_kills_nothing(
    tmp_path: Path, stopped: subprocess.Popen[bytes]
) -> None:
    (tmp_path / HELD).write_bytes(_record(stopped))
    os.chown(tmp_path / HELD, 65534, 65534)
    ckpt_journal.remove_held_leftover(tmp_path)
    assert stopped.poll() is None


def test_a_link_to_a_record_kills_nothing(tmp_path: Path, stopped: subprocess.Popen[bytes]) -> None:
    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_bytes(_record(stopped))
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    (checkpoint / HELD).symlink_to(elsewhere)
    ckpt_journal.remove_held_leftover(checkpoint)
    assert stopped.poll() is None


@pytest.mark.timeout(60)  # (a hang guard: the read of a FIFO without a writer never ended)
def test_a_fifo_under_the_records_name_is_not_waited_on(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / HELD, 0o600)
    ckpt_journal.remove_held_leftover(tmp_path)


def _planted_journal(directory: Path, proc: subprocess.Popen[bytes]) -> Path:
    """A dead checkpoint tool's journal as the tool writes it: the fenced source's pid."""

    path = directory / JOURNAL
    fields = {"phase": "writing", "pid": proc.pid, "start": start_time(proc.pid)}
    path.write_text(json.dumps(fields))
    path.chmod(0o644)
    return path


def test_the_tools_own_journal_continues_its_fenced_source(
    tmp_path: Path, stopped: subprocess.Popen[bytes]
) -> None:
    _planted_journal(tmp_path, stopped)
    result = resolve_checkpoint(tmp_path, None)
    assert (result.decision, result.outcome) == ("abort", "stayed")
    assert process_state(stopped.pid) not in ("T", "t")


@pytest.mark.parametrize("how", ["others-write", "link"] + (["other-user"] * (os.geteuid() == 0)))
def test_a_journal_planted_in_the_checkpoint_directory_continues_nothing(
    tmp_path: Path, stopped: subprocess.Popen[bytes], how: str
) -> None:
    """(A stopped process of anyone's, say a migration's fenced source, continued
    beside its destination's copy: two copies running.)"""

    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    path = _planted_journal(checkpoint, stopped)
    if how == "others-write":
        path.chmod(0o666)
    elif how == "other-user":
        os.chown(path, 65534, 65534)
    else:
        path.rename(tmp_path / "elsewhere.json")
        path.symlink_to(tmp_path / "elsewhere.json")
    resolve_checkpoint(checkpoint, None)
    assert process_state(stopped.pid) in ("T", "t")


@pytest.mark.timeout(60)  # (a hang guard: the read of a FIFO without a writer never ended)
def test_a_fifo_as_the_metadata_is_no_checkpoint_and_never_waited_on(tmp_path: Path) -> None:
    from migsgx.agent.ckpt_journal import CHECKPOINT_META
    from migsgx.agent.ckpt_restore import load_metadata
    from migsgx.errors import ConfigError

    os.mkfifo(tmp_path / CHECKPOINT_META, 0o600)
    with pytest.raises(ConfigError, match="holds no migsgx checkpoint"):
        load_metadata(tmp_path)
    assert resolve_checkpoint(tmp_path, None).outcome == "done"  # ("no checkpoint here")
