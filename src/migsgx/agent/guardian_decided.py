"""What the guardian does once the decision is not (or no longer) its own to make.

``migsgx recover``'s logic, run by the guardian of a dead tool: a migration's
decision carried to the destination with a growing pause while in doubt
(:func:`carry`), the committed enclaves delivered again or released, the
undecided ones committed once another of the migration committed
(:func:`roller`); a checkpoint resolved by ``migsgx recover --checkpoint``'s
function (:func:`resolve_checkpoint_of`); a restore whose tool died while
activating finished (:func:`finish_restore`; an attach that fails there is
recorded in the checkpoint's journal, :mod:`.ckpt_attach`).
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Final

from ..errors import MigSGXError
from .faults import fault
from .guardian_log import RECOVER_PATIENCE, log, log_to, pause
from .handback import attach_when_running, call_enclave, commit_rest

if TYPE_CHECKING:
    from .recover_records import Resolution
    from .recover_resolve import RollForward
    from .redeliver import HeldSource

__all__ = ["carry", "finish_restore", "held_source", "resolve_checkpoint_of", "roller"]

#: How long the guardian's first attempt may report on the tool's stderr.
FIRST_WORD: Final = 1.0


def held_source(socks: list[socket.socket], notes: list[str]) -> HeldSource | None:
    """The committed enclaves' connections and what their offers name, from the tool's notes."""

    from .redeliver import HeldEnclave, HeldSource  # lazy: only after a commit

    held = {}
    for note in notes:
        parts = note.split()
        if parts[0:1] == ["enclave"] and len(parts) == 3 and parts[1].isdigit():
            index = int(parts[1])
            if index < len(socks):
                try:
                    held[index] = HeldEnclave.parse(socks[index], parts[2])
                except MigSGXError as exc:
                    log(f"enclave {index} cannot be delivered again: {exc}")
    return HeldSource(held) if held else None


def roller(socks: list[socket.socket]) -> RollForward:
    """What commits the undecided enclaves once another of the migration committed."""

    def roll_forward(indexes: list[int]) -> None:
        commit_rest(dict(enumerate(socks)), indexes, log)

    return roll_forward


def carry(
    path: Path, held: HeldSource | None = None, roll_forward: RollForward | None = None
) -> None:
    """``migsgx recover`` for this migration, again with a growing pause while in doubt.

    ``held``: the committed source enclaves, which deliver their state again if
    the destination lost its copy, and are released once it runs (or never can):
    each holds a duplicate of its own connection, so this process's end is no
    end of file for it.  ``roll_forward`` commits the undecided ones once another
    of the migration committed.
    """

    from .journal import Journal  # lazy: the guardian starts fast and imports little
    from .recover_resolve import resolve
    from .tls import AgentIdentity

    def attempt() -> Resolution:
        journal = Journal.load(path)
        agent_dir = path.parent.parent
        return resolve(
            journal, agent_dir.parent, AgentIdentity(agent_dir), tool_gone=True,
            redeliver=held.redeliver if held else None,
            release=held.release if held else None, roll_forward=roll_forward,
            revoke=held.revoke if held else None,
        )  # fmt: skip

    pause_s = 0.5
    deadline = time.monotonic() + RECOVER_PATIENCE
    first = True
    while True:
        try:
            result = _first_attempt(attempt, path) if first else attempt()
        except (MigSGXError, OSError, ValueError) as exc:
            log(f"recovery of {path.name} failed: {exc}; run migsgx recover")
            return
        first = False
        log(f"migration {result.mid}: {result.decision} -> {result.outcome} {result.detail}")
        # An ABORT the destination has not heard yet (its agent unreachable: it may come
        # back and adopt a held tree) is carried again too: nothing is left for an operator.
        untold = result.decision == "abort" and Journal.load(path).phase != "done"
        if not result.in_doubt and not untold:
            return
        log_to(path.with_suffix(".log"))
        if time.monotonic() > deadline or fault("guardian.retry") == "give-up":
            # The enclaves keep their state (and their duplicates): ``migsgx recover``
            # takes them back once the destination can take the state again.
            log(f"migration {result.mid} is still in doubt: run migsgx recover")
            return
        # recover asked: at once, then the pauses grow again
        pause_s = 0.5 if pause(pause_s) else min(pause_s * 2, 30.0)


def _first_attempt(attempt: Callable[[], Resolution], path: Path) -> Resolution:
    """The first attempt, on the tool's stderr only while it is quick.

    An attempt can block on a destination agent that does not answer (its connect
    bound, :data:`~.control.CONNECT_TIMEOUT`); the tool's caller reads that stderr
    to its end, so after :data:`FIRST_WORD` seconds the guardian reports into the
    journal's log instead, as it does while it waits (:func:`log_to`).
    """

    outcome: list[Resolution] = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            outcome.append(attempt())
        except BaseException as exc:  # handed to the caller as raised
            failure.append(exc)

    worker = threading.Thread(target=run, name="first-attempt", daemon=True)
    worker.start()
    worker.join(FIRST_WORD)
    if worker.is_alive():
        log_to(path.with_suffix(".log"), "the destination has not answered yet")
        worker.join()
    if failure:
        raise failure[0]
    return outcome[0]


def resolve_checkpoint_of(
    directory: Path, *, aborted: bool, held: list[socket.socket] | None = None
) -> None:
    """``migsgx recover --checkpoint`` for this checkpoint, once the tool died.

    ``aborted``: every live enclave answered this guardian's abort, so nothing
    was committed (no gate needs reading).  Otherwise the gates decide, read
    through this host's platform socket (``$MIGSGX_PLATFORM_SOCKET`` or the
    default).
    """

    from ..host.client import platform_socket  # lazy: the guardian starts fast
    from .ckpt_recover import resolve_checkpoint

    try:
        sock = None if aborted else platform_socket(None)
        result = resolve_checkpoint(directory, sock, aborted=aborted, held=held)
    except (MigSGXError, OSError, ValueError) as exc:
        log(f"checkpoint {directory}: {exc}; run migsgx recover --checkpoint")
        return
    log(f"checkpoint {directory}: {result.decision} -> {result.outcome} {result.detail}")


def finish_restore(
    pid: int, socks: list[socket.socket], infos: bytes, directory: Path | None = None
) -> int:
    """The restore tool died while activating: finish it (activate, continue, attach).

    An attach that fails once the tree runs leaves the application without its
    enclaves: that is written into the checkpoint's journal in ``directory``
    (:func:`.ckpt_attach.note_unattached`), so that every ``migsgx recover
    --checkpoint`` tries it again, and says ``lost`` once the enclaves are gone."""

    import cbor2  # lazy: only a restore needs it

    from ..host.appctl import info_from_wire
    from ..host.client import EnclaveInfo
    from ..system.process import continue_tree

    log(f"the restore tool died while activating: finishing the restore of {pid}")
    for sock in socks:
        # Each claims its checkpoint id once: an enclave the tool activated
        # already answers with an error and runs on.
        call_enclave(sock, "__ckpt_activate", [])
    try:
        continue_tree(pid)
    except MigSGXError as exc:
        log(f"the restored tree is gone: {exc}")
        return 1
    enclaves = [EnclaveInfo(**info_from_wire(i)) for i in cbor2.loads(infos)]
    try:
        fault("restore.attach")  # (``fail``: an application that does not take them)
        attach_when_running(pid, socks, enclaves)  # (the application answers once it runs)
    except MigSGXError as exc:
        log(f"could not attach the enclaves to {pid}: {exc}")
        if directory is not None:
            from .ckpt_attach import note_unattached

            try:
                note_unattached(directory, pid, len(socks), str(exc))
            except (MigSGXError, OSError) as failed:
                log(f"could not record the failed attach in {directory}: {failed}")
            else:
                log(f"recorded in {directory}: run migsgx recover --checkpoint to attach them")
        return 1
    if directory is not None:
        from .ckpt_attach import note_restored

        with contextlib.suppress(MigSGXError, OSError):
            note_restored(directory, pid)
    log(f"restore of {pid} finished: {len(socks)} enclave(s) attached")
    return 0
