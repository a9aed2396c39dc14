"""The migration tool's own images directories, and removing those a dead tool left.

``migsgx migrate`` writes CRIU's images of the process outside its enclaves
(up to some 15 MB per migration) into a fresh directory in ``/dev/shm``: RAM.
A tool killed mid-migration never removes it, and a day of killed tools holds
a gigabyte.  So the name says whose it is: ``migsgx-dump-PID-START-XXXXXXXX``,
the tool's pid and its start time (clock ticks since boot, field 22 of
``/proc/PID/stat``), and the journal records the path (``dump_dir``).  The
guardian (on its tool's death), ``migsgx recover`` and every tool at its start
remove the directories whose tool is gone (:func:`sweep_dump_dirs`).

Only what the tool made for itself is ever removed: a ``--work-dir`` is the
user's (its name is not ours), a ``--keep-images`` directory is named
``migsgx-kept-...`` (kept on purpose), and a directory of a running tool (its
pid alive with the same start time; a reused pid has another) is in use.  The
names in ``/dev/shm`` are anyone's to plant: a symbolic link, something not a
directory, a directory of another user or one with a file system mounted on
it (the images tmpfs of :mod:`migsgx.containers.imagefs`, unmounted first by
its own sweep) is left alone, and the removal never follows a link inside.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import shutil
import stat
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Final

from ..system.process import process_state
from .ckpt_journal import start_time

__all__ = [
    "DUMP_PREFIX",
    "KEPT_PREFIX",
    "dump_dir_owner",
    "dump_dir_path",
    "make_dump_dir",
    "remove_dump_dir",
    "scratch_base",
    "sweep_dump_dirs",
]

log = logging.getLogger("migsgx.agent")

DUMP_PREFIX: Final = "migsgx-dump-"
#: ``--keep-images`` without ``--work-dir``: kept, so never named like a scratch directory.
KEPT_PREFIX: Final = "migsgx-kept-"
#: A scratch directory's name: the tool's pid, its start time, a random suffix.
_NAME: Final = re.compile(r"migsgx-dump-([1-9][0-9]{0,9})-([0-9]{1,20})-[a-z0-9_]{1,32}")


def scratch_base() -> Path:
    """Where the tool's images go: RAM (``/dev/shm``) where there is one."""

    shm = Path("/dev/shm")
    return shm if shm.is_dir() else Path(tempfile.gettempdir())


def dump_dir_path() -> Path:
    """The name of a fresh images directory of this tool, not made yet.

    The tool tells its guardian the name first and makes the directory then:
    whenever it dies, whoever outlives it knows what to remove.
    """

    pid = os.getpid()
    return scratch_base() / f"{DUMP_PREFIX}{pid}-{start_time(pid) or 0}-{secrets.token_hex(4)}"


def make_dump_dir(*, keep: bool = False) -> Path:
    """A fresh images directory of this tool, made (``keep``: one that outlives it on purpose)."""

    if keep:
        return Path(tempfile.mkdtemp(prefix=KEPT_PREFIX, dir=scratch_base()))
    while True:
        path = dump_dir_path()
        try:
            path.mkdir(mode=0o700)
        except FileExistsError:
            continue
        return path


def dump_dir_owner(name: str) -> tuple[int, str] | None:
    """(pid, start time) of the tool whose scratch directory is named ``name``; None if
    the name is not one of ours."""

    match = _NAME.fullmatch(name)
    return (int(match.group(1)), match.group(2)) if match else None


def _tool_gone(pid: int, start: str, dying: int) -> bool:
    if pid == dying:
        return True  # (a guardian's tool: its pipe ended, it is past its dump or dead)
    if pid == os.getpid() and start == start_time(pid):
        return False
    return start_time(pid) != start or process_state(pid) in ("", "Z", "X")


def remove_dump_dir(path: Path, *, dying: int = 0) -> bool:
    """Remove ``path`` if it is a scratch directory whose tool is gone; whether it did.

    ``dying``: a pid the caller knows is past its dump or dead (a guardian's
    tool once the pipe ended; the kernel may show it a moment longer).
    """

    path = Path(path)
    owner = dump_dir_owner(path.name)
    if owner is None or not _tool_gone(owner[0], owner[1], dying):
        return False
    try:
        parent = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return False
    try:
        try:
            st = os.stat(path.name, dir_fd=parent, follow_symlinks=False)
            here = os.fstat(parent)
        except OSError:
            return False
        if (
            not stat.S_ISDIR(st.st_mode)  # (a planted link, or a file)
            or st.st_uid != os.geteuid()
            or st.st_dev != here.st_dev  # a file system is still mounted on it
        ):
            return False
        try:
            # (with a directory descriptor: no link below is ever followed)
            shutil.rmtree(path.name, dir_fd=parent)
        except OSError as exc:
            log.warning("cannot remove a dead tool's images at %s: %s", path, exc)
            return False
        return True
    finally:
        os.close(parent)


def sweep_dump_dirs(extra: Iterable[Path] = (), *, dying: int = 0) -> list[Path]:
    """Remove every scratch directory in :func:`scratch_base` (and ``extra``, the paths
    journals record) whose tool is gone; the paths removed."""

    base = scratch_base()
    candidates: list[Path] = []
    with contextlib.suppress(OSError):
        candidates = [base / name for name in os.listdir(base) if name.startswith(DUMP_PREFIX)]
    seen: set[Path] = set()
    removed: list[Path] = []
    for path in [*candidates, *map(Path, extra)]:
        if path in seen:
            continue
        seen.add(path)
        if remove_dump_dir(path, dying=dying):
            removed.append(path)
    return removed
