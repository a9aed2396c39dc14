"""``migsgx recover``: resolve every migration in doubt to exactly one runnable copy.

Runs on the source host (by hand, or by the guardian when the tool died).
First, what a tool killed mid-dump left behind goes: its images tmpfs
(:func:`~migsgx.containers.imagefs.sweep_leftovers`) and its images directory.
Then, for each journal (:mod:`.journal`) that is not finished:

* its tool and guardian both dead and its source enclaves holding their
  connections: they are taken back from the enclaves (:mod:`.recover_orphans`);
* otherwise the recorded decisions are carried to the destination
  (:func:`.recover_resolve.resolve`, whose docstring says what each decision
  leads to; the records it reads are :mod:`.recover_records`);
* where the state must come again, the rest must commit, or a refusal must be
  proven, and only the guardian holds the source enclaves: it is woken
  (SIGUSR1) and waited for (:func:`_through_guardian`);
* where nothing committed and the guardian lives (it asks source enclaves to
  abort, or gives the source back): it is woken and waited for, on its pidfd,
  bounded; ``recover`` never acts beside it (no second SIGCONT, no second
  ABORT) and takes over only once it is gone; after the bound it says so, in
  doubt, having done nothing (:func:`_wait_for_guardian`);
* a gate on the source's listeners that could not be opened before (its
  journal's ``closed_gates``, kept even under ``done``) is tried again, and
  reported while it stays closed (in doubt: exit 7, with the manual command).

A damaged journal is reported in doubt, never skipped.  Idempotent: decisions
are final and delivering one twice changes nothing.  A source enclave that does
not answer within the guardian's bound (stopped, or busy, its connection open)
is reported in doubt, named with its pid, and nothing is decided from its
silence (:mod:`.enclave_ask`): once it answers, the next ``recover`` resolves it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING, Final

from .. import _proc
from ..containers.imagefs import sweep_leftovers
from ..errors import MigSGXError
from .dumpdirs import sweep_dump_dirs
from .enclave_ask import HUNG_WAIT
from .enclave_loss import lost_in_journal
from .journal import Journal
from .recover_orphans import resolve_orphaned
from .recover_records import Resolution, all_decided, committed_any, decisions_of, not_aborted
from .recover_resolve import COPY_LOST, MIXED, REFUSABLE, REVOKING, not_given_back, resolve
from .source_host import gate_report, is_guardian, lost_detail, retry_gates
from .tls import AgentIdentity

if TYPE_CHECKING:
    from ..sgx.store_types import Decision

__all__ = ["recover"]

log = logging.getLogger("migsgx.recover")

#: How long ``migsgx recover`` waits for the guardian it woke to deliver the state again.
GUARDIAN_WAIT: Final = 90.0
#: How long it waits for a live guardian that may still give the source back (it
#: continues the source, hands it its enclaves, tells the destination) before it says
#: so, in doubt, having done nothing: it never acts beside a live guardian.
GUARDIAN_BOUND: Final = 45.0
#: How often it says that it still waits.
PROGRESS_EVERY: Final = 5.0
#: How long it still waits, once the guardian gave the source back, for it to tell the
#: destination (then the guardian says ``done``); after that ``recover`` tells it too.
TELLING_WAIT: Final = 5.0


def recover(state: Path, identity: AgentIdentity | None = None) -> list[Resolution]:
    """Resolve every unfinished migration of the source host with platform state ``state``."""

    identity = identity or AgentIdentity.of_state(state)
    # A tool killed mid-dump (and its guardian with it) left its images tmpfs mounted.
    for point in sweep_leftovers():
        log.info("unmounted a dead tool's images tmpfs at %s", point)
    journals = Journal.all(identity.directory)
    # Its images directory too (in RAM): the ones journals name, and any other of a dead tool.
    for path in sweep_dump_dirs([j.dump_dir for j in journals if j.dump_dir is not None]):
        log.info("removed a dead tool's images directory %s", path)
    results = []
    for journal in journals:
        try:
            gates = retry_gates(journal)  # (also under a journal that is done)
            result = resolve_orphaned(journal, Path(state), identity)
            if result is None and _guardian_may_give_back(journal, Path(state)):
                result = _wait_for_guardian(journal, Path(state))
                if result is None:
                    # (it may have ended while we waited: what it held, we take back)
                    journal = Journal.load(journal.path)
                    result = resolve_orphaned(journal, Path(state), identity)
            if result is None:
                result = resolve(journal, Path(state), identity)
            # (REVOKING: the guardian revoked some and goes on; wait for it too)
            if result.detail in (COPY_LOST, REFUSABLE, REVOKING) or result.detail.startswith(MIXED):
                result = _through_guardian(journal, result)
            # (as the tool, its guardian or this recover found them: the journal's)
            with contextlib.suppress(MigSGXError, OSError, ValueError):
                now = Journal.load(journal.path)
                lost = lost_in_journal(now.data)
                result.lost_enclaves = [e.to_dict() for e in lost]
                gates = [gate_report(note) for note in now.closed_gates]
            if gates:
                result.closed_gates = gates
                said = [result.detail, *(str(g["message"]) for g in gates)]
                result.detail = "; ".join(filter(None, said))
            results.append(result)
        except (MigSGXError, OSError) as exc:
            results.append(
                Resolution(journal.data["mid"], journal.phase, "?", "in-doubt", str(exc))
            )
    # A damaged journal still says a migration started: never report "nothing to do".
    for path, why in Journal.damaged(identity.directory):
        results.append(
            Resolution(
                path.stem[:64], "?", "?", "in-doubt", f"{why}; check both hosts, then remove {path}"
            )
        )
    return results


def _guardian_may_give_back(journal: Journal, platform_state: Path) -> bool:
    """Whether a live guardian of this migration may still give its source back.

    Its tool dead, nothing committed, the journal not ``done``: the guardian
    asks the source enclaves to abort (one hangs, or its platform service
    cannot check the abort yet, say after it went away inside the first
    COMMIT), or it saw them abort and gives the source back (journal
    ``aborted``: SIGCONT, the enclaves handed back, the ABORT delivered).
    Given back by this ``recover`` too, the source would get a second SIGCONT
    and the destination a second ABORT while the guardian still acts; given
    back before every enclave aborted, it would run beside a frozen enclave it
    cannot call (the application takes its enclaves all or none).  So the two
    never both give it back: this waits for the guardian
    (:func:`_wait_for_guardian`) and takes over once it is gone, or once it
    says the source runs again (``handed_back``: what it still does then,
    carry the ABORT to a destination that may be down for hours, is
    idempotent and done here too).
    """

    pid = journal.guardian_pid
    if journal.phase == "done" or not journal.enclave_mids or not pid or not is_guardian(pid):
        return False
    if _proc.alive(int(journal.data["tool_pid"])):
        return False  # (in progress: its tool decides; a zombie, not yet reaped, is dead)
    decisions = decisions_of(platform_state, journal.enclave_mids)
    if committed_any(decisions):
        return False
    # Only while it has a give-back to do: the aborts seen (``aborted``), or an enclave
    # still to abort.  A guardian that carries a decision instead (the tool ended in
    # doubt, nothing of it here to give back) is not waited for: ``resolve`` below
    # asks the destination as before, and the guardian's own delivery is idempotent.
    # A guardian that gave the source back already (``handed_back``) only tells the
    # destination, for as long as that takes: not waited for either.
    return _handing_back(journal) or bool(not_aborted(journal, decisions))


def _handing_back(journal: Journal) -> bool:
    """``aborted``, and the guardian has not said yet that the source runs again."""

    return journal.phase == "aborted" and journal.data.get("handed_back") is not True


def _wait_for_guardian(journal: Journal, platform_state: Path) -> Resolution | None:
    """Wake the guardian (SIGUSR1: it asks at once) and wait for it, bounded.

    Waited on its pidfd (a pid reused meanwhile is never taken for it), with a
    line on the log every few seconds.  Once the journal says ``done`` the
    guardian gave the source back (``stayed``).  None once it is gone (what it
    held, this ``recover`` then takes back), or a source enclave committed
    (the roll-forward path).  In doubt, nothing done here, the guardian named:
    while an enclave still has not aborted after one bounded answer of each
    (:data:`~.enclave_ask.HUNG_WAIT`), or after :data:`GUARDIAN_BOUND` (it
    still gives the source back, or cannot tell the destination yet).
    """

    pid = journal.guardian_pid
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGUSR1)
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return None  # (gone already)
    try:
        if not is_guardian(pid):
            return None  # (ended just now, the pid given to another process)
        decisions = decisions_of(platform_state, journal.enclave_mids)
        now = time.monotonic()
        asking = now + HUNG_WAIT * (len(not_aborted(journal, decisions)) + 1)
        deadline, said = now + GUARDIAN_BOUND, now - PROGRESS_EVERY
        handed: float | None = None
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        while True:
            gone = bool(poller.poll(100))  # (readable: the guardian ended)
            journal = Journal.load(journal.path)
            if journal.phase == "done":
                return Resolution(journal.data["mid"], "done", "abort", "stayed",
                                  f"the guardian (pid {pid}) gave the source back once every "
                                  "source enclave aborted")  # fmt: skip
            decisions = decisions_of(platform_state, journal.enclave_mids)
            if gone or committed_any(decisions):
                return None
            frozen = not_aborted(journal, decisions)
            now = time.monotonic()
            if not frozen and journal.phase == "aborted" and not _handing_back(journal):
                # Given back: what is left, telling the destination, is idempotent; its
                # agent may be away for hours, so only a short while more for the guardian.
                handed = now if handed is None else handed
                if now - handed > TELLING_WAIT:
                    return None
            if frozen and now > asking:
                return _still_asking(journal, decisions, frozen, pid)
            if now > deadline:
                return Resolution(
                    journal.data["mid"], journal.phase, "abort", "in-doubt",
                    f"the guardian (pid {pid}) still gives the source back (or tells the "
                    f"destination), {GUARDIAN_BOUND:.0f} s after it was asked: nothing was done "
                    "here, so that the source is not given back twice; run migsgx recover "
                    "again later (it takes over once the guardian is gone)",
                )  # fmt: skip
            if now - said >= PROGRESS_EVERY:
                said = now
                log.warning("migration %s: waiting for its guardian (pid %d), which gives the "
                            "source back (at most %.0f s more)",
                            journal.data["mid"], pid, deadline - now)  # fmt: skip
    finally:
        os.close(pidfd)


def _still_asking(
    journal: Journal, decisions: list[Decision | None], frozen: list[int], pid: int
) -> Resolution:
    """In doubt: the guardian still asks enclaves that have not aborted."""

    named = ", ".join(map(str, frozen))
    return not_given_back(
        journal, decisions, frozen,
        f"enclave(s) {named} have not aborted yet (no decision recorded, no ABORT "
        f"returned, or the abort not confirmed): the guardian (pid {pid}) holds them and "
        "asks again until they answer and their platform service checks the abort (a hung "
        "enclave, or its platform service gone), then gives the source back; until then "
        "the source stays stopped. Run migsgx recover again later",
    )  # fmt: skip


def _through_guardian(journal: Journal, result: Resolution) -> Resolution:
    """The state must come again, or the rest must commit: only the guardian holds
    the source enclaves.

    It retries by itself with a growing pause; SIGUSR1 makes it try at once,
    and this waits for its journal to say ``done``.  No guardian, and no
    enclave holding a connection to take back (:mod:`.recover_orphans` found
    none): the state is gone.  (Undecided ones whose connection closed committed
    by themselves when their group had: what is still undecided then is an
    enclave that died before it could.)
    """

    pid = journal.guardian_pid
    if not pid or not is_guardian(pid):
        if result.decision == "revoked":
            return result  # (the next recover takes the enclaves back and goes on)
        if result.decision == "mixed":
            return Resolution(
                result.mid, journal.phase, "mixed", "in-doubt",
                f"{result.detail}; no guardian holds them any more: an undecided source "
                "enclave that died took its state with it (its destination copy needs a "
                "token only it could make); an operator decides",
            )  # fmt: skip
        return Resolution(
            result.mid, journal.phase, "commit", "lost",
            f"{COPY_LOST}, and the guardian that held them is gone: so is the state. "
            + lost_detail(journal, "copy-lost"),
        )  # fmt: skip
    os.kill(pid, signal.SIGUSR1)
    deadline = time.monotonic() + GUARDIAN_WAIT
    while True:
        if Journal.load(journal.path).phase == "done":
            decided = decisions_of(journal.path.parent.parent.parent, journal.enclave_mids)
            if all_decided(decided, "revoked"):
                return Resolution(
                    result.mid, "done", "revoked", "stayed",
                    f"the guardian (pid {pid}) revoked the commit on the destination's "
                    "refusal: the source runs on",
                )  # fmt: skip
            return Resolution(result.mid, "done", "commit", "moved",
                              f"the guardian (pid {pid}) delivered the state again")  # fmt: skip
        if not is_guardian(pid):
            return _through_guardian(journal, result)  # (gone meanwhile: said as above)
        if time.monotonic() > deadline:
            break
        time.sleep(0.1)
    return Resolution(
        result.mid, journal.phase, result.decision, "in-doubt",
        f"{result.detail}; the guardian (pid {pid}) is at it: run recover later",
    )  # fmt: skip
