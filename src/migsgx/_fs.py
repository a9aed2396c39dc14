"""Small file-system helpers: files written atomically and durably, private ones."""

from __future__ import annotations

import os
import threading
from pathlib import Path


def write_private(path: Path, data: bytes, *, mode: int = 0o600, sync: bool = True) -> None:
    """Write ``data`` to ``path`` atomically with ``mode``; the file is never visible half-written
    and never readable by others, not even for a moment.

    ``sync=False`` leaves out the fsyncs: still atomic for any process that dies
    (the page cache outlives it), not across a crash of the host.
    """

    # (a temporary name of this thread's own: two writers never share one)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}-{threading.get_ident()}")
    _replace_durably(path, tmp, data, mode, sync)


def write_durably(path: Path, data: bytes, *, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` atomically and durably: after a crash the old file or
    the new one is there, never a part.  Written through ``NAME.tmp`` beside it, a
    name that readers of the directory skip."""

    _replace_durably(path, path.with_name(path.name + ".tmp"), data, mode)


def _replace_durably(path: Path, tmp: Path, data: bytes, mode: int, sync: bool = True) -> None:
    """``data`` into ``tmp``, synced, renamed over ``path``, the directory synced (the
    syncs left out with ``sync=False``)."""

    # A file already at ``tmp`` (left by a crash, or put there by anyone who may write
    # the directory) is not written through: it would keep its owner and mode (an
    # open file's mode is set only when the file is made), and its contents would be
    # renamed into place.  A fresh file, or an error.
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            if sync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if not sync:
        return
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def read_private(path: Path) -> bytes:
    """Read a file that must not be readable by group or others."""

    st = path.stat()
    if st.st_mode & 0o077:
        from .errors import StateDirError

        raise StateDirError(
            f"{path} is accessible by group or others (mode {st.st_mode & 0o777:o}); expected 0600",
            path=str(path),
        )
    return path.read_bytes()
