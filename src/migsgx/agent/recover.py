"""``migsgx recover``: resolve every migration in doubt to exactly one runnable copy.

Runs on the source host (by hand, or by the guardian when the tool died).  For
each journal (:mod:`.journal`) that is not finished it reads the source
enclaves' decisions from this host's platform store, which are final
(``docs/spec/commit.md``), and carries them to the destination agent over the
agents' mutual-TLS channel (``deliver``):

* first, an images tmpfs a tool killed mid-dump left mounted is unmounted
  (:func:`~migsgx.containers.imagefs.sweep_leftovers`);
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

import contextlib
import fcntl
import logging
import os
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from ..containers.imagefs import sweep_leftovers
from ..errors import LostAfterCommitError, MigSGXError
from ..sgx.counters import COUNTERS, CounterStore
from ..sgx.store_types import Decision
from .control import AgentConnection
from .dumpdirs import sweep_dump_dirs
from .enclave_loss import lost_in_journal
from .faults import fault
from .handback import abort_frame_of, abort_reply, let_go, resume_source
from .holders import dead_holders, eof_socket
from .journal import Journal
from .source_host import alive, end_committed, end_fenced, give_back, is_guardian, lost_detail
from .tls import AgentIdentity

#: Revokes the committed enclaves on the destination's refusal and hands the source
#: back (:meth:`.redeliver.HeldSource.revoke`); a note for the outcome's detail.
Revoke = Callable[[Journal, AgentIdentity, list[str]], str]

if TYPE_CHECKING:
    from .redeliver import HeldSource

__all__ = ["Resolution", "decisions_of", "keep_aborts", "recover", "resolve"]

log = logging.getLogger("migsgx.recover")

DELIVER_TIMEOUT: Final = 30.0
#: How long ``migsgx recover`` waits for the guardian it woke to deliver the state again.
GUARDIAN_WAIT: Final = 90.0
#: What delivers the state again: (journal, identity, recorded tokens) -> tokens to deliver.
Redeliver = Callable[[Journal, AgentIdentity, list[bytes]], list[bytes]]
#: What commits the undecided source enclaves of a migration that committed (their
#: indexes in the journal's ``enclave_mids``); the guardian's, which holds them.
RollForward = Callable[[list[int]], None]


@dataclass
class Resolution:
    """What ``recover`` found and did for one migration."""

    mid: str
    phase: str
    decision: str  # commit, abort, mixed, none
    outcome: str  # moved, stayed, in-doubt, lost, in-progress, done
    detail: str = ""
    #: Source enclaves that died before the decision, their state gone (``enclave_loss``).
    lost_enclaves: list[dict[str, Any]] = field(default_factory=list)

    @property
    def in_doubt(self) -> bool:
        return self.outcome in ("in-doubt",)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def decisions_of(platform_state: Path, mids: list[bytes]) -> list[Decision | None]:
    store = CounterStore(platform_state / COUNTERS)
    return [store.decision(mid) for mid in mids]


def _deliver(
    journal: Journal, identity: AgentIdentity, frames: list[bytes], decision: str | None = None
) -> tuple[str, str]:
    """Carry ``frames`` to the destination agent; its outcome and a detail.

    ``decision`` "abort": the store holds ABORT decisions; the destination then
    discards a tree held for a copy that died undecided (no state comes again).
    """

    lost = [i for i in journal.data.get("source_lost") or [] if isinstance(i, int)]
    try:
        control = AgentConnection(journal.to, identity, DELIVER_TIMEOUT)
    except MigSGXError as exc:
        return "unreachable", str(exc)
    try:
        control.greet("recover")
        reply = control.call(
            {
                "t": "deliver",
                "session_id": journal.mid,
                "frames": frames,
                "enclave_mids": journal.enclave_mids,
                **({"decision": decision} if decision else {}),
                **({"source_lost": lost} if decision == "abort" and lost else {}),
            },
            "delivered",
        )
    except MigSGXError as exc:
        return "unreachable", str(exc)
    finally:
        control.close()
    return str(reply["outcome"]), f"destination pid {reply['pid']}" if reply["pid"] else ""


_MIXED = (
    "some enclaves committed, the others have not decided yet: the first COMMIT is the "
    "commit point, so they must commit too"
)

_REFUSABLE = (
    "committed, and the destination's tree can never run (a post-copy tree killed after "
    "the COMMIT): whoever holds the source enclaves revokes their commit on its refusal"
)
_COPY_LOST = (
    "committed; the destination keeps the tree held, but its loaded copy died before "
    "it judged the decision: the committed source enclaves must deliver their state again"
)


def resolve(
    journal: Journal,
    platform_state: Path,
    identity: AgentIdentity,
    *,
    tool_gone: bool = False,
    redeliver: Redeliver | None = None,
    roll_forward: RollForward | None = None,
    release: Callable[[], None] | None = None,
    revoke: Revoke | None = None,
) -> Resolution:
    """Resolve one migration (see the module docstring).

    ``redeliver`` (of whoever holds the committed source enclaves: the guardian,
    or this ``recover`` once it took their connections back) delivers the state
    again when the destination lost a loaded copy; ``roll_forward`` (theirs too)
    commits the enclaves that had not decided when another of the same
    migration committed; ``release`` lets the committed ones go (wipe and exit)
    once the destination runs or can never run; ``revoke`` (theirs too) undoes
    the commits on the destination's proven refusal where its copy can never
    run (a post-copy tree killed after the COMMIT, ``commit.md`` 2.2) and hands
    the source back.
    """

    mid = journal.data["mid"]
    if journal.phase == "done":
        if release is not None:
            release()  # (only a committed enclave obeys: the tool died before it let go)
            decided = decisions_of(platform_state, journal.enclave_mids)
            if decided and all(d is not None and d.kind == "commit" for d in decided):
                end_fenced(journal)  # (and before CRIU ended the source tree)
        return Resolution(mid, journal.phase, "-", "done")
    if not tool_gone and alive(int(journal.data["tool_pid"])) and journal.phase != "aborted":
        return Resolution(mid, journal.phase, "-", "in-progress", "its tool still runs")
    decisions = decisions_of(platform_state, journal.enclave_mids)
    kinds = {d.kind if d is not None else "none" for d in decisions}
    if kinds == {"commit", "none"} and roll_forward is not None:
        # The first COMMIT was the commit point: the rest commit too, never abort.
        roll_forward([i for i, d in enumerate(decisions) if d is None])
        decisions = decisions_of(platform_state, journal.enclave_mids)
        kinds = {d.kind if d is not None else "none" for d in decisions}
    returned = journal.aborts or [b""] * len(decisions)  # (one per enclave)
    if "commit" not in kinds and any(
        d is None and f for d, f in zip(decisions, returned, strict=True)
    ):
        decisions = _with_returned_aborts(journal, decisions)
        kinds = {d.kind if d is not None else "none" for d in decisions}
    if not decisions or kinds == {"none"}:
        # No source enclave decided: none committed, so no destination copy can run.
        if journal.phase in ("begun", "aborted"):
            # The source is the copy: it runs again before the journal says done
            # (a tool killed in its roll-back left it stopped, or frozen).
            give_back(journal)
            journal.update(phase="done")
            return Resolution(mid, journal.phase, "none", "stayed", "nothing was decided")
        if not decisions:
            return _without_enclaves(journal, identity)
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
                return Resolution(mid, journal.phase, "commit", "in-doubt", _COPY_LOST)
            try:
                frames = redeliver(journal, identity, frames)
            except MigSGXError as exc:
                return Resolution(
                    mid, journal.phase, "commit", "in-doubt",
                    f"{_COPY_LOST}; delivering the state again failed: {exc}",
                )  # fmt: skip
            outcome, detail = _deliver(journal, identity, frames)
            detail = f"the state was delivered again to a fresh enclave; {detail}".strip("; ")
        if outcome == "resumed":
            end_committed(journal)
            journal.update(phase="done")
            if release is not None:
                release()
            return Resolution(mid, journal.phase, "commit", "moved", detail)
        if outcome == "refusable":
            # A post-copy tree killed after the COMMIT: it can never run.  Its host's
            # store refuses the ids for good, and the commits are revoked (2.2).
            if revoke is None:
                return Resolution(mid, journal.phase, "commit", "in-doubt", _REFUSABLE)
            return _revoked(journal, platform_state, identity, decisions, revoke)
        if outcome in ("unknown", "aborted"):
            if release is not None:
                release()  # no tree is held for the state any more: it can never run
            return Resolution(mid, journal.phase, "commit", "lost", lost_detail(journal, outcome))
        if outcome == LostAfterCommitError.code:
            # Claimed, then its enclave died (W3): never delivered again; the source goes.
            end_committed(journal)
            journal.update(phase="done")
            if release is not None:
                release()
            return Resolution(
                mid, journal.phase, "commit", "lost",
                "the destination's enclave claimed the id and then died: its application "
                f"runs without it {detail}".strip(),
            )  # fmt: skip
        return Resolution(
            mid, journal.phase, "commit", "in-doubt",
            f"committed; the destination answered {outcome!r} {detail}".strip(),
        )  # fmt: skip
    if kinds == {"commit", "none"}:
        undecided = [str(i) for i, d in enumerate(decisions) if d is None]
        return Resolution(mid, journal.phase, "mixed", "in-doubt",
                          f"{_MIXED} (enclave(s) {', '.join(undecided)})")  # fmt: skip
    if "commit" in kinds:
        # Only where a platform store could not be read or written when an abort
        # was recorded (the group rule is the store's): an operator decides.
        return Resolution(
            mid, journal.phase, "mixed", "in-doubt",
            "some enclaves committed, others aborted: an operator decides",
        )  # fmt: skip
    # At least one ABORT and no COMMIT: the source is the copy; end the destination's.
    frames = [d.frame if d is not None else b"" for d in decisions]
    if journal.holders:
        # An enclave that aborted lets its duplicate go once the application has its
        # connection back (the guardian, or :func:`_hand_back`, gave it before this):
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
    kinds = [d.kind if d is not None else "none" for d in decisions]
    if revoke is None:
        return Resolution(mid, journal.phase, "revoked", "in-doubt",
                          "some commits were revoked: migsgx recover revokes the rest")  # fmt: skip
    try:
        note = revoke(journal, identity, kinds)
    except MigSGXError as exc:
        now = [
            d.kind if d is not None else "none"
            for d in decisions_of(platform_state, journal.enclave_mids)
        ]
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


def _with_returned_aborts(
    journal: Journal, decisions: list[Decision | None]
) -> list[Decision | None]:
    """The store's decisions, with the ABORT an enclave returned where its record failed.

    An enclave that aborted outside a migration group writes its record best
    effort (``docs/spec/commit.md`` 1 rule 4): when its platform service died
    with the tool, the store holds nothing, but the ABORT frame its
    ``__mig_abort`` returned to the guardian (or ``recover``) is in the journal.
    It is carried like a stored one, so that the destination discards its held
    copy; the destination enclave judges the frame itself (it is authenticated
    under the migration's keys), so a wrong one ends nothing.  Never beside a
    recorded COMMIT (the caller checks): that is the roll-forward path.
    """

    return [
        Decision(mid, "abort", frame) if d is None and frame else d
        for d, mid, frame in zip(decisions, journal.enclave_mids, journal.aborts, strict=True)
    ]


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
            result = _resolve_orphaned(journal, Path(state), identity)
            if result is None:
                result = resolve(journal, Path(state), identity)
            if result.detail in (_COPY_LOST, _REFUSABLE) or result.detail.startswith(_MIXED):
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


def _orphaned(journal: Journal) -> bool:
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


def _resolve_orphaned(
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

    if not _orphaned(journal):
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
        if not _orphaned(journal):
            return None
        decisions = decisions_of(platform_state, journal.enclave_mids)
        if journal.phase == "done" and not (
            decisions and all(d is not None and d.kind == "commit" for d in decisions)
        ):
            # Ended by an abort: its enclaves went back to the application and let
            # their duplicates go; a number recorded then may name a later
            # migration's duplicate now, which is never taken.
            return None
        held = HeldSource.take_back(journal)
        if held is None:
            return None
        recorded = len(journal.holders)
        try:
            if journal.phase == "done":
                # The destination runs: the committed enclaves only wipe and exit.
                held.release()
                end_fenced(journal)  # (the tool died before CRIU ended the source tree)
                journal.update(holders=[])
                released = f"{len(held.enclaves)} committed source enclave(s) released"
                return Resolution(journal.data["mid"], "done", "commit", "done", released)
            if all(d is None for d in decisions):
                # Nothing decided: the source is the copy.  Each enclave aborts (its
                # ABORT is recorded) and thaws; it goes back to the application below.
                frames = {i: _abort_of(e.sock, journal, i) for i, e in held.enclaves.items()}
                # Killed here, this recover leaves the enclaves aborted and their frames
                # nowhere else: each keeps its duplicate (an abort does not let it go),
                # so the next recover takes it back and asks again.
                fault("recover.abort-answered")
                keep_aborts(journal, frames)
            handed = ""
            # Enclaves that died (undecided: ``_stays`` finds no COMMIT) are handed
            # back as connections at end of file, as in a crash of each.
            dead = dead_holders(journal.holders) if len(held.enclaves) < recorded else []
            whole = len(held.enclaves) + len(set(dead) - set(held.enclaves)) == recorded
            if _stays(journal, platform_state) and whole:
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


def _stays(journal: Journal, platform_state: Path) -> bool:
    """Whether :func:`resolve` gives this migration to the source (``stayed``).

    No COMMIT, and an ABORT recorded or returned (the journal's ``aborts``), or
    nothing decided while the migration had not passed its fence.
    """

    decisions = decisions_of(platform_state, journal.enclave_mids)
    returned = journal.aborts or [b""] * len(decisions)
    kinds = {
        d.kind if d is not None else ("abort" if f else "none")
        for d, f in zip(decisions, returned, strict=True)
    }
    if "commit" in kinds:
        return False
    return not decisions or kinds != {"none"} or journal.phase in ("begun", "aborted")


def _hand_back(journal: Journal, held: HeldSource, recorded: int) -> str:
    """Give the source back with its enclaves (taken back, aborted); then forget the holders.

    The enclaves keep their duplicates until the application has its connections
    again (it tells them, ``__mig_unhold``), so a crash before that loses nothing;
    afterwards the recorded numbers may name another descriptor (a later
    migration's duplicate) and are cleared.  A note for the outcome's detail.
    """

    give_back(journal)
    dead = {i: eof_socket() for i in range(recorded) if i not in held.enclaves}
    socks = [held.enclaves[i].sock if i in held.enclaves else dead[i] for i in range(recorded)]
    app_pid, app_name = int(journal.data["app_pid"]), str(journal.data["app_name"])
    try:
        failed = resume_source(app_pid, app_name, socks, journal.fenced_now(), [], log.warning)
    finally:
        for sock in dead.values():
            sock.close()
    journal.update(holders=[])
    return "the enclaves were not taken back" if failed else "enclaves handed back"


def _abort_of(sock: socket.socket, journal: Journal, index: int) -> bytes:
    """Abort enclave ``index``; its ABORT frame, asked again if it had aborted before.

    An enclave that aborted already answers ``__mig_abort`` with no frame; it
    keeps the one it sealed for its migration id and hands it out again
    (``__mig_abort_frame``, ``docs/spec/commit.md`` 1 rule 6).
    """

    answer, frame = abort_reply(sock)
    if answer == "aborted" and not frame and index < len(journal.enclave_mids):
        frame = abort_frame_of(sock, journal.enclave_mids[index])
    return frame


def keep_aborts(journal: Journal, frames: dict[int, bytes]) -> None:
    """Write the ABORT frames the source enclaves returned (by index) into the journal.

    Only where one returned a frame: :func:`resolve` carries them when the
    store recorded none (:func:`_with_returned_aborts`).
    """

    if any(frames.values()):
        count = len(journal.enclave_mids)
        journal.update(aborts=[frames.get(i, b"").hex() for i in range(count)])


def _through_guardian(journal: Journal, result: Resolution) -> Resolution:
    """The state must come again, or the rest must commit: only the guardian holds
    the source enclaves.

    It retries by itself with a growing pause; SIGUSR1 makes it try at once,
    and this waits for its journal to say ``done``.  No guardian, and no
    enclave holding a connection to take back (:func:`_resolve_orphaned` found
    none): the state is gone.  (Undecided ones whose connection closed committed
    by themselves when their group had: what is still undecided then is an
    enclave that died before it could.)
    """

    pid = journal.guardian_pid
    if not pid or not is_guardian(pid):
        if result.decision == "mixed":
            return Resolution(
                result.mid, journal.phase, "mixed", "in-doubt",
                f"{result.detail}; no guardian holds them any more: an undecided source "
                "enclave that died took its state with it (its destination copy needs a "
                "token only it could make); an operator decides",
            )  # fmt: skip
        return Resolution(
            result.mid, journal.phase, "commit", "lost",
            f"{_COPY_LOST}, and the guardian that held them is gone: so is the state. "
            + lost_detail(journal, "copy-lost"),
        )  # fmt: skip
    os.kill(pid, signal.SIGUSR1)
    deadline = time.monotonic() + GUARDIAN_WAIT
    while True:
        if Journal.load(journal.path).phase == "done":
            decided = decisions_of(journal.path.parent.parent.parent, journal.enclave_mids)
            if decided and all(d is not None and d.kind == "revoked" for d in decided):
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
