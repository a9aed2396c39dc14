"""Cutting an engine's dump short by filling its image directory (``containers/imagefs.py``).

A real tmpfs (root: the suite runs as root, as CI does), a writer standing in
for CRIU's page writes, and the cancel that fills the directory up.
"""

from __future__ import annotations

import errno
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from migsgx.containers.base import DumpPlan
from migsgx.containers.imagefs import (
    ImageFs,
    cuttable_engine_dir,
    cuttable_images,
    leftover_mounts,
    sweep_leftovers,
)
from migsgx.criu.cancel import DumpCancel

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")


@pytest.fixture
def images(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "images"
    path.mkdir()
    yield path
    if os.path.ismount(path):  # (only if a test failed while mounted)
        left = ImageFs(path)
        left.mounted = True
        left.unmount()


def _plan(images: Path, cancel: DumpCancel, **kw: object) -> DumpPlan:
    return DumpPlan(images=images, page_server=None, page_tls=None, tcp_close=False,
                    cancel=cancel, **kw)  # type: ignore[arg-type]  # fmt: skip


def test_a_cancel_while_the_engine_dumps_makes_the_next_write_fail(images: Path) -> None:
    cancel = DumpCancel()
    with cuttable_images(_plan(images, cancel, scratch_images=True)) as fs:
        assert fs.mounted and os.path.ismount(images)
        pages = images / "pages-1.img"
        with pages.open("wb") as out, fs.engine_dumps():
            out.write(b"\1" * (1 << 20))
            out.flush()
            cancel.cancel("an enclave stream failed")
            assert cancel.cut == 1 and cancel.stopped_early
            with pytest.raises(OSError) as failed:
                for _ in range(64):  # (one page of room may be left)
                    out.write(b"\2" * (64 << 10))
                    out.flush()
            assert failed.value.errno == errno.ENOSPC
        assert pages.stat().st_size >= 1 << 20  # what was written stays readable
    assert not os.path.ismount(images)  # gone with the dump


def test_a_cancel_outside_the_engines_call_cuts_nothing(images: Path) -> None:
    cancel = DumpCancel()
    with cuttable_images(_plan(images, cancel, scratch_images=True)) as fs:
        cancel.cancel("too late: the engine's call ended")
        assert cancel.cut == 0 and not cancel.stopped_early
        (images / "more.img").write_bytes(b"\3" * (1 << 20))  # room as before
        assert fs.fill() == 0


def test_nothing_is_mounted_over_a_directory_kept_for_the_user(images: Path) -> None:
    cancel = DumpCancel()
    with cuttable_images(_plan(images, cancel)) as fs:  # (not scratch: --work-dir)
        assert not fs.mounted and not os.path.ismount(images)
    (images / "kept").write_bytes(b"x")
    with cuttable_images(_plan(images, cancel, scratch_images=True)) as fs:
        assert not fs.mounted  # not empty: its files would be hidden
    assert (images / "kept").read_bytes() == b"x"


def test_a_stop_added_after_the_cancel_runs_at_once(images: Path) -> None:
    cancel = DumpCancel()
    cancel.cancel("early")
    fs = ImageFs(images)
    fs.mount()
    try:
        with fs.engine_dumps():
            cancel.add_stop(fs.fill)
        assert cancel.cut == 1
    finally:
        fs.unmount()


def test_the_mounts_of_tools_are_found_in_mountinfo() -> None:
    text = (
        "36 25 0:32 / /dev/shm rw,nosuid,nodev shared:7 - tmpfs tmpfs rw\n"
        "90 36 0:55 / /dev/shm/migsgx-dump-a\\040b rw,nosuid - tmpfs migsgx-images-4242 rw\n"
        "91 36 0:56 / /x rw - tmpfs migsgx-images-notapid rw\n"
        "92 36 0:57 / /y rw - ext4 migsgx-images-7 rw\n"
    )
    assert leftover_mounts(text) == [(Path("/dev/shm/migsgx-dump-a b"), 4242)]


def test_a_tool_killed_mid_dump_leaves_a_mount_that_the_sweep_removes(images: Path) -> None:
    pid = os.fork()
    if pid == 0:  # the tool: mounts, CRIU writes, and it is killed mid-dump
        try:
            ImageFs(images).mount()
            (images / "pages-1.img").write_bytes(b"\1" * (1 << 20))
        finally:
            os.kill(os.getpid(), signal.SIGKILL)
    assert os.waitpid(pid, 0)[1] & 0x7F == signal.SIGKILL
    assert os.path.ismount(images)  # left behind, holding the pages
    mine = ImageFs(images.with_name("mine"))  # a live tool's mount stays
    mine.path.mkdir()
    mine.mount()
    try:
        assert images in sweep_leftovers()
        assert not images.exists()  # unmounted, and its empty directory gone
        assert os.path.ismount(mine.path)
        assert mine.path not in sweep_leftovers()
    finally:
        mine.unmount()


def test_a_tool_the_caller_knows_is_past_its_dump_is_swept_though_still_there(
    images: Path,
) -> None:
    """The guardian reads the end of its tool's pipe while the tool still exits."""

    ready, hold = os.pipe()
    release, wait = os.pipe()
    pid = os.fork()
    if pid == 0:  # the tool: mounts, then is still there
        try:
            ImageFs(images).mount()
            os.write(hold, b"x")
            os.read(release, 1)
        finally:
            os._exit(0)
    try:
        assert os.read(ready, 1) == b"x"
        assert images not in sweep_leftovers()  # it may be dumping
        assert os.path.ismount(images)
        assert images in sweep_leftovers(gone=(pid,))
        assert not os.path.ismount(images)
    finally:
        os.write(wait, b"x")
        os.waitpid(pid, 0)
        for fd in (ready, hold, release, wait):
            os.close(fd)


def test_an_engines_own_checkpoint_directory_is_cut_and_gone_after(tmp_path: Path) -> None:
    """podman's ``userdata/checkpoint``: made for the command, a tmpfs while it runs (the
    cancel fills it), and nothing of it left after, whether the dump failed or not."""

    static = tmp_path / "userdata"
    static.mkdir()
    checkpoint = static / "checkpoint"
    cancel = DumpCancel()
    with cuttable_engine_dir(checkpoint, _plan(tmp_path / "unused", cancel)) as fs:
        assert fs.mounted and os.path.ismount(checkpoint)
        with (checkpoint / "pages-1.img").open("wb") as out, fs.engine_dumps():
            out.write(b"\1" * (1 << 20))
            out.flush()
            cancel.cancel("an enclave stream failed")
            assert cancel.cut == 1
            with pytest.raises(OSError) as failed:
                for _ in range(64):
                    out.write(b"\2" * (64 << 10))
                    out.flush()
            assert failed.value.errno == errno.ENOSPC
    assert not checkpoint.exists()  # made here, removed again: no half checkpoint stays


def test_an_engines_directory_holding_files_is_left_as_it_is(tmp_path: Path) -> None:
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    (checkpoint / "pages-1.img").write_bytes(b"someone else's")
    with cuttable_engine_dir(checkpoint, _plan(tmp_path, DumpCancel())) as fs:
        assert not fs.mounted
    assert (checkpoint / "pages-1.img").read_bytes() == b"someone else's"
    empty = tmp_path / "empty"
    empty.mkdir()
    with cuttable_engine_dir(empty, _plan(tmp_path, DumpCancel())) as fs:
        assert fs.mounted
    assert empty.is_dir() and not os.path.ismount(empty)  # (it was there before: it stays)
    with cuttable_engine_dir(tmp_path / "none", _plan(tmp_path, None)) as fs:  # type: ignore[arg-type]
        assert not fs.mounted  # no cancel: nothing to cut for
    assert not (tmp_path / "none").exists()


def test_nothing_is_mounted_through_a_symbolic_link(tmp_path: Path) -> None:
    """A link put where the directory was looked at (by whoever may write its parent)
    must not carry the tmpfs, the container's memory, to the place it names."""

    target = tmp_path / "theirs"
    target.mkdir()
    link = tmp_path / "checkpoint"
    link.symlink_to(target)
    fs = ImageFs(link)
    try:
        with pytest.raises(OSError, match="mount tmpfs on"):
            fs.mount()
        assert not fs.mounted and not os.path.ismount(target)
    finally:
        if os.path.ismount(target):  # (only if the test failed)
            left = ImageFs(target)
            left.mounted = True
            left.unmount()
