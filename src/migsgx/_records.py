"""Decoding of the small JSON records migsgx keeps on disk, whatever the bytes are.

Journals, held-tree records and checkpoint metadata are read back after a
crash, a full disk or a local user's edit: truncated, bit-flipped, nested a
million deep or merely of the wrong type.  ``json`` answers those with
``ValueError``, ``UnicodeDecodeError``, ``RecursionError`` or a value of any
type; this module turns every one of them into :class:`RecordDamagedError`
(one stable code), so no caller ever sees a decoder's own exception.
"""

from __future__ import annotations

import json
from typing import Any, Final, TypeGuard

from .errors import RecordDamagedError

__all__ = ["MAX_RECORD", "hex_text", "json_record", "non_negative_int"]

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
