"""The sweep of dead tools' images directories: only those, never anything else."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from migsgx.agent import dumpdirs
from migsgx.agent.ckpt_journal import start_time
from migsgx.agent.dumpdirs import (
    KEPT_PREFIX,
    dump_dir_owner,
    dump_dir_path,
    make_dump_dir,
    remove_dump_dir,
    sweep_dump_dirs,
)


@pytest.fixture
def base(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    shm = tmp_path / "shm"
    shm.mkdir()
    monkeypatch.setattr(dumpdirs, "scratch_base", lambda: shm)
    return shm


@pytest.fixture
def live() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def _images(directory: Path) -> Path:
    directory.mkdir()
    (directory / "pages-1.img").write_bytes(b"\0" * 4096)
    (directory / "sub").mkdir()
    (directory / "sub" / "x").write_text("x")
    return directory


def test_the_name_carries_the_tools_pid_and_start_time(base: Path) -> None:
    made = make_dump_dir()
    assert made.parent == base and made.is_dir()
    assert dump_dir_owner(made.name) == (os.getpid(), start_time(os.getpid()))
    named = dump_dir_path()  # (the name the tool gives its guardian before it makes it)
    assert not named.exists() and dump_dir_owner(named.name) == dump_dir_owner(made.name)
    kept = make_dump_dir(keep=True)
    assert kept.name.startswith(KEPT_PREFIX) and dump_dir_owner(kept.name) is None


def test_only_dead_tools_directories_go(base: Path, live: subprocess.Popen[bytes]) -> None:
    dead = _images(base / f"migsgx-dump-{_dead_pid()}-12345-abcdefgh")
    mine = _images(base / f"migsgx-dump-{os.getpid()}-{start_time(os.getpid())}-abcdefgh")
    running = _images(base / f"migsgx-dump-{live.pid}-{start_time(live.pid)}-abcdefgh")
    # The same pid, another start time: the tool died and the pid went to another process.
    reused = _images(base / f"migsgx-dump-{live.pid}-{int(start_time(live.pid)) - 1}-abcdefgh")
    assert sorted(sweep_dump_dirs()) == sorted([dead, reused])
    assert not dead.exists() and not reused.exists()
    assert mine.is_dir() and running.is_dir() and (running / "pages-1.img").is_file()
    assert sweep_dump_dirs() == []  # (idempotent)


@pytest.mark.parametrize(
    "name",
    [
        "migsgx-dump-abcdefgh",  # made before names carried the pid: nobody can tell its tool
        "migsgx-dump-1234-",
        "migsgx-dump-1234-5678",
        "migsgx-dump-0-5678-abcdefgh",
        "migsgx-dump-12345678901-5678-abcdefgh",
        "migsgx-dump-1234-56x78-abcdefgh",
        "migsgx-dump-1234-5678-ab.c",
        "migsgx-dump-1234-5678-abc ",
        "migsgx-dump-1234-5678-ABC",
        "migsgx-dump-+1234-5678-abc",
        "migsgx-kept-xyz",
        "migsgx-dump-١٢٣-5678-abc",  # (non-ASCII digits)
    ],
)
def test_odd_names_are_left_alone(base: Path, name: str) -> None:
    odd = _images(base / name)
    assert sweep_dump_dirs() == []
    assert odd.is_dir()


def test_a_planted_link_is_never_followed(base: Path, tmp_path: Path) -> None:
    elsewhere = _images(tmp_path / "precious")
    link = base / f"migsgx-dump-{_dead_pid()}-12345-abcdefgh"
    link.symlink_to(elsewhere, target_is_directory=True)
    # A dead tool's directory holding a link out: the directory goes, never the target.
    holder = _images(base / f"migsgx-dump-{_dead_pid()}-12345-ijklmnop")
    (holder / "out").symlink_to(elsewhere, target_is_directory=True)
    # Something not a directory under our name.
    plain = base / f"migsgx-dump-{_dead_pid()}-12345-qrstuvwx"
    plain.write_text("not ours")
    assert sweep_dump_dirs() == [holder]
    assert link.is_symlink() and plain.is_file()
    assert (elsewhere / "pages-1.img").is_file() and (elsewhere / "sub" / "x").is_file()


def test_a_link_planted_in_dev_shm_is_not_followed(tmp_path: Path) -> None:
    if not Path("/dev/shm").is_dir():
        pytest.skip("no /dev/shm here")
    elsewhere = _images(tmp_path / "precious")
    link = Path("/dev/shm") / f"migsgx-dump-{_dead_pid()}-12345-t{os.getpid()}"
    link.symlink_to(elsewhere, target_is_directory=True)
    try:
        assert not remove_dump_dir(link)
        assert link not in sweep_dump_dirs()
        assert link.is_symlink() and (elsewhere / "pages-1.img").is_file()
    finally:
        link.unlink()


def test_a_guardian_removes_its_dying_tools_directory(
    base: Path, live: subprocess.Popen[bytes]
) -> None:
    directory = _images(base / f"migsgx-dump-{live.pid}-{start_time(live.pid)}-abcdefgh")
    assert not remove_dump_dir(directory)
    assert remove_dump_dir(directory, dying=live.pid)
    assert not directory.exists()


def test_a_journals_directory_elsewhere_goes_too(base: Path, tmp_path: Path) -> None:
    elsewhere = _images(tmp_path / f"migsgx-dump-{_dead_pid()}-12345-abcdefgh")
    assert sweep_dump_dirs([elsewhere]) == [elsewhere]
    assert not elsewhere.exists()
    # A journal naming a directory that is not one of ours (a --work-dir) changes nothing.
    work = _images(tmp_path / "work")
    assert sweep_dump_dirs([work]) == [] and work.is_dir()


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_a_directory_with_a_file_system_still_mounted_on_it_stays(base: Path) -> None:
    """The images tmpfs is unmounted first (its own sweep): until then nothing in it goes."""

    from migsgx.containers.imagefs import ImageFs

    directory = base / f"migsgx-dump-{_dead_pid()}-12345-abcdefgh"
    directory.mkdir()
    fs = ImageFs(directory)
    fs.mount()
    try:
        (directory / "pages-1.img").write_bytes(b"\1" * 4096)
        assert sweep_dump_dirs() == []
        assert (directory / "pages-1.img").is_file()
    finally:
        fs.unmount()
    assert sweep_dump_dirs() == [directory]
