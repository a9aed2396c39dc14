"""The destination's durable word that it resumed a tree without enclaves.

A migration without enclaves has no source enclave to record a decision
(``docs/spec/commit.md`` 1): its commit point is the destination agent's
``resume`` of the held tree.  Until then the agent discards the tree when the
tool goes away; from then on the destination's copy runs and the source must
never run again.  When the tool and its guardian both died after the fence,
``migsgx recover`` on the source host must learn which of the two happened,
also after the session ended (its answer to the tool was lost) or the agent
restarted.  So the agent writes a marker, ``WORK_DIR/resumed/<session id>``,
durably, right before the tree continues, and answers a ``deliver`` for a
session it no longer has from it: ``resumed`` if the marker is there, else
``unknown`` (never resumed: a session that ended without it discarded its tree,
and nothing else can resume it).  An agent that dies holding such a tree leaves
its record (:mod:`.held`); the restarted agent finishes the tree by this marker
before it listens (:mod:`.adoption`): continued with it, removed without it, so
that the answer given here is always what happened to the tree.  The marker
says nothing secret; one older than :data:`KEEP` is removed when the next one
is written.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Final

from .._fs import write_private

__all__ = ["KEEP", "forget_resumed", "mark_resumed", "was_resumed"]

DIRECTORY: Final = "resumed"
#: How long a marker is kept: far longer than any ``migsgx recover`` waits to be run.
KEEP: Final = 30 * 24 * 3600.0


def _path(work_dir: Path, session_id: bytes) -> Path:
    return Path(work_dir) / DIRECTORY / session_id.hex()


def mark_resumed(work_dir: Path, session_id: bytes) -> None:
    """Record, durably, that session ``session_id``'s tree is about to continue."""

    path = _path(work_dir, session_id)
    path.parent.mkdir(mode=0o700, exist_ok=True)
    write_private(path, b"resumed\n")
    cutoff = time.time() - KEEP
    for old in path.parent.iterdir():
        with contextlib.suppress(OSError):
            if old.stat().st_mtime < cutoff:
                old.unlink()


def was_resumed(work_dir: Path, session_id: bytes) -> bool:
    """Whether this agent (or the one before a restart) resumed ``session_id``'s tree."""

    path = _path(work_dir, session_id)
    return path.is_file() and not path.is_symlink()


def forget_resumed(work_dir: Path, session_id: bytes) -> None:
    """Remove ``session_id``'s marker: a restarted agent killed its tree before it
    ever ran (a post-copy tree, whose page window no other agent can open)."""

    with contextlib.suppress(FileNotFoundError):
        _path(work_dir, session_id).unlink()
