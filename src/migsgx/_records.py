"""Decoding of the small JSON records migsgx keeps on disk, whatever the bytes are.

Journals, held-tree records and checkpoint metadata are read back after a
crash, a full disk or a local user's edit: truncated, bit-flipped, nested a
million deep or merely of the wrong type.  ``json`` answers those with
``ValueError``, ``UnicodeDecodeError``, ``RecursionError`` or a value of any
type; this module turns every one of them into :class:`RecordDamagedError`
(one stable code), so no caller ever sees a decoder's own exception.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path
from typing import Any, Final, TypeGuard

from .errors import RecordDamagedError

__all__ = [
    "MAX_RECORD", "hex_text", "json_record", "non_negative_int", "own_record", "regular_bytes",
]  # fmt: skip

#: No record migsgx writes comes near this; a bigger file is not one of ours.
MAX_RECORD: Final = 1 << 20


def json_record(raw: bytes | str, what: str) -> dict[str, Any]:
    """The JSON object in ``raw``, or :class:`RecordDamagedError` naming ``what``."""

    if len(raw) > MAX_RECORD:
        raise RecordDamagedError(f"{what} is damaged: {len(raw)} bytes, more than any record")
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise RecordDamagedError(f"{what} is damaged: not JSON") from exc
    if not isinstance(value, dict):
        raise RecordDamagedError(f"{what} is damaged: not a JSON object")
    return value


def own_record(path: Path, what: str, *, private: bool = False) -> bytes:
    """The bytes of the record at ``path`` if this process's user wrote it, else
    :class:`RecordDamagedError` (``what`` names the kind, for the message).

    A record that makes migsgx kill, remove or signal what it names counts only
    as a regular file of this user's that neither its group nor others may
    write: not a symbolic link (not followed), not a FIFO (never waited on),
    not a file another user planted.  Checked on the descriptor it is read
    from; at most :data:`MAX_RECORD` (and one) bytes are read.  ``private``: nor
    may group or others read it (a record written 0600).
    """

    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno != errno.ELOOP:
            raise
        raise RecordDamagedError(f"{path} is a symbolic link, not {what}") from exc
    try:
        st = os.fstat(fd)
        others = 0o077 if private else 0o022
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & others:
            raise RecordDamagedError(
                f"{path} is not {what} this user wrote (uid {st.st_uid}, "
                f"mode {st.st_mode & 0o7777:o})"
            )
        with os.fdopen(os.dup(fd), "rb") as file:
            return file.read(MAX_RECORD + 1)
    finally:
        os.close(fd)


def regular_bytes(path: Path) -> bytes:
    """The bytes of ``path`` if it is a regular file; an :class:`OSError` for anything
    else (a FIFO is never waited on: a read of one without a writer never returns)."""

    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        with os.fdopen(os.dup(fd), "rb") as file:
            return file.read()
    finally:
        os.close(fd)


def non_negative_int(value: object, limit: int = 1 << 63) -> TypeGuard[int]:
    """Whether ``value`` is a plain int in ``[0, limit)`` (``True`` is not a count)."""

    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < limit


def hex_text(value: object, size: int | None = None) -> bool:
    """Whether ``value`` is lowercase-or-uppercase hex text (of ``size`` bytes, if given)."""

    if not isinstance(value, str):
        return False
    try:
        raw = bytes.fromhex(value)
    except ValueError:
        return False
    return size is None or len(raw) == size
