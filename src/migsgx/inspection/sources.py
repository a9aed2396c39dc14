"""The files of a checkpoint, read-only, whether a directory or an archive.

:func:`open_bundle` gives one view (:class:`Bundle`: name -> :class:`Member`)
over a directory, a tar archive (podman's ``checkpoint --export``, a
containerd checkpoint image as an OCI layout archive) or a tar inside one.
Nothing is extracted to disk and nothing is written: members are read
through ``tarfile``'s file objects, each read bounded.  Anything that does
not parse is an :class:`~migsgx.errors.InspectError` naming what and where.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Final

from ..errors import InspectError

__all__ = ["Bundle", "Member", "open_bundle"]

MAX_MEMBERS: Final = 200_000
MAX_SMALL: Final = 64 << 20


@dataclass
class Member:
    name: str
    size: int
    opener: Callable[[], IO[bytes]]

    def read(self, limit: int = MAX_SMALL) -> bytes:
        """The whole member, at most ``limit`` bytes (more is an error, not a cut)."""

        if self.size > limit:
            raise InspectError(f"{self.name}: {self.size} bytes, more than {limit} expected")
        try:
            with self.opener() as f:
                data = f.read(limit + 1)
        except (OSError, tarfile.TarError, EOFError) as exc:
            raise InspectError(f"{self.name}: unreadable: {exc}") from exc
        if len(data) != self.size:
            raise InspectError(f"{self.name}: truncated ({len(data)} of {self.size} bytes)")
        return data

    def chunks(self, size: int = 8 << 20) -> Iterator[bytes]:
        try:
            with self.opener() as f:
                seen = 0
                while chunk := f.read(size):
                    seen += len(chunk)
                    yield chunk
        except (OSError, tarfile.TarError, EOFError) as exc:
            raise InspectError(f"{self.name}: unreadable: {exc}") from exc
        if seen != self.size:
            raise InspectError(f"{self.name}: truncated ({seen} of {self.size} bytes)")


@dataclass
class Bundle:
    """Files by name (``/``-separated, relative); ``where`` says what they came from."""

    where: str
    members: dict[str, Member]
    _stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack, repr=False)

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> Bundle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def get(self, name: str) -> Member | None:
        return self.members.get(name)

    def under(self, prefix: str) -> dict[str, Member]:
        """Members in directory ``prefix`` (not below), by their name in it."""

        cut = prefix.rstrip("/") + "/" if prefix else ""
        return {
            name[len(cut) :]: m
            for name, m in self.members.items()
            if name.startswith(cut) and "/" not in name[len(cut) :]
        }

    def nested(self, member: Member) -> Bundle:
        """The tar archive ``member`` as a bundle of its own (closed with this one)."""

        try:
            handle = self._stack.enter_context(member.opener())
            tar = self._stack.enter_context(tarfile.open(fileobj=handle, mode="r:*"))  # noqa: SIM115
        except (OSError, tarfile.TarError, EOFError) as exc:
            raise InspectError(f"{member.name}: not a readable tar archive: {exc}") from exc
        return Bundle(f"{self.where}:{member.name}", _tar_members(tar, member.name))


def _tar_members(tar: tarfile.TarFile, where: str) -> dict[str, Member]:
    out: dict[str, Member] = {}
    try:
        for count, info in enumerate(tar):
            if count >= MAX_MEMBERS:
                raise InspectError(f"{where}: more than {MAX_MEMBERS} members")
            if not info.isfile():
                continue
            name = info.name.removeprefix("./")
            if name.startswith("/") or ".." in name.split("/"):
                raise InspectError(f"{where}: member with a bad name {info.name!r}")
            out[name] = Member(name, info.size, _tar_opener(tar, info))
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise InspectError(f"{where}: not a readable tar archive: {exc}") from exc
    return out


def _tar_opener(tar: tarfile.TarFile, info: tarfile.TarInfo) -> Callable[[], IO[bytes]]:
    def opener() -> IO[bytes]:
        f = tar.extractfile(info)
        if f is None:
            raise InspectError(f"{info.name}: not a file")
        return f

    return opener


def _file_opener(path: Path) -> Callable[[], IO[bytes]]:
    def opener() -> IO[bytes]:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        return os.fdopen(fd, "rb")

    return opener


def open_bundle(path: Path) -> Bundle:
    """A directory or an archive at ``path`` as a :class:`Bundle` (nothing is changed)."""

    try:
        st = path.lstat()
    except OSError as exc:
        raise InspectError(f"{path}: {exc.strerror or exc}") from exc
    if stat.S_ISDIR(st.st_mode):
        members: dict[str, Member] = {}
        for dirpath, dirs, files in os.walk(path):
            dirs.sort()
            for name in sorted(files):
                full = Path(dirpath) / name
                fst = full.lstat()
                if not stat.S_ISREG(fst.st_mode):
                    continue
                rel = full.relative_to(path).as_posix()
                members[rel] = Member(rel, fst.st_size, _file_opener(full))
                if len(members) > MAX_MEMBERS:
                    raise InspectError(f"{path}: more than {MAX_MEMBERS} files")
        return Bundle(str(path), members)
    if not stat.S_ISREG(st.st_mode):
        raise InspectError(f"{path}: neither a directory nor a file")
    with contextlib.suppress(OSError), path.open("rb") as f:
        if f.read(4) == b"\x28\xb5\x2f\xfd":
            raise InspectError(
                f"{path}: compressed with zstd, which cannot be read here "
                "(podman: checkpoint --export with --compress none or gzip)"
            )
    bundle = Bundle(str(path), {})
    try:
        tar = bundle._stack.enter_context(tarfile.open(path, mode="r:*"))  # noqa: SIM115
    except (OSError, tarfile.TarError, EOFError) as exc:
        raise InspectError(f"{path}: not a directory or a readable tar archive: {exc}") from exc
    bundle.members = _tar_members(tar, str(path))
    return bundle
