"""Where the destination agent receives CRIU's images: RAM with room, else the work directory."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from migsgx.agent.dumpdirs import dump_dir_owner, sweep_dump_dirs
from migsgx.agent.imageroom import (
    MARGIN,
    fs_type,
    images_room,
    memory_available,
    place_images,
    resident_bytes,
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
