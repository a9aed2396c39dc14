"""A checkpoint's enclave image, checked against what the checkpoint recorded, before it launches.

Every way from a checkpoint directory to an enclave process launches a fresh
enclave of the image the directory holds (``enclave-N.image``): ``migsgx
restore`` loads the state into it, ``migsgx recover --checkpoint`` (and the
checkpoint's guardian, and the checkpoint tool after an enclave's death) asks
one to read its gate.  That file is public and plain, and a directory may be
copied, damaged or tampered with: a flipped byte, or the image of another
enclave in its place.  Launched, such an image runs code nobody checked, and a
gate read through it answers for another enclave.

So every launch from a checkpoint goes through :func:`checked_image`, the one
check: the image's bytes, read once, must have the size and SHA-256 that the
checkpoint recorded for the file (``migsgx.json``'s ``files``; a bare enclave
checkpoint without a process: ``enclave-N.json``'s ``image``), and only those
bytes are parsed and launched.  Anything else is a
:class:`~migsgx.errors.CheckpointDamagedError` naming the file and what
differs, raised before the platform service is asked for anything: nothing
launches, nothing of the checkpoint is read further or changed, and once the
recorded image is put back the checkpoint restores as before.
``docs/spec/checkpoint.md``, section 1.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
from pathlib import Path
from typing import Final

import cbor2

from ..errors import CheckpointDamagedError, ImageError
from ..sgx.image import EnclaveImage

__all__ = ["MAX_IMAGE_FILE", "checked_image", "image_digest", "image_name", "recorded_digest"]

#: The largest image file a checkpoint may hold (bytes).
MAX_IMAGE_FILE: Final = 64 << 20

_HEX: Final = re.compile(r"[0-9a-f]{64}")


def image_name(index: int) -> str:
    """The file name of enclave ``index``'s image in a checkpoint directory."""

    return f"enclave-{index}.image"


def image_digest(data: bytes) -> list[int | str]:
    """What a checkpoint records for an image file: ``[size, SHA-256 hex]``."""

    return [len(data), hashlib.sha256(data).hexdigest()]


def recorded_digest(files: object, name: str) -> tuple[int, str]:
    """The size and SHA-256 (hex) that ``files`` (the checkpoint's digests) record for ``name``.

    ``files`` comes from a file of the directory, so it may be anything: only a
    map holding ``[size, 64 lower-case hex digits]`` for ``name``, the size at
    most :data:`MAX_IMAGE_FILE`, is a record; anything else is a
    :class:`CheckpointDamagedError`.
    """

    entry = files.get(name) if isinstance(files, dict) else None
    if not isinstance(entry, list) or len(entry) != 2:
        raise CheckpointDamagedError(
            f"the checkpoint records no digest for its enclave image {name}: nothing was launched"
        )
    size, digest = entry
    if type(size) is not int or not 0 <= size <= MAX_IMAGE_FILE:
        raise CheckpointDamagedError(
            f"the checkpoint's record of {name} holds no valid size: nothing was launched"
        )
    if not isinstance(digest, str) or not _HEX.fullmatch(digest):
        raise CheckpointDamagedError(
            f"the checkpoint's record of {name} holds no valid SHA-256: nothing was launched"
        )
    return size, digest


def _read(path: Path, limit: int) -> bytes:
    """At most ``limit`` bytes of the regular file ``path`` (never a link, never a FIFO
    waited on)."""

    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise CheckpointDamagedError(
            f"the enclave image {path} cannot be read ({exc.strerror}): nothing was launched"
        ) from exc
    with os.fdopen(fd, "rb") as src:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise CheckpointDamagedError(
                f"the enclave image {path} is not a regular file: nothing was launched"
            )
        return src.read(limit)


def checked_image(directory: Path, index: int, files: object) -> EnclaveImage:
    """Enclave ``index``'s image, exactly as the checkpoint recorded it (``files``).

    Raises :class:`CheckpointDamagedError` naming the file and what differs (its
    size, or its SHA-256 against the recorded one) before anything launches.
    """

    name = image_name(index)
    size, digest = recorded_digest(files, name)
    path = Path(directory) / name
    data = _read(path, size + 1)  # (one byte more tells a longer file)
    found = hashlib.sha256(data).hexdigest()
    if len(data) != size or found != digest:
        if len(data) != size:
            what = f"more than {size}" if len(data) > size else str(len(data))
            differs = f"{what} bytes where the checkpoint records {size}"
        else:
            differs = f"SHA-256 {found[:16]}... where the checkpoint records {digest[:16]}..."
        raise CheckpointDamagedError(
            f"the enclave image {path} is not the one the checkpoint recorded ({differs}): "
            "nothing was launched; put the recorded image back"
        )
    try:
        loaded = cbor2.loads(data)
    except Exception as exc:  # (cbor2 raises what its decoder meets; the bytes are recorded)
        raise CheckpointDamagedError(f"{path} is not an enclave image: {exc}") from exc
    if not isinstance(loaded, dict):
        raise CheckpointDamagedError(f"{path} is not an enclave image")
    try:
        return EnclaveImage.from_files(loaded)
    except ImageError as exc:
        raise CheckpointDamagedError(f"{path} is not an enclave image: {exc}") from exc
