"""Which session's restore made a held container: the mark a restarted agent trusts.

A dead agent's ``held.json`` may be damaged or planted, so a restarted agent
removes through an engine only what a mark in its own state directory says its
restore made for that record's session and never resumed (``remove_made``).
runc keeps the mark in the bundle it makes; containerd and podman, whose
containers live in the engine's store, in ``STATE/agent/ENGINE/NAME.owner``,
written after the engine said that no container of that name exists and before
it is asked to restore; removed when the restore fails, when the container is
resumed, or when it is removed.  It is made exclusively, as runc's bundle is:
while this agent's mark of a name is there no other session restores that name
(two sessions restoring one name at once both found no container, and the one
whose restore then failed removed the container the other had just restored).
A mark this agent process did not write is a former agent's that outlived its
container (the engine said there is none): it is replaced, not obeyed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from pathlib import Path
from typing import Final

from .base import ContainerError

__all__ = ["alive", "check", "clear", "mark_path", "read", "write"]

SUFFIX: Final = ".owner"

log = logging.getLogger("migsgx.containers")

#: The marks this agent process wrote and has not cleared (a session restores or
#: holds each name); one lock for the look and the write.
_MINE: set[Path] = set()
_LOCK = threading.Lock()


def mark_path(directory: Path, name: str) -> Path:
    return directory / f"{name}{SUFFIX}"


def write(path: Path, owner: str, what: str) -> None:
    """Mark ``what`` as restored for session ``owner``; a :class:`ContainerError` if this
    agent process marked it already (another session restores it, or holds it).

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
        with _LOCK:
            if path in _MINE:
                raise ContainerError(
                    f"{what}: another session of this agent restores or holds it (its mark "
                    f"{path} is there)"
                )
            try:
                os.link(tmp, path)
            except FileExistsError:
                # A former agent's: the caller's engine knows no container of the name.
                log.warning("%s: replacing the mark %s a former agent left", what, path)
                os.replace(tmp, path)
            _MINE.add(path)
    finally:
        tmp.unlink(missing_ok=True)


def read(path: Path) -> str:
    """The session a mark names ("" if there is none)."""

    try:
        return path.read_text(errors="replace")[:64]
    except OSError:
        return ""


def clear(path: Path) -> None:
    with _LOCK:
        _MINE.discard(path)
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
