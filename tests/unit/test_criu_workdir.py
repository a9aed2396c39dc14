"""One dump at a time in a task's working directory (:mod:`migsgx.criu.workdir`)."""

from __future__ import annotations

import errno
import fcntl
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from migsgx.criu.workdir import PROC_DIR, workdir_held


@pytest.fixture
def task(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """A process whose working directory is ``tmp_path/work``."""

    work = tmp_path / "work"
    work.mkdir()
    proc = subprocess.Popen(["sleep", "60"], cwd=work)
    yield proc.pid, work
    proc.kill()
    proc.wait()


def _try_lock(path: Path) -> bool:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as exc:
        assert exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN)
        return False
    finally:
        os.close(fd)


def test_the_working_directory_is_held_until_released(task: tuple[int, Path]) -> None:
    pid, work = task
    with workdir_held(pid) as release:
        assert not _try_lock(work)  # another dump there waits
        release()
        assert _try_lock(work)
        release()  # (idempotent)
    assert _try_lock(work)


def test_a_left_empty_proc_directory_is_removed_a_full_one_kept(task: tuple[int, Path]) -> None:
    pid, work = task
    (work / PROC_DIR).mkdir()
    with workdir_held(pid):
        assert not (work / PROC_DIR).exists()
    (work / PROC_DIR).mkdir()
    (work / PROC_DIR / "mine").write_text("not CRIU's")
    with workdir_held(pid):
        assert (work / PROC_DIR / "mine").read_text() == "not CRIU's"


def test_a_task_that_is_gone_is_not_held() -> None:
    with workdir_held(2**22 + 7) as release:
        release()
