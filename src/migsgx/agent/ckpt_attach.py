"""A restore finished by someone else than its tool, and an attach that failed, on record.

A restore's tool and guardian died after the activation (a gate consumed):
``migsgx recover --checkpoint`` takes the enclaves' duplicates back, activates,
continues the held tree and attaches the enclaves (:func:`finish_restore`); the
restore's guardian does the same while it lives (``guardian_decided``).

Once the tree was continued, an attach that fails (the application does not
answer, or refuses) leaves the application running without its enclaves.  That
is written into the checkpoint's journal (``unattached``: the tree's pid and
start time, the enclaves not attached, the error), with the phase left
``restoring`` and the enclaves' ``holders`` kept, so that every later recover
says the same (:func:`retry_attach`):

* the tree runs and every enclave not attached still lives (it holds the state
  and a duplicate of its connection, ``__mig_hold``): the duplicates are taken
  back and the attach asked again (idempotent); ``restored`` once it succeeds,
  ``in-doubt`` (exit 7) while it does not;
* the tree or an enclave is gone: the state of the enclaves not attached is
  gone with it, ``lost`` (exit 10), said again by every later recover; never
  ``done``.
"""

from __future__ import annotations

import contextlib
import socket
from pathlib import Path
from typing import Any, Final

from .._records import non_negative_int
from ..errors import MigSGXError
from ..system.process import continue_tree, process_state
from .ckpt_journal import (
    HELD,
    MAX_CHECKPOINT_ENCLAVES,
    held_tree,
    restore_infos,
    start_time,
    write_journal,
)
from .faults import fault
from .handback import attach_when_running, call_enclave
from .holders import take_held
from .recover_records import Resolution

__all__ = [
    "UNATTACHED", "finish_restore", "note_restored", "note_unattached", "retry_attach",
    "unattached_of",
]  # fmt: skip

#: The journal's field naming a continued tree whose enclaves could not be attached.
UNATTACHED: Final = "unattached"
#: How much of the attach's error the journal keeps.
ERROR_CHARS: Final = 400


def note_unattached(directory: Path, pid: int, count: int, error: str) -> None:
    """Record that the continued tree ``pid`` runs without its ``count`` enclaves (the
    attach failed with ``error``); the phase stays ``restoring``, the holders kept."""

    record = {"pid": pid, "start": start_time(pid), "enclaves": list(range(count)),
              "error": error[:ERROR_CHARS]}  # fmt: skip
    write_journal(Path(directory), "restoring", **{UNATTACHED: record})


def unattached_of(journal: dict[str, Any]) -> dict[str, Any] | None:
    """The journal's ``unattached`` record if it has the shape :func:`note_unattached`
    writes; None if there is none.  Raises :class:`ValueError` if it is damaged."""

    found = journal.get(UNATTACHED)
    if found is None:
        return None
    ok = (
        isinstance(found, dict)
        and non_negative_int(found.get("pid"), 1 << 31)
        and found.get("pid") != 0
        and isinstance(found.get("start"), str)
        and isinstance(found.get("error"), str)
        and isinstance(found.get("enclaves"), list)
        and 0 < len(found["enclaves"]) <= MAX_CHECKPOINT_ENCLAVES
        and all(non_negative_int(i, MAX_CHECKPOINT_ENCLAVES) for i in found["enclaves"])
    )
    if not ok:
        raise ValueError(f"the journal's {UNATTACHED!r} record is damaged")
    return dict(found)


def _runs(pid: object, start: object) -> bool:
    return (
        isinstance(pid, int)
        and not isinstance(pid, bool)
        and 0 < pid < 1 << 31
        and isinstance(start, str)
        and start != ""
        and start_time(pid) == start
        and process_state(pid) not in ("", "Z", "X")
    )


def _holder_runs(holders: object, index: int) -> bool:
    items = holders if isinstance(holders, list) else []
    item = items[index] if index < len(items) else None
    return isinstance(item, list) and len(item) >= 3 and _runs(item[0], item[2])


def _attach(pid: int, socks: list[socket.socket], infos: list[Any]) -> None:
    # Killed or failed here (``fail``: an application that does not take them), the
    # tree runs without its enclaves: the caller records it.
    fault("restore.attach")
    attach_when_running(pid, socks, infos)


def note_restored(directory: Path, pid: int) -> None:
    """The tree ``pid`` runs with its enclaves attached: the restore ended (the
    application let the duplicates go, their numbers may be reused now)."""

    with contextlib.suppress(OSError):
        (Path(directory) / HELD).unlink()
    write_journal(Path(directory), "restored", restored_pid=pid, holders=[], **{UNATTACHED: None})


def _attached(directory: Path, pid: int, count: int, what: str) -> Resolution:
    note_restored(directory, pid)
    return Resolution(str(directory), "restoring", "commit", "restored",
                      f"{what}: {count} enclave(s) attached to {pid}")  # fmt: skip


def _unattached(directory: Path, pid: int, count: int, exc: Exception) -> Resolution:
    note_unattached(directory, pid, count, str(exc))
    return Resolution(
        str(directory), "restoring", "commit", "in-doubt",
        f"the restored application {pid} runs (continued) without its {count} enclave(s): "
        f"the attach failed ({exc}); they live and hold the state: run migsgx recover "
        f"--checkpoint {directory} again to attach them",
    )  # fmt: skip


def finish_restore(directory: Path, journal: dict[str, Any], name: str) -> Resolution:
    """A restore's tool and guardian died after a gate was consumed: finish what the
    guardian would have.  The enclaves' duplicates (``holders``) are taken back
    (:func:`.holders.take_held`, nonce checked), each activated (an active one
    refuses), the held tree continued and the enclaves attached (the application
    lets the duplicates go): ``restored``.  An attach that fails once the tree was
    continued is recorded (:func:`note_unattached`): ``in-doubt``, and every later
    recover tries it again (:func:`retry_attach`).  A tree no longer held, with no
    such record, was continued by its restore or is gone: ``done``."""

    directory = Path(directory)
    if journal.get(UNATTACHED) is not None:
        return retry_attach(directory, journal)
    pid = held_tree(directory)
    holders = journal.get("holders")
    items = holders if isinstance(holders, list) else []
    if pid is None or not items:
        return Resolution(name, "restoring", "commit", "done",
                          "a restore consumed the checkpoint (it restores only once)")  # fmt: skip
    taken = take_held(items)
    continued = False
    try:
        if len(taken) != len(items):
            missing = ", ".join(str(i) for i in range(len(items)) if i not in taken)
            return Resolution(
                name, "restoring", "commit", "in-doubt",
                f"the restored tree {pid} is held and enclave(s) {missing} cannot be "
                "taken back (gone, or not answering): an operator decides",
            )  # fmt: skip
        infos = restore_infos(journal)
        if len(infos) != len(items):
            return Resolution(name, "restoring", "commit", "in-doubt",
                              "the journal does not describe the enclaves")  # fmt: skip
        socks = [taken[i] for i in range(len(items))]
        for sock in socks:
            call_enclave(sock, "__ckpt_activate", [])  # (claimed once: an active one refuses)
        continue_tree(pid)
        continued = True
        _attach(pid, socks, infos)
    except MigSGXError as exc:
        if continued:
            return _unattached(directory, pid, len(items), exc)
        return Resolution(name, "restoring", "commit", "in-doubt",
                          f"the restore of {pid} could not be finished: {exc}")  # fmt: skip
    finally:
        for sock in taken.values():
            sock.close()
    return _attached(directory, pid, len(items), "the restore finished")


def retry_attach(directory: Path, journal: dict[str, Any]) -> Resolution:
    """The journal records a continued tree its enclaves could not be attached to: try
    the attach again while the tree and every enclave live; ``lost`` once either is
    gone (the state of the enclaves not attached went with them)."""

    directory, name = Path(directory), str(directory)
    try:
        record = unattached_of(journal)
    except ValueError as exc:
        return Resolution(name, "restoring", "commit", "in-doubt",
                          f"{exc}: an operator decides (the application may run "
                          "without its enclaves)")  # fmt: skip
    assert record is not None
    pid, indices = int(record["pid"]), [int(i) for i in record["enclaves"]]
    holders = journal.get("holders")
    gone = [i for i in indices if not _holder_runs(holders, i)]
    said = f"enclave(s) {', '.join(str(i) for i in indices)} (the attach failed: {record['error']})"
    if not _runs(pid, record["start"]):
        return Resolution(name, "restoring", "commit", "lost",
                          f"the restored application {pid} is gone, never attached to "
                          f"{said}: their state is gone")  # fmt: skip
    if gone:
        return Resolution(name, "restoring", "commit", "lost",
                          f"the restored application {pid} runs without {said}; enclave(s) "
                          f"{', '.join(map(str, gone))} ended: their state is gone")  # fmt: skip
    infos = restore_infos(journal)
    taken = take_held(holders)
    try:
        missing = [i for i in indices if i not in taken]
        if missing or len(infos) != len(indices) or len(indices) != len(taken):
            return Resolution(name, "restoring", "commit", "in-doubt",
                              f"the restored application {pid} runs without {said}; they "
                              "live but cannot be taken back (not answering): run "
                              "migsgx recover --checkpoint again")  # fmt: skip
        _attach(pid, [taken[i] for i in indices], infos)
    except MigSGXError as exc:
        return _unattached(directory, pid, len(indices), exc)
    finally:
        for sock in taken.values():
            sock.close()
    return _attached(directory, pid, len(indices), "attached on a later recover")
