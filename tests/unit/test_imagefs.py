"""Cutting an engine's dump short by filling its image directory (``containers/imagefs.py``).

A real tmpfs (root: the suite runs as root, as CI does), a writer standing in
for CRIU's page writes, and the cancel that fills the directory up.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from migsgx.containers.base import DumpPlan
from migsgx.containers.imagefs import ImageFs, cuttable_images
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
