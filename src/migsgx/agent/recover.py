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
  (SIGUSR1) and waited for (:func:`_through_guardian`).

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
from .enclave_loss import lost_in_journal
from .journal import Journal
from .recover_orphans import resolve_orphaned
from .recover_records import Resolution, all_decided, decisions_of
from .recover_resolve import COPY_LOST, MIXED, REFUSABLE, REVOKING, resolve
from .source_host import is_guardian, lost_detail
from .tls import AgentIdentity

__all__ = ["recover"]

log = logging.getLogger("migsgx.recover")

#: How long ``migsgx recover`` waits for the guardian it woke to deliver the state again.
GUARDIAN_WAIT: Final = 90.0


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
