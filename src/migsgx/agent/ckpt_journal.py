"""The journal of a checkpoint directory: which tool works on it, and how far it got.

``migsgx checkpoint`` and ``migsgx restore`` write it (atomically, fsynced) at
each step, so that ``migsgx recover --checkpoint DIR`` can tell, after a crash,
a checkpoint in progress from one whose tool died, and which source tree is
its own.  It is a hint, never the decision: whether the checkpoint committed
is what the enclaves' gates in the platform store say
(:mod:`migsgx.agent.ckpt_recover`).

Phases: ``writing`` (the enclaves write their state; CRIU has not finished),
``fenced`` (in CRIU's ``post-dump``: metadata durable, source stopped),
``committed`` (every enclave gave its state up), ``done`` (the checkpoint tool
ended well), ``aborted`` (rolled back: the source runs on, nothing restores),
``restoring`` (a restore started; it may consume the gates), ``restored``.

A restore writes, with ``restoring``, ``holders`` (as a checkpoint does: per
enclave ``[pid, fd, start, nonce]``, the duplicate of its connection each of its
enclaves holds from before the activation until the tree has its connections)
and ``infos`` (hex, the enclaves' descriptions the application is attached
with), so that ``migsgx recover --checkpoint`` can finish a restore whose tool
and guardian both died after the activation.

``source_lost``: the source enclaves found dead before their gates committed
(their state is gone), each as ``migsgx recover --json`` names a migration's
(``lost_enclaves``: index, MRENCLAVE, pid, ``migration_id`` empty); written by
the tool (exit 11) and by whoever resolves the checkpoint (:func:`note_lost`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
from pathlib import Path
from typing import Any, Final

from .. import _proc
from .._fs import write_durably
from .._records import json_record, non_negative_int, own_record
from ..errors import MigSGXError, RecordDamagedError
from ..system.process import kill_tree, process_state

__all__ = [
    "CHECKPOINT_META",
    "HELD",
    "JOURNAL",
    "MAX_CHECKPOINT_ENCLAVES",
    "held_tree",
    "lost_of",
    "note_lost",
    "read_journal",
    "read_metadata",
    "remove_fenced_source",
    "remove_held_leftover",
    "restore_infos",
    "start_time",
    "working",
    "write_journal",
]

JOURNAL: Final = "checkpoint-journal.json"
#: More enclaves than a checkpoint's metadata may declare (a bound on forged counts).
MAX_CHECKPOINT_ENCLAVES: Final = 64
CHECKPOINT_META: Final = "migsgx.json"
#: The pid (and start time) of a tree a restore holds, until it continues.
HELD: Final = "restore-held.json"
PHASES: Final = frozenset(
    {"writing", "fenced", "committed", "done", "aborted", "restoring", "restored"}
)


def start_time(pid: int) -> str:
    """The start time of ``pid`` (clock ticks since boot), or "" if it is gone."""

    started = _proc.start_time(pid)
    return str(started) if started else ""


def _runs(pid: object, start: object) -> bool:
    """``pid`` runs (not a zombie) with ``start`` time, and is not this process."""

    if not isinstance(pid, int) or not non_negative_int(pid, 1 << 31) or pid == os.getpid():
        return False
    return (
        isinstance(start, str)
        and start != ""
        and start_time(pid) == start
        and process_state(pid) not in ("", "Z", "X")
    )


def working(journal: dict[str, Any] | None) -> str | None:
    """Who still works on the checkpoint the journal is of, or None: the tool that wrote
    it last (a checkpoint or a restore) or the guardian it records (either one's), if
    it runs with its recorded start time.  Such a party may hold the tree the journal
    and the metadata name (fenced, or restored and held) and will continue or kill it
    itself: nobody else may."""

    if journal is None:
        return None
    if _runs(journal.get("tool_pid"), journal.get("tool_start")):
        return f"its tool (pid {journal['tool_pid']})"
    found = journal.get("guardian")
    if isinstance(found, list) and len(found) == 2 and _runs(found[0], found[1]):
        return f"its guardian (pid {found[0]})"
    return None


def read_journal(directory: Path) -> dict[str, Any] | None:
    """The journal's fields, or None if there is none or it is damaged (a hint only).

    Only the restoring user's own file counts (:func:`~migsgx._records.own_record`):
    a checkpoint directory may be writable by others (its files are checked by
    their digests, this one is not), and a journal names descriptors to take
    (``holders``), a tree to continue and an application to hand them to.
    """

    path = Path(directory) / JOURNAL
    try:
        data = json_record(own_record(path, "a checkpoint journal"), f"checkpoint journal {path}")
    except (OSError, RecordDamagedError):
        return None
    phase = data.get("phase")
    return data if isinstance(phase, str) and phase in PHASES else None


def write_journal(directory: Path, phase: str, **fields: Any) -> None:
    """Record ``phase`` (and ``fields``) for this tool; earlier fields are kept."""

    if phase not in PHASES:
        raise ValueError(f"unknown checkpoint phase {phase!r}")
    directory = Path(directory)
    data = read_journal(directory) or {}
    data.update(fields, phase=phase, tool_pid=os.getpid(), tool_start=start_time(os.getpid()))
    write_durably(directory / JOURNAL, (json.dumps(data, sort_keys=True) + "\n").encode())


def lost_of(journal: dict[str, Any]) -> list[dict[str, Any]]:
    """The journal's ``source_lost`` entries that have the shape it writes."""

    found = journal.get("source_lost")
    return [
        e for e in (found if isinstance(found, list) else [])
        if isinstance(e, dict) and non_negative_int(e.get("index"), MAX_CHECKPOINT_ENCLAVES)
        and isinstance(e.get("mr_enclave"), str) and non_negative_int(e.get("pid"), 1 << 31)
        and isinstance(e.get("migration_id"), str)
    ]  # fmt: skip


def note_lost(directory: Path, journal: dict[str, Any], indices: list[int]) -> list[dict[str, Any]]:
    """``source_lost`` with the enclaves ``indices`` added (their pid from the journal's
    ``holders``, their MRENCLAVE from their image in the checkpoint, read before its
    files go): what the resolution writes back."""

    named = {e["index"]: e for e in lost_of(journal)}
    holders = journal.get("holders")
    holders = holders if isinstance(holders, list) else []
    for index in indices:
        if index in named or not non_negative_int(index, MAX_CHECKPOINT_ENCLAVES):
            continue
        item = holders[index] if index < len(holders) else None
        pid = item[0] if isinstance(item, list) and item else 0
        pid = pid if non_negative_int(pid, 1 << 31) else 0
        named[index] = {"index": index, "mr_enclave": _measure(directory, index), "pid": pid,
                        "migration_id": ""}  # fmt: skip
    return [named[i] for i in sorted(named)]


def _measure(directory: Path, index: int) -> str:
    """MRENCLAVE (hex) of enclave ``index``'s image in the checkpoint; "" if unreadable."""

    import cbor2

    from ..errors import ImageError
    from ..sgx.image import EnclaveImage

    try:
        files = cbor2.loads((Path(directory) / f"enclave-{index}.image").read_bytes())
        return EnclaveImage.from_files(files).measure().hex()
    except (OSError, ValueError, TypeError, AttributeError, ImageError, cbor2.CBORDecodeError):
        return ""


def read_metadata(directory: Path) -> bytes:
    """The bytes of the checkpoint's ``migsgx.json``, under the journal's owner rule.

    An :class:`OSError` when there is none (nor a regular file there: a FIFO is
    never waited on); :class:`RecordDamagedError` when it is a symbolic link or
    not a file of this user's that neither group nor others may write
    (:func:`~migsgx._records.own_record`).  The metadata names a tree that
    ``recover`` and ``restore`` kill (:func:`remove_fenced_source`) or continue,
    and a checkpoint directory may be writable by others: a file another user
    planted there is no checkpoint of this user's and orders nothing.
    """

    path = Path(directory) / CHECKPOINT_META
    mode = os.lstat(path).st_mode
    if not stat.S_ISREG(mode) and not stat.S_ISLNK(mode):
        raise OSError(errno.EINVAL, "not a regular file", str(path))
    return own_record(path, "checkpoint metadata")


def remove_fenced_source(meta: dict[str, object]) -> None:
    """The checkpoint's source, if a dead checkpoint tool left it fenced (stopped).

    ``meta`` must come from :func:`read_metadata` (this user's own file): it
    names the process that is killed.

    The metadata exists only once CRIU's images were complete, and the fence
    came after it: a stopped source with the recorded pid and start time is the
    tree the checkpoint replaces, and it must never run beside the restore.
    """

    pid, start = meta.get("pid"), meta.get("start")
    if not isinstance(pid, int) or not isinstance(start, str) or not start:
        return
    if start_time(pid) == start and process_state(pid) in ("T", "t"):
        with contextlib.suppress(MigSGXError):
            kill_tree(pid)


def remove_held_leftover(directory: Path) -> None:
    """A tree an earlier restore left held (stopped, never continued) goes first.

    It holds the checkpoint's pids and the application's abstract socket name,
    so no restore could succeed beside it; it never ran an instruction.  Only a
    stopped process with the recorded start time is touched (not a reused pid).
    """

    pid = held_tree(directory)
    if pid is not None:
        with contextlib.suppress(MigSGXError):
            kill_tree(pid)
    with contextlib.suppress(OSError):
        (directory / HELD).unlink()


def held_tree(directory: Path) -> int | None:
    """The pid of the tree a restore of ``directory`` holds (stopped, never continued
    since), or None: from ``restore-held.json`` (this user's own file), only a stopped
    process with the recorded start time (not a reused pid)."""

    try:
        raw = own_record(directory / HELD, "a restore record")
        held = json_record(raw, f"restore record {directory / HELD}")
    except (OSError, RecordDamagedError):
        return None
    pid, start = held.get("pid"), held.get("start")
    if not non_negative_int(pid, 1 << 31) or not isinstance(start, str) or not start:
        return None
    if start_time(pid) == start and process_state(pid) in ("T", "t"):
        return int(pid)
    return None


def restore_infos(journal: dict[str, Any]) -> list[Any]:
    """The enclaves' descriptions a restore recorded (``infos``), or [] if damaged."""

    import cbor2

    from ..host.appctl import info_from_wire
    from ..host.client import EnclaveInfo

    packed = journal.get("infos")
    try:
        items = cbor2.loads(bytes.fromhex(packed)) if isinstance(packed, str) else []
        return [EnclaveInfo(**info_from_wire(item)) for item in items]
    except (ValueError, TypeError, KeyError, MigSGXError, cbor2.CBORDecodeError):
        return []
