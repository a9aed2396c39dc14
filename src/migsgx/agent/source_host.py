"""What ``migsgx recover`` does on the source host itself, beside carrying decisions.

Whether the tool or the guardian of a migration still runs, how a source that
is the copy is given back (the guardian's undo notes, from the journal), with
its enclaves, and exactly what remains of a committed migration whose
destination has no copy.  Split from :mod:`.recover_resolve`, which decides;
nothing here talks to an agent.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path

from .. import _proc
from ..containers.cgroups import thaw_file
from ..containers.committed import CommittedRecord, committed_records
from ..containers.gate import manual_command, open_gate, parse_ungate
from ..containers.podnet import give_up, unlock
from ..errors import MigSGXError
from ..system.process import pid_exists as alive
from .handback import resume_source
from .holders import watch_holders
from .journal import Journal

__all__ = [
    "alive", "end_committed", "end_fenced", "gate_report", "give_back", "hand_back",
    "is_guardian", "lost_detail", "open_gates", "retry_gates", "signal_all",
]  # fmt: skip

log = logging.getLogger("migsgx.recover")


def lost_detail(journal: Journal, outcome: str) -> str:
    """Exactly what remains of a committed migration whose destination has no copy."""

    where = (
        "the destination agent has no session for it (it died or restarted: its loaded "
        "enclaves ended with it, the tree it held, if any, is left stopped and unowned there)"
        if outcome == "unknown"
        else "the destination's loaded copy died before its claim (the destination agent "
        "still holds its tree, stopped: remove it there by hand)"
        if outcome == "copy-lost"
        else "the destination's loaded enclaves ended before their claim and it discarded "
        "the tree it held"
    )
    stopped = [p for p in journal.fenced if alive(p)]
    return (
        f"committed (the decision stands, the source never runs again), but {where}; its "
        f"claim store never activated {len(journal.enclave_mids)} enclave id(s): no copy runs. "
        "The state was held only by the frozen committed source enclaves, which are "
        "released (or ended before). The source tree stays "
        f"stopped (pids {' '.join(map(str, stopped)) or 'none left'}): remove it by hand"
    )


def is_guardian(pid: int) -> bool:
    """Whether ``pid`` is still a migration guardian (a recycled pid gets no signal)."""

    return b"migsgx.agent.guardian" in _proc.argv(pid)


def signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def end_fenced(journal: Journal) -> None:
    """A committed source tree that is still fenced goes: it must never run again.

    For a tool that died after the destination ran and before CRIU ended the
    tree (it does once its post-dump step returns).  Only the recorded pids
    that are still stopped (the fence) are killed: one that runs is not the
    fenced task any more.  A container's (frozen, so not ``T``) goes through
    its engine (:func:`end_committed`).
    """

    if _engine_records(journal):
        end_committed(journal)
        return
    signal_all([p for p in journal.fenced_now() if _proc.state(p) in ("T", "t")], signal.SIGKILL)


def _engine_records(journal: Journal) -> list[CommittedRecord]:
    """The engine records the journal's ``runc``, ``podman`` and ``containerd`` notes
    name (a damaged one is skipped)."""

    return committed_records(journal.undo)


def end_committed(journal: Journal) -> None:
    """The committed source goes as after a success: killed, and a container's engine
    record removed (:func:`~migsgx.containers.frozen.end_frozen`).

    A container's tasks are frozen in their cgroup (which SIGKILL alone does not
    end under cgroup v1): the kill is queued first, then the cgroup thaws, and
    the engine removes the container (``runc delete``, ``podman rm``, ``ctr``),
    so that it can come back here later.  Only a record that is still the
    source's (:mod:`migsgx.containers.committed`: the fenced tree, or no task
    left, of the same record) is removed: a container of that name made since
    is never touched.  Idempotent.
    """

    records = _engine_records(journal)
    fenced = journal.fenced_now()
    open_gates(journal)  # (its listeners go with it: clients are refused, not dropped)
    ours: list[CommittedRecord] = []
    for record in records:
        try:
            if record.ours(fenced):
                ours.append(record)
        except MigSGXError as exc:
            log.warning("the committed source %s stays: %s", record.label, exc)
    signal_all(fenced, signal.SIGKILL)
    if not records:
        return
    for note in journal.undo:
        kind, _, arg = note.partition(" ")
        try:
            if kind == "thaw":
                thaw_file(arg)  # (the queued SIGKILL ends each task before it runs)
        except MigSGXError as exc:
            log.warning("ending the committed source: %s: %s", note, exc)
    for record in ours:
        try:
            record.remove()
        except MigSGXError as exc:
            log.warning("the committed source %s stays: %s", record.label, exc)
            continue
        for note in journal.undo:
            kind, _, arg = note.partition(" ")
            if kind == "netup":
                give_up(Path(arg))  # the address lives on the destination only


def open_gates(journal: Journal) -> list[str]:
    """The gate on a container's listeners opens (its ``ungate`` note), as the guardian
    opens it when the tool died: whoever holds the copy now, clients are served, or
    refused and go elsewhere, never dropped (:mod:`migsgx.containers.gate`).
    Idempotent: a rule already gone is fine.

    A gate that stays closed (its namespace not reachable from here, its rule not
    removable) keeps its note in the journal (``closed_gates``) whatever the phase,
    so that the next ``migsgx recover`` tries it again (:func:`retry_gates`) and
    says so; before, it was said on the log alone and the journal still ended
    ``done``, so nothing tried again and the source's listeners stayed closed to
    new clients.  Returns those notes.
    """

    closed = [
        note for note in journal.undo
        if (gate := parse_ungate(note)) is not None and not open_gate(*gate)
    ]  # fmt: skip
    if closed or journal.closed_gates:
        journal.update(closed_gates=closed)
    return closed


def retry_gates(journal: Journal) -> list[dict[str, object]]:
    """The gates this journal keeps closed (``closed_gates``), tried again; what still
    stays closed, each with the manual command (``migsgx recover --json``'s
    ``closed_gates``).  Idempotent; a journal with none costs nothing."""

    if not journal.closed_gates:
        return []
    still = []
    for note in journal.closed_gates:
        gate = parse_ungate(note)
        if gate is not None and not open_gate(*gate):
            still.append(note)
    journal.update(closed_gates=still)
    return [gate_report(note) for note in still]


def gate_report(note: str) -> dict[str, object]:
    """A gate that stays closed, as ``recover`` reports it."""

    netns, ports, inode = parse_ungate(note) or ("?", [], 0)
    return {
        "note": note, "netns": netns, "netns_inode": inode, "ports": ports,
        "message": (
            f"the gate on port(s) {','.join(map(str, ports))} stays closed: new clients of the "
            f"source's listeners are dropped; its network namespace (inode {inode}, noted as "
            f"{netns}) is not reachable from here, or its rule could not be removed. Run "
            "migsgx recover where that namespace is reachable, or by hand: "
            + manual_command(netns, ports)
        ),
    }  # fmt: skip


def give_back(journal: Journal) -> None:
    """The source is the copy: it runs again, a container with its address.

    What the guardian would have done (:mod:`.guardian`), from the journal's
    ``undo`` notes: a post-copy CRIU that still holds the tree is ended (only a
    process that is still runc's or CRIU's: a pid may have been reused), the
    pod's ``eth0`` comes up, the gate on its listeners opens, the cgroup thaws,
    the fenced tasks continue.
    Idempotent: a source the guardian gave back already is left as it runs.
    """

    notes = journal.undo
    open_gates(journal)
    serving = [int(p) for n in notes if n.startswith("criu ") for p in n.split()[1:]
               if p.isascii() and p.isdigit() and 0 < int(p) < 1 << 31]  # fmt: skip
    killed = []
    for pid in serving:
        argv0 = _proc.argv(pid)[:1]
        if argv0 and Path(argv0[0].decode(errors="replace")).name.startswith(("criu", "runc")):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
    # (CRIU must have let go before SIGCONT can stick; a reused pid left alone is not
    # waited for: it would hold the source frozen for the whole bound)
    for pid in killed:
        deadline = time.monotonic() + 10
        while alive(pid) and _proc.state(pid) != "Z" and time.monotonic() < deadline:
            time.sleep(0.02)
    for note in notes:
        kind, _, arg = note.partition(" ")
        try:
            if kind == "netup" and Path(arg).exists():
                unlock(Path(arg))
            elif kind == "thaw":
                thaw_file(arg)
        except (MigSGXError, OSError, ValueError) as exc:  # (a path with a NUL: ValueError)
            log.warning("giving the source back: %s: %s", note, exc)
    signal_all(journal.fenced_now(), signal.SIGCONT)


def hand_back(
    journal: Journal, socks: list[socket.socket], log: Callable[[str], None] | None = None
) -> str:
    """The source is the copy: it runs again and takes its enclaves' connections back
    (``socks``, in the journal's order); then the holders are forgotten.

    For ``migsgx recover`` after it took the enclaves back and aborted them
    (:mod:`.recover_orphans`), and for whoever revoked a commit
    (:meth:`.redeliver.HeldSource.revoke`).  The enclaves keep their duplicates
    until the application has its connections again (it tells them,
    ``__mig_unhold``), so a crash before that loses nothing; afterwards the
    recorded numbers may name another descriptor (a later migration's
    duplicate) and are cleared.  A note for the outcome's detail; ``log``, where
    the hand-back's trouble is said (:func:`.handback.resume_source`'s own if None).
    """

    app_pid, app_name = int(journal.data["app_pid"]), str(journal.data["app_name"])
    if socks and alive(app_pid):
        watch_holders(socks, journal.holders, app_pid)  # (read before the tree continues)
    give_back(journal)
    told = {"log": log} if log is not None else {}
    failed = resume_source(app_pid, app_name, socks, journal.fenced_now(), [], **told)
    journal.update(holders=[])
    return "the enclaves were not taken back" if failed else "enclaves handed back"
