"""An incoming migration's copies of its images go as soon as the next copy is made.

podman's restore unpacks the archive it received, packs it again and imports
that; containerd's packs CRIU's images into a tar and that into a checkpoint
image.  With the images read once (``RestoreRequest.spend_images``) each copy
is removed once the next holds its bytes, and the room the agent reserves for
images in RAM counts what is then held.  The engines' own commands are
stand-ins here (what runs them, and what they get, is what is tested); the
real engines restore in ``tests/integration/test_bench_container_ram.py``.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Any

import pytest

from migsgx.agent import imageroom
from migsgx.agent.imageroom import (
    IMAGE_COPIES,
    MARGIN,
    SPENT_COPIES,
    place_images,
    room_needed,
)
from migsgx.containers import HostConfig, make_driver
from migsgx.containers.base import RestoreRequest
from migsgx.containers.containerd import ContainerdDriver
from migsgx.containers.layout import CheckpointParts, write_checkpoint_image
from migsgx.containers.podman import PODMAN_ARCHIVE, PodmanDriver
from migsgx.containers.settings import ContainerSettings
from migsgx.containers.spent import spend
from migsgx.criu import Criu

PAGES = b"\xa5" * (256 << 10)  # a pages image's bytes: what must not be lost on the way


def _received(images: Path) -> Path:
    """A podman export as the source sends it: configurations and CRIU's images."""

    archive = images / PODMAN_ARCHIVE
    with tarfile.open(archive, "w") as tar:
        folder = tarfile.TarInfo("checkpoint")
        folder.type = tarfile.DIRTYPE
        folder.mode = 0o700
        tar.addfile(folder)
        for name, data in (
            ("config.dump", b"{}"),
            ("spec.dump", b"{}"),
            ("checkpoint/pages-1.img", PAGES),
            ("checkpoint/inventory.img", b"inv"),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return archive


class _Podman:
    """podman's command line as the driver calls it; ``restore --import`` looks around."""

    def __init__(self, images: Path) -> None:
        self.images = images
        self.restored = False
        self.seen: dict[str, Any] = {}

    def inspect(self, name: str) -> dict[str, Any] | None:
        return {"State": {"Pid": 4242, "ConmonPid": 0}} if self.restored else None

    def __call__(self, *args: str, what: str, **_kw: Any) -> str:
        if args[:2] == ("container", "restore"):
            archive = Path(args[args.index("--import") + 1])
            with tarfile.open(archive) as tar:
                pages = tar.extractfile("checkpoint/pages-1.img")
                assert pages is not None
                self.seen["pages"] = pages.read()
            self.seen["files"] = sorted(p.name for p in self.images.iterdir())
            self.restored = True
        return ""


def _podman_restore(tmp_path: Path, *, spend_images: bool) -> tuple[_Podman, Path]:
    images = tmp_path / "images"
    images.mkdir()
    _received(images)
    driver = make_driver("podman", HostConfig(Criu("/bin/true"), ContainerSettings(),
                                              Path("/x/e.sock"), tmp_path / "state"))  # fmt: skip
    assert isinstance(driver, PodmanDriver)
    engine = _Podman(images)
    driver.podman = engine  # type: ignore[assignment]
    driver.localize_archive = lambda work, conf, **_kw: None  # type: ignore[method-assign]
    request = RestoreRequest(
        images, {"name": "kv1"}, tcp_close=False, owner="ab" * 16, spend_images=spend_images
    )
    restored = driver.restore(request)
    assert restored.pid == 4242
    return engine, images


def test_a_spent_podman_restore_holds_only_the_archive_podman_imports(tmp_path: Path) -> None:
    engine, images = _podman_restore(tmp_path, spend_images=True)
    # While podman restored: neither the received archive nor its unpacked tree was left.
    assert engine.seen["files"] == ["podman-import.tar"]
    assert engine.seen["pages"] == PAGES  # (every byte reached the archive podman read)
    assert sorted(p.name for p in images.iterdir()) == []  # and that one went after it


def test_a_podman_restore_that_keeps_its_images_keeps_every_copy(tmp_path: Path) -> None:
    engine, images = _podman_restore(tmp_path, spend_images=False)
    expected = sorted([PODMAN_ARCHIVE, "podman-import", "podman-import.tar"])
    assert engine.seen["files"] == expected
    assert sorted(p.name for p in images.iterdir()) == expected
    assert engine.seen["pages"] == PAGES


def test_a_podman_restore_refused_before_it_starts_keeps_the_received_archive(
    tmp_path: Path,
) -> None:
    """Another session's mark refuses the restore before it changed anything."""

    from migsgx.containers import owner
    from migsgx.containers.base import ContainerError

    images = tmp_path / "images"
    images.mkdir()
    archive = _received(images)
    driver = make_driver("podman", HostConfig(Criu("/bin/true"), ContainerSettings(),
                                              Path("/x/e.sock"), tmp_path / "state"))  # fmt: skip
    assert isinstance(driver, PodmanDriver)
    driver.podman = _Podman(images)  # type: ignore[assignment]
    conf = tmp_path / "state" / "agent" / "podman"
    conf.mkdir(parents=True)
    owner.write(owner.mark_path(conf, "kv1"), "cd" * 16, "kv1")
    request = RestoreRequest(images, {"name": "kv1"}, tcp_close=False, owner="ab" * 16,
                             spend_images=True)  # fmt: skip
    with pytest.raises(ContainerError, match="another session"):
        driver.restore(request)
    assert archive.exists()


def _criu_images(directory: Path) -> None:
    directory.mkdir()
    (directory / "pages-1.img").write_bytes(PAGES)
    (directory / "pagemap-1.img").write_bytes(b"map")
    (directory / "inventory.img").write_bytes(b"inv")
    (directory / "migsgx-containerd.json").write_text("{}")  # (the record: not CRIU's)


def _blob_with_pages(archive: Path) -> bytes:
    """The CRIU tar inside a checkpoint image, its pages image read back."""

    with tarfile.open(archive) as outer:
        for member in outer:
            if not member.name.startswith("blobs/"):
                continue
            blob = outer.extractfile(member)
            assert blob is not None
            data = blob.read()
            try:
                with tarfile.open(fileobj=io.BytesIO(data)) as inner:
                    pages = inner.extractfile("pages-1.img")
                    assert pages is not None
                    return pages.read()
            except (tarfile.TarError, KeyError):
                continue
    raise AssertionError("no CRIU tar in the checkpoint image")


@pytest.mark.parametrize("spend_images", [True, False])
def test_a_containerd_checkpoint_image_spends_the_pages_and_their_tar(
    tmp_path: Path, spend_images: bool
) -> None:
    images = tmp_path / "images"
    _criu_images(images)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    request = RestoreRequest(images, {"id": "c1"}, tcp_close=False, spend_images=spend_images)
    parts = CheckpointParts(
        criu_images=images,
        spec={},
        image="img",
        runtime="r",
        snapshotter="overlayfs",
        skip=frozenset({"migsgx-containerd.json"}),
    )
    out = write_checkpoint_image(
        parts, "ck:1", scratch / "checkpoint.tar", scratch, spent=lambda p: spend(request, p)
    )
    assert _blob_with_pages(out) == PAGES
    left = sorted(p.name for p in images.iterdir())
    if spend_images:
        # The pages image went once in its tar, the tar once in the image; the rest stays.
        assert left == ["inventory.img", "migsgx-containerd.json", "pagemap-1.img"]
        assert sorted(p.name for p in scratch.iterdir()) == ["checkpoint.tar"]
    else:
        assert "pages-1.img" in left
        assert sorted(p.name for p in scratch.iterdir()) == ["checkpoint.tar", "criu.tar"]


class _Ctr:
    def __init__(self, images: Path, work: Path) -> None:
        self.images, self.work = images, work
        self.seen: dict[str, list[str]] = {}
        self.imported = False
        self.namespace = "ns"
        self.snapshotter = "overlayfs"

    def info(self, cid: str) -> dict[str, Any] | None:
        return None

    def has_image(self, name: str) -> bool:
        return True

    def import_image(self, archive: Path, *, unpack: bool = True) -> None:
        self.seen["at_import"] = sorted(p.name for p in self.images.iterdir())
        self.seen["work_at_import"] = sorted(p.name for p in self.work.iterdir())
        self.imported = True

    def __call__(self, *args: str, what: str, **_kw: Any) -> str:
        if args[:2] == ("containers", "restore"):
            self.seen["work_at_restore"] = sorted(p.name for p in self.work.iterdir())
        return ""

    def task(self, cid: str) -> tuple[int, str] | None:
        return (4243, "STOPPED") if self.imported else None

    def remove_image(self, name: str) -> None:
        return None


def test_a_spent_containerd_restore_holds_no_copy_in_its_directory_while_restoring(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import migsgx.containers.containerd as containerd_mod

    images = tmp_path / "images"
    _criu_images(images)
    (images / "migsgx-containerd.json").write_text(
        json.dumps({"image": "img", "runtime": "io.containerd.runc.v2", "spec": {}})
    )
    host = HostConfig(Criu("/bin/true"), ContainerSettings(), Path("/x/e.sock"), tmp_path / "state")
    driver = make_driver("containerd", host)
    assert isinstance(driver, ContainerdDriver)
    engine = _Ctr(images, images / "containerd-import")
    driver.ctr = engine  # type: ignore[assignment]
    monkeypatch.setattr(driver, "check_target", lambda target: {"id": "c1"})
    for name in ("localize", "admit_images", "localize_images", "bring_lo_up"):
        monkeypatch.setattr(containerd_mod, name, lambda *a, **_kw: a[0] if a else None)
    request = RestoreRequest(images, {"id": "c1"}, tcp_close=False, owner="ab" * 16,
                             spend_images=True)  # fmt: skip
    driver.restore(request)
    assert "pages-1.img" not in engine.seen["at_import"]  # in the checkpoint image only
    assert engine.seen["work_at_import"] == ["checkpoint.tar"]  # (the CRIU tar went)
    assert engine.seen["work_at_restore"] == []  # imported: containerd holds it now


def test_spend_keeps_everything_of_a_restore_that_reads_its_images_again(tmp_path: Path) -> None:
    kept = tmp_path / "kept"
    kept.write_bytes(b"x")
    spend(RestoreRequest(tmp_path, {}, tcp_close=False, spend_images=False), kept)
    assert kept.exists()
    spend(RestoreRequest(tmp_path, {}, tcp_close=False, spend_images=True), kept)
    assert not kept.exists()
    spend(RestoreRequest(tmp_path, {}, tcp_close=False, spend_images=True), kept)  # (gone: fine)


def test_the_room_counts_the_copies_a_spent_restore_holds() -> None:
    memory = 1 << 30
    # Kept whole: three copies through the restore, beside the tree.
    assert room_needed(memory, copies=IMAGE_COPIES["podman"]) == 4 * memory + MARGIN
    assert room_needed(memory, copies=IMAGE_COPIES["containerd"]) == 4 * memory + MARGIN
    # Spent: two at most before the restore, one (podman) or none (containerd) through it.
    copies, held = SPENT_COPIES["podman"]
    assert room_needed(memory, copies=copies, held=held) == 2 * memory + MARGIN
    copies, held = SPENT_COPIES["containerd"]
    assert room_needed(memory, copies=copies, held=held) == 2 * memory + MARGIN
    # (the enclaves come on top, as for every driver)
    assert room_needed(memory, 3 << 30, copies=2, held=1) == 5 * memory + MARGIN


@pytest.mark.parametrize(("spends", "in_ram"), [(True, True), (False, False)])
def test_a_spent_podman_restore_gets_ram_where_a_whole_one_does_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, spends: bool, in_ram: bool
) -> None:
    session = tmp_path / "session"
    session.mkdir()
    base = tmp_path / "ram"
    base.mkdir()
    memory = 1 << 30
    monkeypatch.setattr(imageroom, "scratch_base", lambda: base)
    monkeypatch.setattr(imageroom, "images_room", lambda _base: 2 * memory + MARGIN)
    made = base / "made"
    monkeypatch.setattr(imageroom, "make_dump_dir", lambda: made.mkdir() or made)
    placed = place_images(session, memory, in_ram=True, tag="t", driver="podman", spends=spends)
    assert placed == (made if in_ram else session)
