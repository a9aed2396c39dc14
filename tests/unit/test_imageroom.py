"""Where the destination agent receives CRIU's images: RAM with room, else the work directory."""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
from pathlib import Path

import numpy as np
import pytest

from migsgx.agent import imageroom
from migsgx.agent.dumpdirs import dump_dir_owner, sweep_dump_dirs
from migsgx.agent.imageroom import (
    IMAGE_COPIES,
    MARGIN,
    SPEND_STEP,
    fs_type,
    images_room,
    memory_available,
    place_images,
    resident_bytes,
    restore_spends,
    room_needed,
)
from migsgx.lab.bench.memwatch import MemoryWatch, meminfo_mib

SHM = Path("/dev/shm")
needs_shm = pytest.mark.skipif(fs_type(SHM) != "tmpfs", reason="no tmpfs at /dev/shm")


def test_the_file_system_of_a_path_is_its_longest_mount_point() -> None:
    assert fs_type(Path("/proc/self")) == "proc"
    assert fs_type(Path("/proc")) == "proc"
    assert fs_type(Path("/")) not in ("", "proc")


@needs_shm
def test_room_in_ram_is_bounded_by_free_space_and_available_memory() -> None:
    room = images_room(SHM)
    st = os.statvfs(SHM)
    assert 0 < room <= st.f_blocks * st.f_frsize
    assert room <= memory_available() + (64 << 20)  # (the two read a moment apart)
    assert images_room(Path("/proc")) == 0  # not a tmpfs: no RAM to prefer


@needs_shm
def test_images_go_to_ram_named_for_the_sweep(tmp_path: Path) -> None:
    session = tmp_path / "session"
    session.mkdir()
    placed = place_images(session, 64 << 20, in_ram=True, tag="t")
    try:
        assert placed.parent == SHM and fs_type(placed) == "tmpfs"
        owner = dump_dir_owner(placed.name)
        assert owner is not None and owner[0] == os.getpid()
        assert placed not in sweep_dump_dirs()  # its agent (this process) runs
    finally:
        os.rmdir(placed)


def test_without_room_or_when_told_the_images_stay_in_the_work_directory(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    session = tmp_path / "session"
    session.mkdir()
    before = set(SHM.iterdir()) if SHM.is_dir() else set()
    assert place_images(session, 1 << 60, in_ram=True, tag="t") == session
    assert "the images go to the work directory" in caplog.text
    assert "(disk)" in caplog.text and f"+{MARGIN >> 20} MiB margin" in caplog.text
    assert place_images(session, 0, in_ram=False, tag="t") == session
    assert (set(SHM.iterdir()) if SHM.is_dir() else set()) == before  # nothing made


def test_the_room_counts_the_images_the_restored_tree_and_the_destination_enclaves() -> None:
    assert room_needed(0) == MARGIN
    assert room_needed(1 << 30) == (2 << 30) + MARGIN
    assert room_needed(1 << 30, 4 << 30) == (6 << 30) + MARGIN
    assert room_needed(-5, -7) == MARGIN  # (untrusted numbers: a negative one counts 0)


def test_a_spending_restore_holds_the_tree_twice_only_for_one_step() -> None:
    # The images whole, and what the restorer has read and not yet punched out.
    assert room_needed(1 << 30, spends=True) == (1 << 30) + SPEND_STEP + MARGIN
    assert room_needed(64 << 20, spends=True) == (128 << 20) + MARGIN  # (less than a step)
    assert room_needed(1 << 30, 4 << 30, spends=True) == (5 << 30) + SPEND_STEP + MARGIN
    # A driver that copies the images before its engine reads them: every copy, and the tree.
    assert room_needed(1 << 30, copies=3) == (4 << 30) + MARGIN
    assert room_needed(1 << 30, copies=IMAGE_COPIES["runc"]) == (2 << 30) + MARGIN


def test_a_one_task_tree_restored_by_criu_with_auto_dedup_spends_and_engines_spend_copies() -> None:
    assert restore_spends("pid", 1, spend_images=True, post_copy=False)
    assert not restore_spends("pid", 1, spend_images=False, post_copy=False)  # --no-spend-images
    assert not restore_spends("pid", 1, spend_images=True, post_copy=True)  # lazy pages
    assert not restore_spends("pid", 2, spend_images=True, post_copy=False)  # shared mappings
    assert not restore_spends("runc", 1, spend_images=True, post_copy=False)  # read in place
    for engine in ("podman", "containerd"):  # (their copies: tests/unit/test_podman_archive_drop)
        assert restore_spends(engine, 3, spend_images=True, post_copy=False)
        assert not restore_spends(engine, 3, spend_images=False, post_copy=False)


@pytest.mark.parametrize(
    ("driver", "spends", "in_ram"),
    [
        ("pid", True, True),  # the images and one step: room enough
        ("pid", False, False),  # the images and the whole tree: not
        ("runc", False, False),
        ("podman", False, False),  # three copies of its archive and the tree
        ("", False, False),  # a driver not known: the most copies
    ],
)
def test_a_restore_that_cannot_spend_never_starts_short_of_room(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    driver: str,
    spends: bool,
    in_ram: bool,
) -> None:
    caplog.set_level(logging.INFO, logger="migsgx.agent")
    session = tmp_path / "session"
    session.mkdir()
    base = tmp_path / "ram"
    base.mkdir()
    memory = 1 << 30
    # Room for the images and a step being spent, not for the images and the tree.
    room = room_needed(memory, spends=True)
    assert room < room_needed(memory)
    monkeypatch.setattr(imageroom, "scratch_base", lambda: base)
    monkeypatch.setattr(imageroom, "images_room", lambda _base: room)
    made = base / "made"
    monkeypatch.setattr(imageroom, "make_dump_dir", lambda: made.mkdir() or made)
    placed = place_images(session, memory, in_ram=True, tag="t", driver=driver, spends=spends)
    assert placed == (made if in_ram else session)
    if not in_ram:
        assert "the images go to the work directory" in caplog.text
        copies = IMAGE_COPIES.get(driver, max(IMAGE_COPIES.values()))
        need = room_needed(memory, copies=copies)
        assert f"the restore needs {need >> 20} MiB" in caplog.text
    else:
        assert "the images spent" in caplog.text


@needs_shm
def test_the_destination_enclaves_memory_keeps_the_images_out_of_ram(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    session = tmp_path / "session"
    session.mkdir()
    room = images_room(SHM)
    if room <= 2 * MARGIN:
        pytest.skip("too little room in /dev/shm for the images at all")
    # Room for the images (none), not for enclaves as large as the whole room: the disk.
    assert place_images(session, 0, enclave_bytes=room, in_ram=True, tag="t") == session
    assert f"+ {room >> 20} MiB of enclaves" in caplog.text
    placed = place_images(session, 0, enclave_bytes=0, in_ram=True, tag="t")
    try:
        assert placed.parent == SHM  # the same images without those enclaves: RAM
    finally:
        os.rmdir(placed)


def test_a_tool_that_announced_no_memory_gets_the_work_directory(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    session = tmp_path / "session"
    session.mkdir()
    assert place_images(session, None, in_ram=True, tag="t") == session
    assert "control protocol version 1" in caplog.text


def test_the_source_announces_the_resident_memory_of_its_tree() -> None:
    block = np.ones(32 << 20, dtype=np.uint8)  # 32 MiB resident, anonymous
    mine = resident_bytes([os.getpid()])
    assert mine >= 32 << 20
    assert resident_bytes([os.getpid(), 2**22 + 12345]) == mine  # a gone pid counts 0
    assert resident_bytes([]) == 0
    del block


@pytest.mark.skipif(os.geteuid() != 0, reason="locks memory beyond an unprivileged limit")
def test_the_source_announces_its_locked_memory_once_more() -> None:
    # CRIU maps a locked mapping populated before it reads (and spends) its pages.
    size = 16 << 20
    block = mmap.mmap(-1, size)
    view = np.frombuffer(block, dtype=np.uint8)
    view[:] = 1  # resident
    before = resident_bytes([os.getpid()])
    libc = ctypes.CDLL(None, use_errno=True)
    first = ctypes.c_char.from_buffer(block)
    address = ctypes.addressof(first)
    assert libc.mlock(ctypes.c_void_p(address), ctypes.c_size_t(size)) == 0, ctypes.get_errno()
    try:
        assert resident_bytes([os.getpid()]) - before >= size - (1 << 20)
    finally:
        libc.munlock(ctypes.c_void_p(address), ctypes.c_size_t(size))
        del view, first
        block.close()


def test_the_memory_watch_gives_the_values_at_each_phase(tmp_path: Path) -> None:
    fields = meminfo_mib()
    assert {"Dirty", "Writeback", "Shmem", "MemFree"} <= set(fields)
    with MemoryWatch() as watch:
        pass
    assert len(watch.samples) >= 2
    t0 = watch.samples[0][0]
    figures = watch.figures({"a": [0.0, 0.0], "b": [0.0, 1e9]}, origin=t0)
    assert figures["phases_mib"]["a"]["start"] == watch.samples[0][1]
    assert figures["phases_mib"]["b"]["end"] == watch.samples[-1][1]
    for key in ("Dirty", "Writeback", "Shmem"):
        assert figures["peak_mib"][key] >= figures["before_mib"][key]
    assert "pgfault" in figures["kernel_events"]
    never = MemoryWatch()
    never.close()  # never started: nothing to stop
    assert never.figures() == {}
