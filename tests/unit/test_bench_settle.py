"""Each benchmark arm starts without the dirty page cache of what ran before it
(:mod:`migsgx.lab.bench.settle`), and says what it found and did."""

from __future__ import annotations

import tempfile
import threading
import time
from pathlib import Path

import pytest

from migsgx.lab.bench import settle as settle_mod
from migsgx.lab.bench.settle import settle, syncfs


def _meminfo(path: Path, dirty_kib: int, writeback_kib: int = 0) -> None:
    path.write_text(
        f"MemFree:  8000000 kB\nDirty:  {dirty_kib} kB\nWriteback:  {writeback_kib} kB\n"
        "Shmem:  1000 kB\n"
    )


def test_an_arm_that_finds_little_dirty_starts_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    meminfo = tmp_path / "meminfo"
    _meminfo(meminfo, 10 << 10)  # 10 MiB
    synced: list[Path] = []
    monkeypatch.setattr(settle_mod, "syncfs", synced.append)
    out = settle(tmp_path, meminfo=meminfo)
    assert synced == []
    assert out["settled"] and not out["synced"]
    assert out["dirty_before_mib"] == 10.0


def test_a_backlog_is_written_back_and_waited_for_outside_the_arm(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    meminfo = tmp_path / "meminfo"
    _meminfo(meminfo, 329 << 10, 5 << 10)  # what the first arm of a round met
    synced: list[Path] = []

    def written_back(path: Path) -> None:
        synced.append(path)
        # The kernel's writeback ends a moment later.
        threading.Timer(0.2, _meminfo, (meminfo, 1 << 10)).start()

    monkeypatch.setattr(settle_mod, "syncfs", written_back)
    out = settle(tmp_path, meminfo=meminfo, timeout=10)
    assert synced == [tmp_path]  # the images' file system, not every disk
    assert out["synced"] and out["settled"]
    assert (out["dirty_before_mib"], out["writeback_before_mib"]) == (329.0, 5.0)
    assert out["dirty_after_mib"] == 1.0
    assert out["seconds"] >= 0.15


def test_a_backlog_that_does_not_fall_is_said_not_waited_for_forever(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    meminfo = tmp_path / "meminfo"
    _meminfo(meminfo, 900 << 10)  # (others keep writing)
    monkeypatch.setattr(settle_mod, "syncfs", lambda _path: None)
    start = time.monotonic()
    out = settle(tmp_path, meminfo=meminfo, timeout=0.3)
    assert time.monotonic() - start < 5
    assert out["synced"] and not out["settled"]


def test_a_failed_syncfs_is_reported_and_the_wait_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    meminfo = tmp_path / "meminfo"
    _meminfo(meminfo, 900 << 10)

    def refused(path: Path) -> None:
        raise OSError(5, "Input/output error", str(path))

    monkeypatch.setattr(settle_mod, "syncfs", refused)
    out = settle(tmp_path, meminfo=meminfo, timeout=0.1)
    assert not out["synced"] and "Input/output error" in out["error"]


def test_syncfs_takes_a_directory_of_a_real_file_system() -> None:
    # (a tmpfs: nothing to write back, so the cell never waits for others' disks)
    shm = Path("/dev/shm")
    if not shm.is_dir():
        pytest.skip("no /dev/shm")
    with tempfile.TemporaryDirectory(dir=shm) as here:
        (Path(here) / "f").write_bytes(b"x" * 4096)
        syncfs(Path(here))
        with pytest.raises(OSError):
            syncfs(Path(here) / "missing")


def test_the_enclave_stream_ends_at_the_last_source_drivers_load_wait() -> None:
    """The ``enclave_dump`` phase of a slow run held the restore: the stream's own span
    is the freeze to the destination's LOADED (proc1g of the first quiet round: 1.7 s
    of stream in a run whose ``enclave_dump`` read 5.6 s)."""

    from migsgx.lab.bench.migrate_figures import _stream

    spans = {
        "tool": {"freeze": [0.48, 0.48], "restore": [3.2, 6.08], "join_enclaves": [6.08, 6.08]},
        "enclave0.source_driver": {"dump": [0.49, 2.19], "load_wait": [2.19, 2.2]},
        "enclave1.source_driver": {"dump": [0.49, 1.9], "load_wait": [1.9, 1.95]},
        "enclave0.destination_driver": {"load": [0.48, 2.9]},  # (not a source's end)
    }
    assert abs(_stream({"origin": 0.0, "spans": spans}) - 1.72) < 1e-9
    assert _stream(None) == 0.0
    assert _stream({"origin": 0.0, "spans": {"tool": {"freeze": [1.0, 1.0]}}}) == 0.0
