"""The guardian's engine notes: which engine record a container source is.

Each container driver notes, before its dump, the record its engine keeps of
the source (``runc ID ...``, ``podman NAME ...``, ``containerd ID ...``, one
JSON object after the kind).  The tool ends that record itself after the
commit (:func:`~.frozen.end_frozen`); should it die first, or end in doubt, the
guardian or ``migsgx recover`` ends it the same way from the migration's
journal (:mod:`.committed`), which keeps these notes whole.  Only plain
values here, so that every driver and the journal's readers can import it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Final

__all__ = ["ENGINE_NOTES", "NOTE_KEYS", "engine_note", "engine_records"]

#: Per engine, the fields of its note (each a string; "" for an engine default).
#: runc: the container id, runc's state root, the bundle, and a bundle this host's
#: agent made (removed with the container).  podman: the name, podman's container
#: id (a container of that name made since has another), podman's root and storage
#: driver.  containerd: the id, containerd's socket and namespace, and the record's
#: creation time (a container of that id made since has another).
NOTE_KEYS: Final[dict[str, tuple[str, ...]]] = {
    "runc": ("id", "root", "bundle", "made"),
    "podman": ("name", "id", "root", "storage"),
    "containerd": ("id", "address", "namespace", "created"),
}
ENGINE_NOTES: Final = frozenset(NOTE_KEYS)


def engine_note(kind: str, **fields: str) -> str:
    """The note naming one engine record (exactly the fields of ``kind``)."""

    if set(fields) != set(NOTE_KEYS[kind]):
        raise ValueError(f"a {kind} note has the fields {NOTE_KEYS[kind]}, not {sorted(fields)}")
    return f"{kind} " + json.dumps(fields, sort_keys=True)


def engine_records(notes: Iterable[str]) -> list[tuple[str, dict[str, str]]]:
    """The (kind, fields) of each engine note among ``notes``; a damaged one is skipped
    (a journal is the source host's, but a skipped record only leaves a container
    for an operator, where a wrong one could remove another)."""

    found = []
    for note in notes:
        kind, _, arg = note.partition(" ")
        keys = NOTE_KEYS.get(kind)
        if keys is None:
            continue
        try:
            record = json.loads(arg)
        except ValueError:
            continue
        if isinstance(record, dict) and all(isinstance(record.get(k), str) for k in keys):
            found.append((kind, {k: str(record[k]) for k in keys}))
    return found
