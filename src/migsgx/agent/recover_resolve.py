"""Resolving one migration in doubt to exactly one runnable copy (``migsgx recover``).

:func:`resolve` reads the source enclaves' decisions from this host's platform
store (:mod:`.recover_records`), which are final (``docs/spec/commit.md``), and
carries them to the destination agent over the agents' mutual-TLS channel
(``deliver``).  The guardian runs it too, holding the source enclaves; so does
:mod:`.recover_orphans` once it took them back from the enclaves themselves.
By what was decided:

* every enclave decided COMMIT: the tokens go again; once the destination says
  it runs (or its claim store says the ids were activated before), the fenced
  source tree is killed;
* an enclave decided ABORT: the ABORT frames go, so that a destination holding
  a loaded copy discards it; the source is given back: a container as the
  guardian would (the journal's ``undo`` notes: a post-copy CRIU still holding
  it ended, its pod's ``eth0`` up, its cgroup thawed), the fenced tree continued
  (the guardian hands the enclave connections back);
* no decision yet: nothing is done (the migration is under way, or its source
  enclaves are gone and so is the state: reported);
* no enclaves at all, past the fence: no source enclave decides; the
  destination's resume is the commit point, so its agent is asked (it records
  that it resumed before the tree runs, :mod:`.resumed`): resumed, and the
  fenced source goes; never resumed, and the source is given back; no answer,
  and the source stays stopped, in doubt (``docs/spec/commit.md`` 4.3);
* some enclaves decided COMMIT, others nothing yet (the tool died between two
  commits): the first COMMIT is the commit point of the whole migration, so the
  rest commit too (rolled forward: ``__mig_commit`` on the connections the
  guardian holds; the platform store refuses an ABORT in a group that
  committed, ``docs/spec/commit.md`` 1.1), and then the tokens go as above.
  ``migsgx recover`` itself holds no enclave connection: it wakes the guardian
  and waits for it;
* every enclave decided COMMIT and the destination keeps the tree held for a
  loaded copy that died before it judged the decision (``copy-lost``, window
  W2): the committed source enclaves deliver their state again to fresh
  enclaves there (``commit.md``, 2.1; :mod:`.redeliver`).  The guardian holds
  their connections and does this; ``migsgx recover`` wakes it and waits for
  its result.  Once the guardian is gone too, ``recover`` takes the connections
  back from the enclaves themselves (each holds a duplicate of its own,
  :mod:`.holders`) and runs the same code;
* every enclave decided COMMIT but the destination holds no loaded copy and
  never activated the ids (its agent lost the session and found no held tree
  to adopt, or the held tree was discarded): ``lost``.  What remains is said
  exactly: the decision, the stopped source tree, the destination's unowned
  tree if any.

Idempotent: decisions are final and delivering one twice changes nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Final

from ..errors import LostAfterCommitError, MigSGXError
from ..sgx.store_types import Decision
from .control import ask_agent
from .journal import Journal
from .recover_records import (
    Resolution,
    all_decided,
    decisions_of,
    kinds_of,
    not_aborted,
    with_returned_aborts,
)
from .source_host import alive, end_committed, end_fenced, give_back, lost_detail
from .tls import AgentIdentity

__all__ = [
    "COPY_LOST", "MIXED", "REFUSABLE", "REVOKING", "Redeliver", "Release", "Revoke",
    "RollForward", "not_given_back", "resolve",
]  # fmt: skip

DELIVER_TIMEOUT: Final = 30.0
#: What delivers the state again: (journal, identity, recorded tokens) -> tokens to deliver.
Redeliver = Callable[[Journal, AgentIdentity, list[bytes]], list[bytes]]
#: What lets the committed source enclaves go once the destination runs or never can
#: (:meth:`.redeliver.HeldSource.release`): a note for each that did not answer
#: (none, or None: every one answered).
Release = Callable[[], list[str] | None]
#: What commits the undecided source enclaves of a migration that committed (their
#: indexes in the journal's ``enclave_mids``); the guardian's, which holds them.
RollForward = Callable[[list[int]], None]
#: Revokes the committed enclaves on the destination's refusal and hands the source
#: back (:meth:`.redeliver.HeldSource.revoke`); a note for the outcome's detail.
Revoke = Callable[[Journal, AgentIdentity, list[str]], str]

MIXED: Final = (
    "some enclaves committed, the others have not decided yet: the first COMMIT is the "
    "commit point, so they must commit too"
)
REFUSABLE: Final = (
    "committed, and the destination's tree can never run (a post-copy tree killed after "
    "the COMMIT): whoever holds the source enclaves revokes their commit on its refusal"
)
REVOKING: Final = "some commits were revoked: migsgx recover revokes the rest"
COPY_LOST: Final = (
    "committed; the destination keeps the tree held, but its loaded copy died before "
    "it judged the decision: the committed source enclaves must deliver their state again"
)


def _deliver(
    journal: Journal, identity: AgentIdentity, frames: list[bytes], decision: str | None = None
) -> tuple[str, str]:
    """Carry ``frames`` to the destination agent; its outcome and a detail.

    ``decision`` "abort": the store holds ABORT decisions; the destination then
    discards a tree held for a copy that died undecided (no state comes again).
    """

    lost = [i for i in journal.data.get("source_lost") or [] if type(i) is int]
    request = {
        "t": "deliver",
        "session_id": journal.mid,
        "frames": frames,
        "enclave_mids": journal.enclave_mids,
        **({"decision": decision} if decision else {}),
        **({"source_lost": lost} if decision == "abort" and lost else {}),
    }
    try:
        reply = ask_agent(journal.to, identity, "recover", request, "delivered", DELIVER_TIMEOUT)
    except MigSGXError as exc:
        return "unreachable", str(exc)
    return str(reply["outcome"]), f"destination pid {reply['pid']}" if reply["pid"] else ""


def resolve(
    journal: Journal,
    platform_state: Path,
    identity: AgentIdentity,
    *,
    tool_gone: bool = False,
    redeliver: Redeliver | None = None,
    roll_forward: RollForward | None = None,
    release: Release | None = None,
    revoke: Revoke | None = None,
) -> Resolution:
    """Resolve one migration (see the module docstring).

    ``redeliver`` (of whoever holds the committed source enclaves: the guardian,
    or this ``recover`` once it took their connections back) delivers the state
    again when the destination lost a loaded copy; ``roll_forward`` (theirs too)
    commits the enclaves that had not decided when another of the same
    migration committed; ``release`` lets the committed ones go (wipe and exit)
    once the destination runs or can never run, and names the ones that did not
    answer (they keep their state: the outcome is then in doubt, and a later
    attempt releases them); ``revoke`` (theirs too) undoes
    the commits on the destination's proven refusal where its copy can never
    run (a post-copy tree killed after the COMMIT, ``commit.md`` 2.2) and hands
    the source back.
    """

    mid = journal.data["mid"]
    if journal.phase == "done":
        if release is not None:
            unreleased = release() or []  # (only a committed one obeys: the tool died first)
            if all_decided(decisions_of(platform_state, journal.enclave_mids), "commit"):
                end_fenced(journal)  # (and before CRIU ended the source tree)
                if unreleased:
                    return Resolution(mid, journal.phase, "commit", "in-doubt",
                                      "the destination runs; " + "; ".join(unreleased))  # fmt: skip
        return Resolution(mid, journal.phase, "-", "done")
    if not tool_gone and alive(int(journal.data["tool_pid"])) and journal.phase != "aborted":
        return Resolution(mid, journal.phase, "-", "in-progress", "its tool still runs")
    decisions = decisions_of(platform_state, journal.enclave_mids)
    kinds = set(kinds_of(decisions))
    if kinds == {"commit", "none"} and roll_forward is not None:
        # The first COMMIT was the commit point: the rest commit too, never abort.
        roll_forward([i for i, d in enumerate(decisions) if d is None])
        decisions = decisions_of(platform_state, journal.enclave_mids)
        kinds = set(kinds_of(decisions))
    returned = journal.aborts or [b""] * len(decisions)  # (one per enclave)
    if "commit" not in kinds and any(
        d is None and f for d, f in zip(decisions, returned, strict=True)
    ):
        decisions = with_returned_aborts(journal, decisions)
        kinds = set(kinds_of(decisions))
    # (live enclaves that have not aborted: never given back without them)
    frozen = [] if {"commit", "revoked"} & kinds else not_aborted(journal, decisions)
    if not decisions or kinds == {"none"}:
        # No source enclave decided: none committed, so no destination copy can run.
        if journal.phase in ("begun", "aborted") and not frozen:
            # The source is the copy: it runs again before the journal says done
            # (a tool killed in its roll-back left it stopped, or frozen).
            give_back(journal)
            journal.update(phase="done")
            return Resolution(mid, journal.phase, "none", "stayed", "nothing was decided")
        if not decisions:
            return _without_enclaves(journal, identity)
        if frozen:
            return not_given_back(journal, decisions, frozen)
        return Resolution(
            mid, journal.phase, "none", "in-doubt",
            "the source enclaves never decided; if they are gone, so is their state",
        )  # fmt: skip
    if "revoked" in kinds and kinds <= {"commit", "revoked"}:
        # A revocation under way (some enclaves revoked): the rest follow, then the hand-back.
        return _revoked(journal, platform_state, identity, decisions, revoke)
    if kinds == {"commit"}:
        frames = [d.frame for d in decisions if d]
        outcome, detail = _deliver(journal, identity, frames)
        if outcome == "copy-lost":
            if redeliver is None:
                return Resolution(mid, journal.phase, "commit", "in-doubt", COPY_LOST)
            try:
                frames = redeliver(journal, identity, frames)
            except MigSGXError as exc:
                return Resolution(
                    mid, journal.phase, "commit", "in-doubt",
                    f"{COPY_LOST}; delivering the state again failed: {exc}",
                )  # fmt: skip
            outcome, detail = _deliver(journal, identity, frames)
            detail = f"the state was delivered again to a fresh enclave; {detail}".strip("; ")
        if outcome == "resumed":
            end_committed(journal)
            journal.update(phase="done")
            unreleased = (release() if release is not None else None) or []
            if unreleased:
                said = "; ".join(filter(None, ["the destination runs", detail, *unreleased]))
                return Resolution(mid, journal.phase, "commit", "in-doubt", said)
            return Resolution(mid, journal.phase, "commit", "moved", detail)
        if outcome == "refusable":
            # A post-copy tree killed after the COMMIT: it can never run.  Its host's
            # store refuses the ids for good, and the commits are revoked (2.2).
            if revoke is None:
                return Resolution(mid, journal.phase, "commit", "in-doubt", REFUSABLE)
            return _revoked(journal, platform_state, identity, decisions, revoke)
        if outcome in ("unknown", "aborted"):
            # (no tree is held for the state any more: it can never run)
            unreleased = (release() if release is not None else None) or []
            said = "; ".join(filter(None, [lost_detail(journal, outcome), *unreleased]))
            return Resolution(mid, journal.phase, "commit", "lost", said)
        if outcome == LostAfterCommitError.code:
            # Claimed, then its enclave died (W3): never delivered again; the source goes.
            end_committed(journal)
            journal.update(phase="done")
            unreleased = (release() if release is not None else None) or []
            return Resolution(
                mid, journal.phase, "commit", "lost",
                "; ".join(["the destination's enclave claimed the id and then died: its "
                           f"application runs without it {detail}".strip(), *unreleased]),
            )  # fmt: skip
        return Resolution(
            mid, journal.phase, "commit", "in-doubt",
            f"committed; the destination answered {outcome!r} {detail}".strip(),
        )  # fmt: skip
    if kinds == {"commit", "none"}:
        undecided = [str(i) for i, d in enumerate(decisions) if d is None]
        return Resolution(mid, journal.phase, "mixed", "in-doubt",
                          f"{MIXED} (enclave(s) {', '.join(undecided)})")  # fmt: skip
    if "commit" in kinds:
        # Only where a platform store could not be read or written when an abort
        # was recorded (the group rule is the store's): an operator decides.
        return Resolution(
            mid, journal.phase, "mixed", "in-doubt",
            "some enclaves committed, others aborted: an operator decides",
        )  # fmt: skip
    # At least one ABORT and no COMMIT: the source is the copy; end the destination's.
    if frozen:
        return not_given_back(journal, decisions, frozen)
    frames = [d.frame if d is not None else b"" for d in decisions]
    if journal.holders:
        # An enclave that aborted lets its duplicate go once the application has its
        # connection back (the guardian, or :mod:`.recover_orphans`, gave it before this):
        # the number may name another descriptor (a later migration's) from then on,
        # and must never be taken.
        journal.update(holders=[])
    give_back(journal)
    outcome, detail = _deliver(journal, identity, frames, "abort")
    if outcome in ("aborted", "unknown"):
        journal.update(phase="done")
        return Resolution(mid, journal.phase, "abort", "stayed", outcome)
    # Which copy runs is not in doubt: the source (no commit can ever exist).  The
    # destination's loaded copy goes once an ABORT reaches it; a later recover retries.
    return Resolution(
        mid, journal.phase, "abort", "stayed",
        f"the destination was not told yet ({outcome} {detail})".strip(),
    )  # fmt: skip


def not_given_back(
    journal: Journal, decisions: list[Decision | None], frozen: list[int], why: str = ""
) -> Resolution:
    """In doubt: source enclaves that have not aborted (:func:`.recover_records.not_aborted`).

    The source is not given back without them: a frozen enclave answers no
    call of the application's, and the application takes its enclaves all or
    none.  Nothing else is done either (the ABORTs recorded stay recorded and
    are delivered once the rest aborted).  ``why``: what is known of them.
    """

    kinds = set(kinds_of(decisions))
    decision = "abort" if "abort" in kinds else "none"
    named = ", ".join(map(str, frozen))
    return Resolution(
        journal.data["mid"], journal.phase, decision, "in-doubt",
        why or f"enclave(s) {named} have not aborted (no decision recorded, no ABORT "
        "returned, their processes live): still frozen, so the source is not given back "
        "without them; run migsgx recover again once they answer",
    )  # fmt: skip


def _without_enclaves(journal: Journal, identity: AgentIdentity) -> Resolution:
    """A tree without enclaves, past its fence: the destination's ``resume`` decided.

    No source enclave records a decision here; the commit point is the
    destination agent's resume of the held tree (``docs/spec/commit.md`` 4.3),
    which it records durably before the tree runs (:mod:`.resumed`).  Until
    then it discards the tree once the tool is gone.  So the destination is
    asked (a ``deliver`` without frames; a live session answers once it
    settled): resumed, and the fenced source goes; never resumed (discarded, or
    the session is gone without the record), and the source runs again; no
    answer, and the source stays stopped, in doubt: giving it back could make a
    second running copy.
    """

    mid = journal.data["mid"]
    outcome, detail = _deliver(journal, identity, [])
    if outcome == "resumed":
        end_committed(journal)
        journal.update(phase="done")
        return Resolution(mid, journal.phase, "commit", "moved",
                          f"the destination resumed the tree {detail}".strip())  # fmt: skip
    if outcome in ("aborted", "unknown"):
        give_back(journal)
        journal.update(phase="done")
        return Resolution(mid, journal.phase, "none", "stayed",
                          "the destination never resumed the tree (and holds none)")  # fmt: skip
    return Resolution(
        mid, journal.phase, "none", "in-doubt",
        f"no enclaves: the destination decides, and answered {outcome!r} {detail}; the "
        "source stays stopped: run migsgx recover again once the destination agent answers",
    )  # fmt: skip


def _revoked(
    journal: Journal,
    platform_state: Path,
    identity: AgentIdentity,
    decisions: list[Decision | None],
    revoke: Revoke | None,
) -> Resolution:
    """Revoke the commits on the destination's refusal and give the source back (2.2)."""

    mid = journal.data["mid"]
    kinds = kinds_of(decisions)
    if revoke is None:
        return Resolution(mid, journal.phase, "revoked", "in-doubt", REVOKING)
    try:
        note = revoke(journal, identity, kinds)
    except MigSGXError as exc:
        now = kinds_of(decisions_of(platform_state, journal.enclave_mids))
        if "revoked" not in now:
            return Resolution(mid, journal.phase, "commit", "in-doubt", str(exc))
        # Some enclaves revoked, others still committed: the tree takes its enclaves
        # all together, so it is not given back.  A later recover asks the rest again;
        # an id the destination claimed is never refused, and an operator decides.
        revoked = ", ".join(str(i) for i, k in enumerate(now) if k == "revoked")
        committed = ", ".join(str(i) for i, k in enumerate(now) if k != "revoked")
        return Resolution(
            mid, journal.phase, "mixed", "in-doubt",
            f"{exc}; enclave(s) {revoked} revoked, {committed} still committed: the source "
            "stays stopped, not given back without all its enclaves; a later recover asks "
            "again, but an id the destination claimed is never refused (its copy may have "
            "run there): an operator decides",
        )  # fmt: skip
    journal.update(phase="done")
    return Resolution(
        mid, journal.phase, "revoked", "stayed",
        "the destination's tree could never run: its host refused the migration id for "
        f"good, the commit was revoked and the source runs on ({note})",
    )  # fmt: skip
