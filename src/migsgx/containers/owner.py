"""Which session's restore made a held container: the mark a restarted agent trusts.

A dead agent's ``held.json`` may be damaged or planted, so a restarted agent
removes through an engine only what a mark in its own state directory says its
restore made for that record's session and never resumed (``remove_made``).
runc keeps the mark in the bundle it makes; containerd and podman, whose
containers live in the engine's store, in ``STATE/agent/ENGINE/NAME.owner``,
written after the engine said that no container of that name exists and before
it is asked to restore; removed when the restore fails, when the container is
resumed, or when it is removed.  It is made exclusively, as runc's bundle is:
while a mark of a name is there no other session restores that name (two
sessions restoring one name at once both found no container, and the one whose
restore then failed removed the container the other had just restored).
"""

from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path
from typing import Final

from .base import ContainerError

__all__ = ["alive", "check", "clear", "mark_path", "read", "write"]

SUFFIX: Final = ".owner"


def mark_path(directory: Path, name: str) -> Path:
    return directory / f"{name}{SUFFIX}"


def write(path: Path, owner: str, what: str) -> None:
    """Mark ``what`` as restored for session ``owner``; a :class:`ContainerError` if a
    mark of it is there already (another session restores it, or holds it).

    Whole or not at all: written under a name of this thread's own and linked into
    place, which fails if anything (a mark, a planted link) has the name.
    """

    tmp = path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        try:
            os.write(fd, owner.encode())
        finally:
            os.close(fd)
        os.link(tmp, path)
    except FileExistsError as exc:
        raise ContainerError(
            f"{what}: another session restores or holds it (its mark {path} is there; "
            "a restarted agent removes one a dead agent left, with what its restore made)"
        ) from exc
    finally:
        tmp.unlink(missing_ok=True)


def read(path: Path) -> str:
    """The session a mark names ("" if there is none)."""

    try:
        return path.read_text(errors="replace")[:64]
    except OSError:
        return ""


def clear(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()


def alive(pid: int) -> bool:
    return pid > 0 and Path(f"/proc/{pid}").exists()


def check(path: Path, owner: str, what: str) -> None:
    """A :class:`ContainerError` unless ``path`` marks ``what`` as made for ``owner``."""

    if not owner or read(path) != owner:
        raise ContainerError(
            f"{what}: no mark that this agent's restore made it for this session and never "
            "resumed it: not this agent's to remove"
        )
