"""``migsgx recover`` where the tool and the guardian both died: the enclaves taken back.

Each source enclave holds a duplicate of its own connection (``__mig_hold``), so
it kept its state when the tool and its guardian died; the journal names the
duplicates (``holders``).  :func:`resolve_orphaned` takes the connections back
from the enclaves themselves (:mod:`.holders`, :meth:`.redeliver.HeldSource.take_back`)
and does what the guardian would have done with them: abort the undecided ones,
hand a source that stays back with its enclaves, deliver a committed state
again (:func:`.redeliver.redeliver_state`), roll the rest forward, revoke, or
release the committed enclaves once the destination runs; the decision itself
is :func:`.recover_resolve.resolve`'s.  Where nothing committed, every enclave
taken back is asked to abort (:func:`abort_round`), each bounded, whatever an
earlier ``recover`` found: one that hangs, or whose abort its platform store
could not check (``group-unchecked``), has not aborted, and the source is then
not given back (in doubt, named) until a later ``recover`` sees it abort.  The
data path is imported only when there is something to take (a ``recover`` with
nothing in doubt stays light).
"""

from __future__ import annotations

import fcntl
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .enclave_ask import not_answering
from .faults import fault
from .handback import abort_asked, abort_frame_of, let_go
from .holders import dead_holders, eof_socket
from .journal import Journal
from .recover_records import (
    Resolution,
    all_decided,
    committed_any,
    decisions_of,
    keep_aborts,
    kinds_of,
    stays,
)
from .recover_resolve import not_given_back, resolve
from .source_host import alive, end_fenced, hand_back, is_guardian
from .tls import AgentIdentity

if TYPE_CHECKING:
    from ..sgx.store_types import Decision
    from .redeliver import HeldEnclave, HeldSource

__all__ = ["AbortRound", "abort_round", "orphaned", "resolve_orphaned"]

log = logging.getLogger("migsgx.recover")


def orphaned(journal: Journal) -> bool:
    """Its tool and its guardian are both gone, and its source enclaves hold their connections.

    ``done`` too: the tool and its guardian may die after the destination ran and
    before they released the committed source enclaves (which then hold their
    state, frozen, and their duplicates for good).  And ``aborted``: they may die
    after the enclaves aborted and before they were handed back (an aborted
    enclave keeps its duplicate until its application took the connection back;
    the tool clears ``holders`` once it did).
    """

    return (
        journal.phase in ("begun", "loaded", "fenced", "committed", "done", "aborted")
        and bool(journal.holders)
        and not alive(int(journal.data["tool_pid"]))
        and not (journal.guardian_pid and is_guardian(journal.guardian_pid))
    )


def resolve_orphaned(
    journal: Journal, platform_state: Path, identity: AgentIdentity
) -> Resolution | None:
    """Resolve a migration whose tool and guardian both died, holding what they held.

    Each source enclave holds a duplicate of its own connection (``__mig_hold``),
    so it kept its state: this takes the connections back from the enclaves
    (:meth:`.redeliver.HeldSource.take_back`) and does what the guardian would.
    Committed: the decision goes, and on ``copy-lost`` the state goes again by
    the guardian's own code (:func:`.redeliver.redeliver_state`); the enclaves
    are released once the destination runs (or never can).  Not decided yet:
    every enclave aborts (the decision is then ABORT), and after the abort
    resolution they go back to the application.  One ``recover`` at a time
    (a lock beside the journal).  None: nothing to take (resolve as usual).
    """

    if not orphaned(journal):
        return None
    from .redeliver import HeldSource  # lazy: the data path is needed only here

    lock = os.open(journal.path.with_suffix(".lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return Resolution(journal.data["mid"], journal.phase, "-", "in-doubt",
                              "another migsgx recover is resolving it")  # fmt: skip
        journal = Journal.load(journal.path)  # (as the one before us left it)
        if not orphaned(journal):
            return None
        decisions = decisions_of(platform_state, journal.enclave_mids)
        if journal.phase == "done" and not all_decided(decisions, "commit"):
            # Ended by an abort: its enclaves went back to the application and let
            # their duplicates go; a number recorded then may name a later
            # migration's duplicate now, which is never taken.
            return None
        hung: dict[int, int] = {}
        held = HeldSource.take_back(journal, hung)
        if hung:
            # Neither dead nor decided by its silence: nothing is done on it (nor on
            # the others: the application takes its enclaves all or none).
            if held is not None:
                held.close()  # (they keep their duplicates: the next recover takes them)
            return _hung(journal, decisions, hung, "__mig_held")
        if held is None:
            return None
        recorded = len(journal.holders)
        try:
            if journal.phase == "done":
                # The destination runs: the committed enclaves only wipe and exit.
                unreleased = held.release()
                end_fenced(journal)  # (the tool died before CRIU ended the source tree)
                if unreleased:
                    # (the holders stay recorded: the next recover releases them for certain)
                    return Resolution(journal.data["mid"], "done", "commit", "in-doubt",
                                      "the destination runs; " + "; ".join(unreleased))  # fmt: skip
                journal.update(holders=[])
                released = f"{len(held.enclaves)} committed source enclave(s) released"
                return Resolution(journal.data["mid"], "done", "commit", "done", released)
            # As they are now: an enclave that hung for an earlier recover may have
            # decided since (it reads the abort that recover asked once it runs).
            decisions = decisions_of(platform_state, journal.enclave_mids)
            if not committed_any(decisions):
                # Nothing committed: the source is the copy.  Every enclave is asked to
                # abort (its ABORT is recorded) and thaws; they go back to the
                # application below.  Every one, not only the undecided: one whose
                # ABORT is recorded may still be frozen (the answer of its record was
                # lost, ``group-unchecked``), and asked again it thaws.
                asked = abort_round(held.enclaves, journal, decisions)
                # Killed here, this recover leaves the enclaves aborted and their frames
                # nowhere else: each keeps its duplicate (an abort does not let it go),
                # so the next recover takes it back and asks again.
                fault("recover.abort-answered")
                keep_aborts(journal, asked.frames)
                if asked.hung or asked.unchecked:
                    # (those that aborted keep their duplicates: the next recover goes on)
                    return _still_frozen(journal, decisions, asked)
                gone = set(dead_holders(journal.holders))
                every = set(range(recorded)) <= set(held.enclaves) | gone
                if every and not asked.refused and journal.phase in ("begun", "loaded", "fenced"):
                    # Every live one aborted (a dead one is found below): what the
                    # journal says from now on, so that nothing takes it for frozen.
                    journal.update(phase="aborted")
                if every and not asked.refused and journal.unconfirmed:
                    # (those whose abort the tool could not confirm answered this one)
                    journal.update(unconfirmed=[])
            handed = ""
            # Enclaves that died (undecided: ``stays`` finds no COMMIT) are handed
            # back as connections at end of file, as in a crash of each.
            dead = dead_holders(journal.holders) if len(held.enclaves) < recorded else []
            whole = len(held.enclaves) + len(set(dead) - set(held.enclaves)) == recorded
            if stays(journal, platform_state) and whole:
                if dead:
                    log.warning("enclave(s) %s died undecided: their state is lost; the "
                                "others go back to the application",
                                ", ".join(map(str, dead)))  # fmt: skip
                    journal.update(source_lost=dead)
                # Back to the application first, then the holders are forgotten: a
                # recover killed in between finds them again (each enclave keeps its
                # duplicate until the application has the connection, ``resume``).
                handed = _hand_back(journal, held, recorded)
            result = resolve(journal, platform_state, identity, tool_gone=True,
                             redeliver=held.redeliver, release=held.release,
                             roll_forward=held.roll_forward, revoke=held.revoke)  # fmt: skip
            if handed:
                result.detail = f"{result.detail}; {handed}".strip("; ")
            elif result.outcome == "stayed" and result.decision != "revoked":
                # Not every enclave could be taken back, and the application takes
                # all or none: these end as their connections close (as before).
                # (A revocation handed them back itself: they are the application's.)
                let_go([e.sock for e in held.enclaves.values()])
            return result
        finally:
            held.close()
    finally:
        os.close(lock)


def _hand_back(journal: Journal, held: HeldSource, recorded: int) -> str:
    """Give the source back with its enclaves (taken back, aborted); then forget the holders.

    An enclave that could not be taken back (it died) is a connection at end of
    file for the application, as in a crash of that enclave.  A note for the
    outcome's detail (:func:`.source_host.hand_back`).
    """

    dead = {i: eof_socket() for i in range(recorded) if i not in held.enclaves}
    socks = [held.enclaves[i].sock if i in held.enclaves else dead[i] for i in range(recorded)]
    try:
        return hand_back(journal, socks, log.warning)
    finally:
        for sock in dead.values():
            sock.close()


@dataclass
class AbortRound:
    """What the source enclaves answered ``__mig_abort`` (each bounded, :mod:`.enclave_ask`)."""

    #: The ABORT frames returned (asked again where an enclave had aborted before).
    frames: dict[int, bytes] = field(default_factory=dict)
    #: Enclaves that did not answer, their connections open: index -> pid.
    hung: dict[int, int] = field(default_factory=dict)
    #: Enclaves whose abort the platform store could not check (``group-unchecked``):
    #: alive and still frozen.  Index -> pid.
    unchecked: dict[int, int] = field(default_factory=dict)
    #: Enclaves that answered ``committed`` or ``group-decided``: the group committed.
    refused: list[int] = field(default_factory=list)


def abort_round(
    enclaves: Mapping[int, HeldEnclave], journal: Journal, decisions: Sequence[Decision | None]
) -> AbortRound:
    """Ask every enclave of ``enclaves`` to abort; what each answered.

    Every one is asked, each bounded, so that one hung enclave does not leave
    the others unasked.  An enclave that aborted before answers with no frame;
    where the store holds no decision of it, it is asked for the frame it
    sealed (``__mig_abort_frame``, ``docs/spec/commit.md`` 1 rule 6).  Neither
    a hung nor an unchecked enclave has aborted: nothing is decided from that
    (its abort stays asked on its connection; a late one aborts, or commits
    instead where its group committed, once it reads it).
    """

    found = AbortRound()
    for index, enclave in sorted(enclaves.items()):
        answer, frame, state = abort_asked(enclave.sock)
        if state == "hung":
            found.hung[index] = enclave.info.pid
        elif answer == "group-unchecked":
            found.unchecked[index] = enclave.info.pid
        elif answer in ("committed", "group-decided"):
            found.refused.append(index)
        elif answer == "aborted":
            recorded = index < len(decisions) and decisions[index] is not None
            if not frame and not recorded and index < len(journal.enclave_mids):
                frame = abort_frame_of(enclave.sock, journal.enclave_mids[index])
            if frame:
                found.frames[index] = frame
    return found


def _still_frozen(
    journal: Journal, decisions: list[Decision | None], asked: AbortRound
) -> Resolution:
    """In doubt: enclaves that have not aborted, named; the source is not given back.

    A hung one is neither dead nor decided by its silence; an unchecked one
    is alive and frozen: its platform service could not check its abort
    against its migration group (``docs/spec/commit.md`` 1.1 rule 4), so it
    may not abort yet, and it is never taken for aborted.  Each keeps its
    state and its duplicate; ``migsgx recover`` again, once they answer and
    their platform service is back, resolves the migration.
    """

    said = [not_answering(i, pid, "__mig_abort") for i, pid in sorted(asked.hung.items())]
    said += [
        f"enclave {i} (pid {pid}) is still frozen: its abort could not be checked by its "
        "platform store (group-unchecked: its platform service is gone, or its store "
        "cannot be read or written), so it is not handed back"
        for i, pid in sorted(asked.unchecked.items())
    ]  # fmt: skip
    frozen = sorted({*asked.hung, *asked.unchecked})
    why = "; ".join(said) + (
        "; nothing was decided from that and the source is not given back without them: "
        "run migsgx recover again once they answer (and their platform service is back)"
    )
    return not_given_back(journal, decisions, frozen, why)


def _hung(
    journal: Journal, decisions: list[Decision | None], hung: dict[int, int], call: str
) -> Resolution:
    """In doubt: source enclaves that do not answer, named with their pids.

    Nothing is decided from a timeout: not a roll-forward, not a roll-back, not
    a death.  Each keeps its state and its duplicate; ``migsgx recover`` again,
    once they answer (SIGCONT, or done being busy), resolves the migration.
    """

    kinds = set(kinds_of(decisions))
    decision = next(iter(kinds)) if len(kinds) == 1 else "mixed"
    named = "; ".join(not_answering(i, pid, call) for i, pid in sorted(hung.items()))
    return Resolution(
        journal.data["mid"], journal.phase, decision, "in-doubt",
        f"{named}; nothing was done on its silence: run migsgx recover again once it answers",
    )  # fmt: skip
