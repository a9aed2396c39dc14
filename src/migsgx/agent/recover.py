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
* where nothing committed and the guardian still asks source enclaves to
  abort (one hangs, or its platform service cannot check the abort yet): it is
  woken and waited for, bounded; the source is never given back before every
  live enclave aborted (:func:`_wait_for_guardian`).

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
import signal
import time
from pathlib import Path
from typing import Final

from ..containers.imagefs import sweep_leftovers
from ..errors import MigSGXError
from .dumpdirs import sweep_dump_dirs
from .enclave_ask import HUNG_WAIT
from .enclave_loss import lost_in_journal
from .journal import Journal
from .recover_orphans import resolve_orphaned
from .recover_records import Resolution, all_decided, committed_any, decisions_of, not_aborted
from .recover_resolve import COPY_LOST, MIXED, REFUSABLE, REVOKING, not_given_back, resolve
from .source_host import alive, is_guardian, lost_detail
from .tls import AgentIdentity

__all__ = ["recover"]

log = logging.getLogger("migsgx.recover")

#: How long ``migsgx recover`` waits for the guardian it woke to deliver the state again.
GUARDIAN_WAIT: Final = 90.0
#: How long it waits for a guardian that saw every source enclave abort to give the
#: source back (it continues the source, hands it its enclaves, tells the destination).
HANDBACK_WAIT: Final = 30.0


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
            result = resolve_orphaned(journal, Path(state), identity)
            if result is None and _guardian_aborting(journal, Path(state)):
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
                lost = lost_in_journal(Journal.load(journal.path).data)
                result.lost_enclaves = [e.to_dict() for e in lost]
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


def _guardian_aborting(journal: Journal, platform_state: Path) -> bool:
    """Whether the guardian still asks source enclaves to abort, and the source must wait.

    Its tool dead, nothing committed, and an enclave with no decision that has
    not aborted (:func:`.recover_records.not_aborted`: one that hangs, or
    whose platform service cannot check its abort yet, say after it went away
    inside the first COMMIT): the guardian holds its connection and asks it
    again, with a growing pause, and gives the source back once every one
    aborted (journal ``aborted``).  Given back now, the source would run
    beside a frozen enclave it cannot call (the application takes its
    enclaves all or none): :func:`_wait_for_guardian`.
    """

    pid = journal.guardian_pid
    if journal.phase in ("aborted", "done") or not pid or not is_guardian(pid):
        return False
    if alive(int(journal.data["tool_pid"])):
        return False  # (in progress: its tool decides)
    decisions = decisions_of(platform_state, journal.enclave_mids)
    return not committed_any(decisions) and bool(not_aborted(journal, decisions))


def _wait_for_guardian(journal: Journal, platform_state: Path) -> Resolution | None:
    """Wake the guardian (SIGUSR1: it asks at once) and wait, as long as one bounded
    answer of each enclave it waits for takes.

    Once every enclave aborted (the guardian wrote ``aborted``), it gives the
    source back and hands it its enclaves: that is waited for too (up to
    :data:`HANDBACK_WAIT`), so that two parties do not give one source back at
    once.  None when there is nothing more to wait for (one committed, the
    guardian ended, or it took longer): the migration is resolved as usual.
    Still waiting for an enclave: in doubt, the enclaves and the guardian
    named; the source stays stopped.
    """

    pid = journal.guardian_pid
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGUSR1)
    decisions = decisions_of(platform_state, journal.enclave_mids)
    deadline = time.monotonic() + HUNG_WAIT * (len(not_aborted(journal, decisions)) + 1)
    handing_back = False
    while time.monotonic() < deadline:
        time.sleep(0.1)
        if not is_guardian(pid):
            return None
        journal = Journal.load(journal.path)
        if journal.phase == "done":
            return Resolution(journal.data["mid"], "done", "abort", "stayed",
                              f"the guardian (pid {pid}) gave the source back once every "
                              "source enclave aborted")  # fmt: skip
        decisions = decisions_of(platform_state, journal.enclave_mids)
        if committed_any(decisions):
            return None
        if not handing_back and not not_aborted(journal, decisions):
            handing_back = True
            deadline = time.monotonic() + HANDBACK_WAIT
    if handing_back:
        return None
    frozen = not_aborted(journal, decisions)
    named = ", ".join(map(str, frozen))
    return not_given_back(
        journal, decisions, frozen,
        f"enclave(s) {named} have not aborted yet (no decision recorded, no ABORT "
        f"returned): the guardian (pid {pid}) holds them and asks again until they answer "
        "and their platform service checks the abort (a hung enclave, or its platform "
        "service gone), then gives the source back; until then the source stays stopped. "
        "Run migsgx recover again later",
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
