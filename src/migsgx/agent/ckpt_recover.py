"""``migsgx recover --checkpoint DIR``: a checkpoint or restore that a crash left undecided.

The decision is durable and not the tool's: each enclave's *gate* in the host's
platform store says whether its source committed (``docs/spec/checkpoint.md``).
Only an enclave can read a gate, so the probe launches a fresh enclave of each
image (only the one ``migsgx.json`` records, checked first) and asks it to open
its checkpoint (``__ckpt_in``, with the digest of the metadata); it refuses
unless the gate is committed, and is then discarded (a read changes nothing).
The directory's journal (:mod:`.ckpt_journal`) names the tool and the source
tree, and tells a restore under way from one that ended.

The checkpoint's guardian runs this same function once the tool died
(``aborted`` when every enclave answered its abort).

Resolution, idempotent, to exactly one runnable copy:

* the tool still runs, or its guardian (waited for up to ``GUARDIAN_WAIT``):
  nothing is done (``in-progress``);
* every gate committed: the checkpoint is the copy.  A source tree a dead tool
  left fenced (stopped, same pid and start time) is killed: it must never run
  beside it; a tree a dead restore left held is removed (it never ran); a
  source enclave still holding its duplicate (its gate commit went unanswered,
  ``decision-unknown``) is asked to abort, finds its gate committed and ends.
  The outcome is ``restorable``: ``migsgx restore --dir`` makes it run;
* no gate committed: the source is the copy.  A fenced source is continued;
  source enclaves whose tool and guardian both died still hold their state and
  a duplicate of their connection (``__mig_hold``): it is taken back, each is
  told who holds its connection now (``__mig_watch``, read before the tree
  continues), they abort (the gate goes) and are handed back to the application; the
  checkpoint's files, which can never open, are removed (``stayed``, or
  ``gone`` if the source died too: then its enclave state went with it, as in
  a crash);
* some committed, others still pending (the tool died between two enclaves'
  commits): the first committed gate is the commit point, so the pending ones
  commit too (rolled forward: their held duplicates, or the guardian's
  connections, ``__ckpt_commit`` with the metadata's digest), and the
  checkpoint is ``restorable`` as above; a pending enclave that cannot commit
  (it died, its state with it) leaves it ``in-doubt``, an operator decides;
* the journal says a restore was activating the enclaves when its tool and
  guardian died (a gate consumed) and its tree is still held: the enclaves'
  duplicates (``__mig_hold`` from before their activation) are taken back and
  the restore finished (``restored``, :func:`.ckpt_attach.finish_restore`); it
  ended, or its tree is no longer held: ``done``.  An attach that failed once
  the tree was continued is on record in the journal: every later recover tries
  it again (``in-doubt`` until it succeeds), and says ``lost`` once the tree or
  an enclave not attached is gone, never ``done``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import time
from pathlib import Path
from typing import Final

from .._records import json_record, non_negative_int
from ..datapath.checkpoint import CheckpointIn
from ..errors import CheckpointDamagedError, CheckpointGateError, MigSGXError, RecordDamagedError
from ..system.process import continue_tree, process_state
from .ckpt_attach import finish_restore
from .ckpt_journal import (
    JOURNAL,
    MAX_CHECKPOINT_ENCLAVES,
    lost_of,
    note_lost,
    read_journal,
    read_metadata,
    remove_fenced_source,
    remove_held_leftover,
    start_time,
    write_journal,
)
from .faults import fault
from .handback import (
    abort_answer,
    abort_enclave,
    call_enclave,
    let_go,
    resume_source,
)  # fmt: skip
from .holders import dead_holders, eof_socket, take_held, watch_holders
from .recover_records import Resolution

__all__ = ["resolve_checkpoint"]

#: How long ``recover`` waits for a live guardian to resolve the checkpoint itself.
GUARDIAN_WAIT: Final = 30.0


def _alive(pid: object, start: object) -> bool:
    """``pid`` runs (not a zombie), with ``start`` time, and is not this process."""

    return (
        isinstance(pid, int)
        and pid != os.getpid()
        and start_time(pid) == start != ""
        and process_state(pid) not in ("", "Z", "X")
    )


def _tool_alive(journal: dict[str, object]) -> bool:
    return _alive(journal.get("tool_pid"), journal.get("tool_start"))


def _guardian_alive(journal: dict[str, object]) -> bool:
    """The checkpoint's guardian still runs: it resolves the checkpoint itself."""

    found = journal.get("guardian")
    return isinstance(found, list) and len(found) == 2 and _alive(found[0], found[1])


def _hand_back(journal: dict[str, object], socks: list[socket.socket], runs: bool) -> str:
    """Abort each held source enclave's checkpoint and hand it back to its application.

    The abort destroys the pending gate (the files never open) and thaws the
    enclave; the hand-back is the guardian's (``resume_source``).  Without a
    running source the enclaves end once their connections close here, as in a
    crash of the application.  Returns a note for the outcome's detail.
    """

    if not socks:
        return ""
    try:
        aborted = sum(abort_enclave(sock) for sock in socks)
        # Killed here, this recover leaves the enclaves aborted (the gates gone) and not
        # handed back: each keeps its duplicate until its application has the
        # connection (``resume``), so the next recover takes it back and hands it over.
        fault("recover.abort-answered")
        app = journal.get("app")
        if not runs:
            let_go(socks)
            return f"; {aborted} enclave(s) aborted and ended with their application"
        if not (isinstance(app, list) and len(app) == 2 and isinstance(app[0], int)):
            let_go(socks)
            return f"; {aborted} enclave(s) aborted, no application to hand them to"
        if resume_source(app[0], str(app[1]), socks, [], []) != 0:
            return f"; {aborted} enclave(s) aborted, the application did not take them back"
        return f"; {len(socks)} enclave(s) handed back"
    finally:
        for sock in socks:
            sock.close()


def _all_or_none(holders: object, taken: dict[int, socket.socket]) -> list[socket.socket]:
    """The connections to hand back, in the journal's order: where every enclave not
    taken back is dead, a connection at end of file stands for each dead one.

    Nothing committed (every gate read pending or gone), so a dead enclave's
    state is lost, as in its crash; the application takes all of its enclaves
    or none, and the live ones go back with the dead ones' ends of file
    (``docs/spec/commit.md``, section 5, as for a migration's group).
    """

    items = holders if isinstance(holders, list) else []
    dead = set(dead_holders(items)) - set(taken)
    if not taken or not dead or len(taken) + len(dead) != len(items):
        return list(taken.values())
    return [taken[i] if i in taken else eof_socket() for i in range(len(items))]


def _roll_forward(socks: list[socket.socket], meta: bytes) -> int:
    """Commit the pending source enclaves on ``socks``; how many did."""

    done = 0
    for sock in socks:
        msg = call_enclave(sock, "__ckpt_commit", [meta])
        done += msg is not None and msg["t"] == "ret"
    return done


def _end_committed(holders: object) -> None:
    """Every gate committed: a source enclave still holding its duplicate is one whose
    gate commit went unanswered (``decision-unknown``, ``docs/spec/commit.md`` section 5).
    Its abort, answered by the store now, finds the gate committed: it gives its state up,
    lets its duplicate go and ends once its connections close."""

    socks = list(take_held(holders).values())
    try:
        for sock in socks:
            abort_answer(sock)  # (``committed``: it retires)
        let_go(socks)
    finally:
        for sock in socks:
            sock.close()


def _committed(
    directory: Path, count: int, platform_socket: Path, meta: bytes, files: object
) -> list[bool]:
    """Per enclave, whether its gate is committed (raises if that cannot be learnt: an
    image that is not the one ``files`` records is refused before it launches)."""

    found = []
    for index in range(count):
        try:
            CheckpointIn(directory, index, platform_socket, meta, files=files).probe()
        except CheckpointGateError:
            found.append(False)
        else:
            found.append(True)
    return found


def _watch(journal: dict[str, object], taken: dict[int, socket.socket]) -> None:
    """Before the source tree continues: each enclave taken back is told who holds its
    connection now (``__mig_watch``, :func:`.holders.watch_holders`), read while the
    tree is still stopped, as the tool's roll-back and its guardian do.  So the
    enclave follows the processes that really hold it (a child forked after the
    hold), not those named with the hold.  Only while the recorded source lives."""

    app, recorded = journal.get("app"), journal.get("holders")
    pid, start = journal.get("pid"), journal.get("start")
    if not (isinstance(app, list) and len(app) == 2 and isinstance(app[0], int)):
        return
    if not isinstance(recorded, list) or not isinstance(pid, int) or not start:
        return
    if start_time(pid) != start or process_state(pid) in ("", "Z", "X"):
        return
    positions = sorted(i for i in taken if i < len(recorded))
    watch_holders([taken[i] for i in positions], [recorded[i] for i in positions], app[0])


def _continue_source(journal: dict[str, object]) -> bool:
    """Lift a dead tool's fence from the source tree; whether the source lives."""

    pid, start = journal.get("pid"), journal.get("start")
    if not isinstance(pid, int) or not start or start_time(pid) != start:
        return False
    if process_state(pid) in ("T", "t"):
        with contextlib.suppress(MigSGXError, ProcessLookupError):
            continue_tree(pid)
    return process_state(pid) not in ("", "Z", "X")


def _remove_files(directory: Path) -> None:
    for path in directory.iterdir():
        if path.name != JOURNAL and path.is_file():
            with contextlib.suppress(OSError):
                path.unlink()


def resolve_checkpoint(
    directory: Path,
    platform_socket: Path | None,
    *,
    aborted: bool = False,
    held: list[socket.socket] | None = None,
) -> Resolution:
    """Resolve the checkpoint in ``directory`` (see the module docstring).

    ``aborted``: the caller (the checkpoint's guardian) learnt from the source
    enclaves themselves that every one aborted: nothing is committed, and they
    hold no duplicate any more.  ``held``: the source enclaves' connections the
    caller holds (the guardian's), for a roll-forward.  A live guardian is
    waited for (up to ``GUARDIAN_WAIT``): it resolves the checkpoint by this
    same function.  The resolution names the source enclaves that died before
    their gates committed (``lost_enclaves``: the journal's ``source_lost``, as
    the tool, a guardian or this function found them).
    """

    result = _resolve(directory, platform_socket, aborted=aborted, held=held)
    result.lost_enclaves = lost_of(read_journal(Path(directory)) or {})
    return result


def _resolve(
    directory: Path,
    platform_socket: Path | None,
    *,
    aborted: bool,
    held: list[socket.socket] | None,
) -> Resolution:

    directory = Path(directory)
    deadline = time.monotonic() + GUARDIAN_WAIT
    while (found := read_journal(directory)) is not None and _guardian_alive(found):
        if time.monotonic() > deadline or _tool_alive(found):
            break
        time.sleep(0.05)
    name = str(directory)
    journal = read_journal(directory)
    raw_meta: bytes | None = None
    try:
        raw_meta = read_metadata(directory)  # (a FIFO: never waited on)
    except OSError:
        pass
    except RecordDamagedError as exc:
        # Another user's file (or a link) names a tree to kill or continue: it
        # orders nothing, and the checkpoint it claims to be cannot be judged.
        raise RecordDamagedError(f"{exc}; nothing was done in {name}") from exc
    if journal is None and raw_meta is None:
        return Resolution(name, "-", "none", "done", "no checkpoint here")
    phase = str(journal["phase"]) if journal else "done"
    if journal is not None and _tool_alive(journal):
        return Resolution(name, phase, "-", "in-progress", "its tool still runs")
    if journal is not None and phase in ("writing", "fenced") and _guardian_alive(journal):
        return Resolution(name, phase, "-", "in-progress", "its guardian resolves it")
    if phase == "restored":
        return Resolution(name, phase, "commit", "done", "restored")
    meta: dict[str, object] = {}
    if raw_meta is not None:
        with contextlib.suppress(RecordDamagedError):
            meta = json_record(raw_meta, f"checkpoint metadata in {name}")
    declared = meta.get("enclaves") or (journal or {}).get("enclaves") or 0
    count = declared if non_negative_int(declared, MAX_CHECKPOINT_ENCLAVES + 1) else 0
    if raw_meta is None or phase == "aborted" or aborted:
        committed = [False] * max(count, 1)  # no metadata: the commit never came
    elif count == 0:
        committed = [phase in ("committed", "done", "restoring")]
    else:
        if platform_socket is None:
            return Resolution(name, phase, "?", "in-doubt",
                              "name the host's --platform-socket to read the gates")  # fmt: skip
        try:
            committed = _committed(
                directory, count, platform_socket, hashlib.sha256(raw_meta).digest(),
                meta.get("files"),
            )  # fmt: skip
        except CheckpointDamagedError as exc:  # (an image not as recorded: never launched)
            return Resolution(name, phase, "?", "in-doubt", f"[{exc.code}] {exc}; nothing changed")
        except (MigSGXError, OSError) as exc:
            return Resolution(name, phase, "?", "in-doubt", f"the gates cannot be read: {exc}")
    if journal is not None and phase == "restoring" and not all(committed):
        return finish_restore(directory, journal, name)  # (a gate is consumed)
    if all(committed):
        remove_held_leftover(directory)  # a dead restore's tree: it never ran
        remove_fenced_source(meta)  # the source gave its state up: it never runs again
        if journal is not None and phase in ("writing", "fenced", "restoring") and held is None:
            # (a dead restore's loaded enclaves, never activated, are discarded alike)
            _end_committed(journal.get("holders"))
        if phase == "restoring":
            write_journal(directory, "committed", holders=[])
        elif phase not in ("committed", "done"):
            write_journal(directory, "committed")
        return Resolution(name, phase, "commit", "restorable",
                          f"run: migsgx restore --dir {directory}")  # fmt: skip
    if any(committed) and raw_meta is not None and platform_socket is not None:
        # The first committed gate was the commit point: the rest commit too.
        digest = hashlib.sha256(raw_meta).digest()
        if held is not None:
            rolled = _roll_forward(held, digest)
        else:
            socks = list(take_held(journal.get("holders")).values()) if journal else []
            try:
                rolled = _roll_forward(socks, digest)
            finally:
                for sock in socks:
                    sock.close()
        if rolled:
            try:
                committed = _committed(directory, count, platform_socket, digest, meta.get("files"))
            except (MigSGXError, OSError) as exc:
                return Resolution(name, phase, "mixed", "in-doubt",
                                  f"the gates cannot be read again: {exc}")  # fmt: skip
            if all(committed):
                remove_held_leftover(directory)
                remove_fenced_source(meta)
                write_journal(directory, "committed", holders=[])
                return Resolution(
                    name, phase, "commit", "restorable",
                    f"{rolled} pending enclave(s) committed after the others (rolled "
                    f"forward); run: migsgx restore --dir {directory}",
                )  # fmt: skip
    if any(committed):
        pending = [str(i) for i, c in enumerate(committed) if not c]
        return Resolution(
            name, phase, "mixed", "in-doubt",
            f"some enclaves committed, enclave(s) {', '.join(pending)} could not commit "
            "after them (gone, or their platform service is): an operator decides",
        )  # fmt: skip
    # Nothing committed (the gates are pending or gone): the source is the copy.
    # Its enclaves, if the tool and its guardian both died, still hold their state
    # and a duplicate of their connection: they abort and go back to it.
    takes = journal is not None and phase in ("writing", "fenced") and not aborted
    taken = take_held(journal.get("holders")) if journal is not None and takes else {}
    socks = _all_or_none(journal.get("holders") if journal else None, taken)
    if journal is not None and taken:
        _watch(journal, taken)  # (read before the tree continues)
    runs = _continue_source(journal or meta)
    lost = len(socks) - len(taken)
    # Nothing committed: an enclave of it that died took its state with it (named).
    recorded = journal.get("holders") if journal else None
    dead = dead_holders(recorded) if isinstance(recorded, list) and runs else []
    named = note_lost(directory, journal, dead) if journal is not None and dead else []
    handed = _hand_back(journal or {}, socks, runs)
    if lost:
        handed += f"; {lost} enclave(s) died undecided: their state is lost"
    _remove_files(directory)
    if journal is not None:
        # (their numbers may be reused now)
        write_journal(directory, "aborted", holders=[], **({"source_lost": named} if named else {}))
    if runs:
        return Resolution(name, phase, "abort", "stayed", "the source runs on" + handed)
    gone = "the source is gone too: its enclave state went with it"
    return Resolution(name, phase, "abort", "gone", gone + handed)
