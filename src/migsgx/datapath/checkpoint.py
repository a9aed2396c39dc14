"""Enclave state to a directory and back: the engine's file sink.

A checkpoint is a migration whose destination is a file.  There is no peer to
attest, so the source enclave makes the stream secret itself and *seals* it
(EGETKEY seal key: MRENCLAVE policy, or MRSIGNER with the SVN rule when the
manifest says ``same-signer``) together with a fresh checkpoint id; the state
then streams through the same ring and the same STREAM format as a live
migration.  The files in the directory, per enclave ``N``::

    enclave-N.image   the enclave image (CBOR map of file name to bytes; public)
    enclave-N.key     the sealed stream secret and checkpoint id
    enclave-N.state   the sealed streams, as chunk frames (u32 length | u8 flags | payload)
    enclave-N.json    public facts: checkpoint id, chunk size, bytes, the image's digest

The source enclave gives its state up (wipes itself and exits) only after the
files are on disk.  A restore launches a fresh enclave of the same image on
the *same host* (the seal key is bound to it), only from the image the
checkpoint recorded (:func:`.ckpt_image.checked_image`, before it launches),
loads the streams, and runs only
after consuming the checkpoint's gate in the host's platform store: a checkpoint
restores exactly once, only after its source committed, never after an abort.
See ``docs/spec/checkpoint.md``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, BinaryIO

import cbor2

from ..core.peer import CHUNK_HEADER, FLAG_FINAL
from ..core.stream import TAG_SIZE
from ..errors import ConfigError, FrameError, MigSGXError
from ..host.client import EnclaveInfo, launch_enclave
from ..limits import DEFAULT_CHUNK_SIZE, DEFAULT_SLOTS
from ..sgx.image import EnclaveImage
from .ckpt_image import MAX_IMAGE_FILE, checked_image, image_digest, image_name
from .enclave_link import RING_TIMEOUT, EnclaveLink, _call_beside, _Worker
from .ring import ShmRing
from .ring_spec import RingRole

__all__ = ["MAX_IMAGE_FILE", "CheckpointIn", "CheckpointOut", "restore_enclave"]


def _paths(directory: Path, index: int) -> tuple[Path, Path, Path, Path]:
    base = Path(directory)
    return (
        base / f"enclave-{index}.image",
        base / f"enclave-{index}.key",
        base / f"enclave-{index}.state",
        base / f"enclave-{index}.json",
    )


def _write_durably(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _slots_to_file(ring: ShmRing, out: BinaryIO) -> int:
    total = 0
    while True:
        index, view, final = ring.next(RING_TIMEOUT)
        out.write(CHUNK_HEADER.pack(len(view), FLAG_FINAL if final else 0))
        out.write(view)
        total += len(view)
        ring.release(index)
        if final:
            return total


def _file_to_slots(src: io.BufferedReader, ring: ShmRing) -> int:
    total = 0
    while True:
        head = src.read(CHUNK_HEADER.size)
        if len(head) != CHUNK_HEADER.size:
            raise FrameError("the checkpoint's state file ends before its final chunk")
        length, flags = (int(v) for v in CHUNK_HEADER.unpack(head))
        if flags & ~FLAG_FINAL or length > ring.slot_size:
            raise FrameError("the checkpoint's state file holds a malformed chunk frame")
        index, slot = ring.acquire(RING_TIMEOUT)
        view = slot[:length]
        if src.readinto(view) != length:
            raise FrameError("the checkpoint's state file is truncated")
        final = bool(flags & FLAG_FINAL)
        ring.publish(index, length, final)
        total += length
        if final:
            if src.read(1):
                raise FrameError("bytes after the final chunk of the checkpoint")
            return total


class CheckpointOut:
    """One enclave's state into ``directory``; :meth:`commit` then gives it up."""

    def __init__(
        self,
        sock: socket.socket,
        info: EnclaveInfo,
        image_files: Mapping[str, bytes],
        *,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        slots: int = DEFAULT_SLOTS,
        group: bytes = b"",
    ) -> None:
        self.link = EnclaveLink(sock)
        self.info = info
        #: The checkpoint's group when several enclaves checkpoint together (16
        #: bytes): the store then binds their gates' decisions to each other.
        self.group = group
        self.image_files = dict(image_files)
        self.chunk_size = chunk_size
        self.slots = slots
        self._written = False
        self._finished = False

    def write(self, directory: Path, index: int) -> dict[str, Any]:
        image_path, key_path, state_path, meta_path = _paths(directory, index)
        t0 = time.perf_counter()
        try:
            started = self.link.call("__ckpt_out", *([self.group] if self.group else []))
            image = cbor2.dumps(self.image_files)
            _write_durably(image_path, image)
            _write_durably(key_path, started["key"])
            ring = ShmRing.create(self.slots, self.chunk_size + TAG_SIZE, RingRole.CONSUMER)
            fd = os.open(state_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as out:
                try:
                    self.link.give_ring(ring)
                    writer = _Worker(lambda: _slots_to_file(ring, out), "migsgx-ckpt-write", ring)
                    dump = _call_beside(self.link, writer, "__mig_dump", self.chunk_size)
                    writer.join()
                finally:
                    ring.close()
                out.flush()
                os.fsync(out.fileno())
            facts = {
                "checkpoint_id": started["id"].hex(),
                "chunk_bytes": self.chunk_size,
                "bytes": dump["bytes"],
                "memory_bytes": dump["memory_bytes"],
                # (what a bare checkpoint's restore checks the image against; a
                # process checkpoint's is migsgx.json's, which covers this file too)
                "image": image_digest(image),
            }
            _write_durably(meta_path, json.dumps(facts).encode())
            dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
            self._written = True
        except BaseException:
            self.abort()
            for path in (image_path, key_path, state_path, meta_path):
                with contextlib.suppress(OSError):
                    path.unlink()
            raise
        return {**facts, "seconds": time.perf_counter() - t0}

    def commit(self, meta: bytes = b"") -> None:
        """The files are durable: the source enclave wipes itself and exits.

        ``meta``: the SHA-256 of the checkpoint's metadata file, which the
        committed gate binds (a restore must present the same).
        """

        if not self._written:
            raise MigSGXError("commit before the checkpoint was written")
        self.link.call("__ckpt_commit", meta)
        self._finished = True

    def abort(self) -> socket.socket:
        """The source enclave resumes with its state; returns its connection.

        Called only by a driver that saw no enclave of the checkpoint commit
        (it drives every commit), so it says so (``none_committed``): in a group
        the abort then goes ahead even if the platform store cannot record it
        (its gate stays pending, which never restores).
        """

        if not self._finished:
            self._finished = True
            with contextlib.suppress(MigSGXError, OSError):
                self.link.call("__mig_abort", "checkpoint abandoned", True)
        return self.link.sock


class CheckpointIn:
    """One enclave of a checkpoint, loaded into a fresh enclave that does not run yet.

    ``files``: the digests the checkpoint recorded (``migsgx.json``'s ``files``,
    as parsed, whatever it holds); the image is launched only if it is the one
    recorded there (:func:`.ckpt_image.checked_image`).  None: a bare enclave
    checkpoint, whose ``enclave-N.json`` records its image's digest.
    """

    def __init__(
        self,
        directory: Path,
        index: int,
        platform_socket: Path | str,
        meta: bytes = b"",
        *,
        files: object = None,
    ) -> None:
        self.directory = Path(directory)
        self.index = index
        self.platform_socket = platform_socket
        #: The SHA-256 of the metadata the restore read (what the source committed).
        self.meta = meta
        self.files = files
        self.link: EnclaveLink | None = None
        self.info: EnclaveInfo | None = None
        self.image_files: dict[str, bytes] = {}

    def _facts(self) -> dict[str, Any]:
        _, _, _, meta_path = _paths(self.directory, self.index)
        try:
            facts = json.loads(meta_path.read_text())
        except (OSError, ValueError, RecursionError) as exc:
            raise ConfigError(
                f"checkpoint {self.directory} lacks enclave {self.index}: {exc}"
            ) from exc
        if not isinstance(facts, dict):
            raise ConfigError(f"checkpoint {self.directory}: enclave {self.index} is malformed")
        return facts

    def _image(self, facts: dict[str, Any] | None = None) -> EnclaveImage:
        """The image to launch, checked against the recorded digest before anything
        launches (the one check, :func:`.ckpt_image.checked_image`)."""

        files = self.files
        if files is None:  # (a bare checkpoint: its enclave-N.json records the image)
            files = {image_name(self.index): (facts or self._facts()).get("image")}
        return checked_image(self.directory, self.index, files)

    def load(self, *, slots: int = DEFAULT_SLOTS) -> None:
        _, key_path, state_path, _ = _paths(self.directory, self.index)
        facts = self._facts()
        try:
            key_blob = key_path.read_bytes()
            chunk = int(facts["chunk_bytes"])
        except (OSError, ValueError, KeyError, TypeError, OverflowError) as exc:
            raise ConfigError(
                f"checkpoint {self.directory} lacks enclave {self.index}: {exc}"
            ) from exc
        if not 4096 <= chunk <= 16 << 20:
            raise ConfigError(f"checkpoint {self.directory}: enclave {self.index} is malformed")
        image = self._image(facts)
        sock, self.info = launch_enclave(image, socket_path=self.platform_socket)
        self.link = link = EnclaveLink(sock)
        self.image_files = dict(image.files)
        try:
            link.call("__ckpt_in", key_blob, self.meta)
            ring = ShmRing.create(slots, chunk + TAG_SIZE, RingRole.PRODUCER)
            try:
                link.give_ring(ring)
                with open(state_path, "rb") as src:
                    reader = _Worker(lambda: _file_to_slots(src, ring), "migsgx-ckpt-read", ring)
                    _call_beside(link, reader, "__mig_load")
                    reader.join()
            finally:
                ring.close()
        except BaseException:
            self.discard()
            raise

    def probe(self) -> None:
        """Whether this enclave's checkpoint is committed, asked of a fresh enclave.

        A fresh enclave of the image opens the key record and the gate
        (``__ckpt_in``), which raises :class:`~migsgx.errors.CheckpointGateError`
        unless the gate is committed (and the metadata digest is the committed
        one); then it is discarded.  Reading a gate changes nothing.
        """

        _, key_path, _, _ = _paths(self.directory, self.index)
        try:
            key_blob = key_path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"checkpoint {self.directory} lacks enclave {self.index}") from exc
        image = self._image()
        sock, self.info = launch_enclave(image, socket_path=self.platform_socket)
        self.link = EnclaveLink(sock)
        try:
            self.link.call("__ckpt_in", key_blob, self.meta)
        finally:
            self.discard()

    def activate(self) -> socket.socket:
        """Claim the checkpoint on this host (once) and let the enclave run."""

        if self.link is None:
            raise MigSGXError("nothing was loaded")
        self.link.call("__ckpt_activate")
        return self.link.sock

    def discard(self) -> None:
        """The loaded enclave never runs; the checkpoint stays restorable."""

        if self.link is not None:
            with contextlib.suppress(MigSGXError, OSError):
                self.link.call("__mig_abort", "restore abandoned")
            self.link.sock.close()
            self.link = None


def restore_enclave(
    directory: Path, index: int, platform_socket: Path | str, meta: bytes = b""
) -> tuple[socket.socket, EnclaveInfo, dict[str, bytes]]:
    """Launch a fresh enclave, load a bare checkpoint into it, and let it run (once)."""

    incoming = CheckpointIn(directory, index, platform_socket, meta)
    incoming.load()
    try:
        sock = incoming.activate()
    except BaseException:
        incoming.discard()
        raise
    assert incoming.info is not None
    return sock, incoming.info, incoming.image_files
