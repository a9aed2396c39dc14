"""``migsgx inspect`` on checkpoints made here byte by byte: kinds, refusals, the scan."""

from __future__ import annotations

import gzip
import io
import json
import os
import struct
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from migsgx.containers.layout import CheckpointParts, write_checkpoint_image
from migsgx.errors import InspectError
from migsgx.inspection import inspect_path

# A real CRIU 4.2 pstree.img: one task, pid 1, no parent.
PSTREE = bytes.fromhex("194356543030275 00a000000080110001801200128 01".replace(" ", ""))


def core_image(comm: str) -> bytes:
    """core-PID.img: magics, then core_entry {mtype: 1, tc: {comm}} (CRIU's field numbers)."""

    name = comm.encode()
    tc = b"\x32" + bytes([len(name)]) + name
    entry = b"\x08\x01" + b"\x1a" + bytes([len(tc)]) + tc
    return struct.pack("<II", 0x54564319, 0x55053847) + struct.pack("<I", len(entry)) + entry


def criu_dir(root: Path, memory: bytes = b"\x00" * 8192) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "pstree.img").write_bytes(PSTREE)
    (root / "inventory.img").write_bytes(b"\x19\x43\x56\x54" + b"\x00" * 4)
    (root / "core-1.img").write_bytes(core_image("python3"))
    (root / "pages-1.img").write_bytes(memory)
    return root


def snapshot(root: Path) -> list[tuple[str, int, int]]:
    return [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))]


def test_a_criu_directory_is_described_and_left_alone(tmp_path: Path) -> None:
    ck = criu_dir(tmp_path / "ck")
    before = snapshot(ck)
    report = inspect_path(ck)
    assert snapshot(ck) == before
    assert report["kind"] == "migration-images" and report["engine"] == "process"
    assert report["processes"] == [{"pid": 1, "ppid": 0, "threads": 1, "command": "python3"}]
    assert report["criu"]["memory_bytes"] == 8192
    assert report["scan"]["clean"] is True


def test_canaries_are_found_in_plain_and_gzip_members(tmp_path: Path) -> None:
    ck = criu_dir(tmp_path / "ck", memory=b"x" * 100 + b"NEEDLE-ONE" + b"y" * 100)
    (ck / "tmpfs-dev-1.tar.gz.img").write_bytes(gzip.compress(b"z" * 5000 + b"NEEDLE-TWO"))
    report = inspect_path(ck, canaries=[b"NEEDLE-ONE", b"NEEDLE-TWO", b"ABSENT"])
    hits = report["scan"]["canaries"]
    assert hits["NEEDLE-ONE"] == [f"{ck}:pages-1.img"]
    assert hits["NEEDLE-TWO"] == [f"{ck}:tmpfs-dev-1.tar.gz.img (gunzipped)"]
    assert hits["ABSENT"] == []
    assert report["scan"]["clean"] is False


def test_a_needle_across_a_read_boundary_is_found(tmp_path: Path) -> None:
    memory = b"a" * ((8 << 20) - 3) + b"SPLIT-NEEDLE" + b"b" * 10
    ck = criu_dir(tmp_path / "ck", memory=memory)
    assert inspect_path(ck, canaries=[b"SPLIT-NEEDLE"])["scan"]["canaries"]["SPLIT-NEEDLE"]


def test_a_containerd_checkpoint_image_is_read(tmp_path: Path) -> None:
    ck = criu_dir(tmp_path / "ck")
    spec = {"process": {"args": ["python3", "app.py"]}}
    parts = CheckpointParts(ck, spec, "localhost/app:1", "io.containerd.runc.v2", "overlayfs")
    archive = write_checkpoint_image(parts, "example/ck:1", tmp_path / "ck.tar", tmp_path)
    report = inspect_path(archive)
    assert report["kind"] == "containerd-checkpoint"
    assert report["container"] == {
        "checkpoint": "example/ck:1", "image": "localhost/app:1",
        "runtime": "io.containerd.runc.v2", "args": ["python3", "app.py"],
    }  # fmt: skip
    assert report["processes"][0]["command"] == "python3"


def test_a_podman_archive_is_read(tmp_path: Path) -> None:
    criu_dir(tmp_path / "work" / "checkpoint")
    config = {"name": "web", "id": "a" * 64, "rootfsImageName": "localhost/app:1",
              "spec": {"process": {"args": ["python3"]}}}  # fmt: skip
    (tmp_path / "work" / "config.dump").write_text(json.dumps(config))
    (tmp_path / "work" / "spec.dump").write_text("{}")
    archive = tmp_path / "export.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(tmp_path / "work", arcname=".")
    report = inspect_path(archive)
    assert report["kind"] == "podman-archive"
    assert report["container"]["name"] == "web"
    assert report["criu"]["images"] == 4  # pstree, inventory, core, pages


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda ck: (ck / "pstree.img").write_bytes(PSTREE[:12]), "runs past the end"),
        (lambda ck: (ck / "pstree.img").write_bytes(PSTREE[:10]), "truncated entry header"),
        (lambda ck: (ck / "pstree.img").write_bytes(b"\x00" * 16), "not a CRIU image"),
        (lambda ck: (ck / "pstree.img").unlink(), "not a checkpoint migsgx knows"),
        (lambda ck: (ck / "migsgx.json").write_text("{not json"), "not JSON"),
        (lambda ck: (ck / "migsgx.json").write_text('{"enclaves": 2}'), "names 2 enclaves"),
        (lambda ck: (ck / "enclave-0.json").write_text("{}"), "lacks its image, key, state"),
    ],
)
def test_malformed_directories_are_refused(
    tmp_path: Path, damage: Callable[[Path], object], message: str
) -> None:
    ck = criu_dir(tmp_path / "ck")
    damage(ck)
    with pytest.raises(InspectError, match=message):
        inspect_path(ck)


def test_garbage_and_truncated_archives_are_refused(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(b"\x01\x02" * 5000)
    with pytest.raises(InspectError, match="not a directory or a readable tar archive"):
        inspect_path(garbage)
    ck = criu_dir(tmp_path / "ck", memory=b"m" * 100_000)
    parts = CheckpointParts(ck, {}, "img", "io.containerd.runc.v2", "overlayfs")
    whole = write_checkpoint_image(parts, "r:1", tmp_path / "ck.tar", tmp_path).read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(InspectError):
        inspect_path(cut)
    with pytest.raises(InspectError, match="No such file"):
        inspect_path(tmp_path / "missing")
    zstd = tmp_path / "export.tar.zst"
    zstd.write_bytes(b"\x28\xb5\x2f\xfd" + b"\x00" * 100)
    with pytest.raises(InspectError, match="zstd"):
        inspect_path(zstd)


def frames(*payloads: bytes) -> bytes:
    out = io.BytesIO()
    for i, payload in enumerate(payloads):
        out.write(struct.pack(">IB", len(payload), 1 if i == len(payloads) - 1 else 0) + payload)
    return out.getvalue()


def test_sealed_state_frames_are_checked() -> None:
    from migsgx.inspection.report import _check_frames
    from migsgx.inspection.sources import Member

    def member(data: bytes) -> Member:
        return Member("enclave-0.state", len(data), lambda: io.BytesIO(data))

    random = os.urandom(8192)
    assert _check_frames(member(frames(b"h" * 10, random))) == (2, [])
    count, suspects = _check_frames(member(frames(random, b"\x00" * 8192)))
    assert count == 2 and suspects == ["enclave-0.state: frame 1 compresses (plaintext?)"]
    with pytest.raises(InspectError, match="no final frame"):
        _check_frames(member(frames(random, random)[:-5]))
    with pytest.raises(InspectError, match="after the final frame"):
        _check_frames(member(frames(random) + frames(random)))
