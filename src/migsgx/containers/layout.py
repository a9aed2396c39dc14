"""OCI image layout archives, written for ``ctr images import`` (no registry involved).

Two kinds are written here.  :func:`write_checkpoint_image` makes the
checkpoint image that ``ctr containers restore --live`` reads (the index
containerd itself writes for ``ctr containers checkpoint``: CRIU's images as
one tar, the container's runtime specification and runtime options as
protobuf ``Any`` messages, the root file system's changes as a gzip layer),
so that a destination can restore a task whose images arrived from another
host, with a specification it localized itself.  :func:`write_image` makes a
one-layer image from a directory: how a host without a registry gets the
image its containers run from.

Media types and annotations are containerd 1.6's (``images/mediatypes.go``,
``container_checkpoint_opts.go``); the protobuf messages are built with the
``protobuf`` library's own ``Any``.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from google.protobuf import any_pb2

__all__ = [
    "CHECKPOINT_CRIU",
    "CHECKPOINT_SPEC",
    "CheckpointParts",
    "write_checkpoint_image",
    "write_image",
]

CHECKPOINT_CRIU: Final = "application/vnd.containerd.container.criu.checkpoint.criu.tar"
CHECKPOINT_SPEC: Final = "application/vnd.containerd.container.checkpoint.config.v1+proto"
CHECKPOINT_RUNTIME_OPTIONS: Final = (
    "application/vnd.containerd.container.checkpoint.runtime.options+proto"
)
LAYER_GZIP: Final = "application/vnd.oci.image.layer.v1.tar+gzip"
LAYER_TAR: Final = "application/vnd.oci.image.layer.v1.tar"
INDEX: Final = "application/vnd.oci.image.index.v1+json"
MANIFEST: Final = "application/vnd.oci.image.manifest.v1+json"
CONFIG: Final = "application/vnd.oci.image.config.v1+json"
SPEC_TYPE_URL: Final = "types.containerd.io/opencontainers/runtime-spec/1/Spec"
RUNC_OPTIONS_TYPE_URL: Final = "containerd.runc.v1.Options"
#: The image name ``ctr images import`` gives the descriptor it finds in ``index.json``.
IMAGE_NAME_ANNOTATION: Final = "io.containerd.image.name"
PLATFORM: Final = {"architecture": "amd64", "os": "linux"}


@dataclass(frozen=True)
class CheckpointParts:
    """What a containerd checkpoint image holds (see the module docstring)."""

    criu_images: Path  # a directory of CRIU's images
    spec: Mapping[str, Any]  # the OCI runtime specification to restore with
    image: str  # the image the container runs from (already on this host)
    runtime: str  # e.g. io.containerd.runc.v2
    snapshotter: str
    rw_layer: Path | None = None  # the root file system's changes, a gzip tar diff
    skip: frozenset[str] = frozenset()  # names in ``criu_images`` that are not CRIU's


class _Blobs:
    def __init__(self) -> None:
        self.items: list[tuple[str, bytes | Path, int]] = []

    def add(self, data: bytes, media_type: str, **extra: Any) -> dict[str, Any]:
        digest = hashlib.sha256(data).hexdigest()
        self.items.append((digest, data, len(data)))
        return {"mediaType": media_type, "digest": f"sha256:{digest}", "size": len(data), **extra}

    def add_file(self, path: Path, media_type: str, **extra: Any) -> dict[str, Any]:
        h = hashlib.sha256()
        size = 0
        with path.open("rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
                size += len(chunk)
        digest = h.hexdigest()
        self.items.append((digest, path, size))
        return {"mediaType": media_type, "digest": f"sha256:{digest}", "size": size, **extra}

    def write(self, out: Path, top: Mapping[str, Any]) -> None:
        with tarfile.open(out, "w") as tar:
            _add_bytes(tar, "oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
            _add_bytes(tar, "index.json", json.dumps(top).encode())
            seen: set[str] = set()
            for digest, data, size in self.items:
                if digest in seen:
                    continue
                seen.add(digest)
                name = f"blobs/sha256/{digest}"
                if isinstance(data, bytes):
                    _add_bytes(tar, name, data)
                else:
                    info = tarfile.TarInfo(name)
                    info.size = size
                    with data.open("rb") as f:
                        tar.addfile(info, f)


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def _any(type_url: str, value: bytes) -> bytes:
    message = any_pb2.Any(type_url=type_url, value=value)
    return bytes(message.SerializeToString())


def _tar_dir(directory: Path, skip: Iterable[str], out: Path) -> list[Path]:
    """Every regular file of ``directory`` but ``skip`` into the tar ``out``; the pages
    images among them (CRIU's ``pages-N.img``: the bulk)."""

    skipped = set(skip)
    pages = []
    with tarfile.open(out, "w") as tar:
        for path in sorted(directory.iterdir()):
            if path.name in skipped or not path.is_file() or path.is_symlink():
                continue
            tar.add(path, arcname=path.name, recursive=False)
            if path.name.startswith("pages-") and path.name.endswith(".img"):
                pages.append(path)
    return pages


def _keep(_path: Path) -> None:
    return None


def write_checkpoint_image(
    parts: CheckpointParts,
    ref: str,
    out: Path,
    scratch: Path,
    *,
    spent: Callable[[Path], None] = _keep,
) -> Path:
    """Write the checkpoint image ``ref`` as an OCI layout archive ``out``.

    ``spent`` is called with each copy of the pages once the next copy holds
    them: CRIU's pages images once in their tar, that tar once in ``out``.
    """

    blobs = _Blobs()
    criu_tar = scratch / "criu.tar"
    for pages in _tar_dir(parts.criu_images, parts.skip, criu_tar):
        spent(pages)
    manifests = [
        blobs.add(_any(RUNC_OPTIONS_TYPE_URL, b""), CHECKPOINT_RUNTIME_OPTIONS, platform=PLATFORM),
        blobs.add_file(criu_tar, CHECKPOINT_CRIU, platform=PLATFORM),
        blobs.add(
            _any(SPEC_TYPE_URL, json.dumps(parts.spec).encode()), CHECKPOINT_SPEC, platform=PLATFORM
        ),
    ]
    if parts.rw_layer is not None:
        manifests.append(blobs.add_file(parts.rw_layer, LAYER_GZIP, platform=PLATFORM))
    index = {
        "schemaVersion": 2,
        "manifests": manifests,
        "annotations": {
            "io.containerd.checkpoint.runtime": parts.runtime,
            "io.containerd.checkpoint.snapshotter": parts.snapshotter,
            "org.opencontainers.image.ref.name": parts.image,
        },
    }
    top = blobs.add(json.dumps(index).encode(), INDEX, annotations={IMAGE_NAME_ANNOTATION: ref})
    blobs.write(out, {"schemaVersion": 2, "manifests": [top]})
    spent(criu_tar)
    return out


def write_image(rootfs: Path, name: str, out: Path, scratch: Path) -> Path:
    """A one-layer image ``name`` of the tree ``rootfs`` as an OCI layout archive ``out``."""

    layer = scratch / "layer.tar"
    with tarfile.open(layer, "w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(rootfs.rglob("*")):
            tar.add(path, arcname=path.relative_to(rootfs).as_posix(), recursive=False)
    blobs = _Blobs()
    layer_desc = blobs.add_file(layer, LAYER_TAR)
    config = {
        "architecture": PLATFORM["architecture"],
        "os": PLATFORM["os"],
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": [layer_desc["digest"]]},
    }
    manifest = {
        "schemaVersion": 2,
        "mediaType": MANIFEST,
        "config": blobs.add(json.dumps(config).encode(), CONFIG),
        "layers": [layer_desc],
    }
    top = blobs.add(
        json.dumps(manifest).encode(),
        MANIFEST,
        platform=PLATFORM,
        annotations={IMAGE_NAME_ANNOTATION: name},
    )
    blobs.write(out, {"schemaVersion": 2, "manifests": [top]})
    return out
