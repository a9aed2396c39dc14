"""``migsgx recover``: resolve every migration in doubt to exactly one runnable copy.

Runs on the source host (by hand, or by the guardian when the tool died).  For
each journal (:mod:`.journal`) that is not finished it reads the source
enclaves' decisions from this host's platform store, which are final
(``docs/spec/commit.md``), and carries them to the destination agent over the
agents' mutual-TLS channel (``deliver``):

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
  enclaves there (``commit.md``, 2.1; :mod:`.redeliver`).  Only the guardian
  holds their connections, so it does this; ``migsgx recover`` wakes it and
  waits for its result;
* every enclave decided COMMIT but the destination holds no loaded copy and
  never activated the ids (its agent lost the session and found no held tree
  to adopt, or the held tree was discarded): ``lost``.  What remains is said
  exactly: the decision, the stopped source tree, the destination's unowned
  tree if any.

Idempotent: decisions are final and delivering one twice changes nothing.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Final

from ..containers.cgroups import thaw_file
from ..containers.podnet import unlock
from ..errors import LostAfterCommitError, MigSGXError
from ..sgx.counters import CounterStore, Decision
from ..sgx.platform import COUNTERS
from .control import AgentConnection
from .journal import Journal
from .protocol import VERSION
from .tls import AgentIdentity

__all__ = ["Resolution", "decisions_of", "recover", "resolve"]

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

    @property
    def in_doubt(self) -> bool:
        return self.outcome in ("in-doubt",)

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def decisions_of(platform_state: Path, mids: list[bytes]) -> list[Decision | None]:
    store = CounterStore(platform_state / COUNTERS)
    return [store.decision(mid) for mid in mids]


def _deliver(journal: Journal, identity: AgentIdentity, frames: list[bytes]) -> tuple[str, str]:
    """Carry ``frames`` to the destination agent; its outcome and a detail."""

    try:
        control = AgentConnection(journal.to, identity, DELIVER_TIMEOUT)
    except MigSGXError as exc:
        return "unreachable", str(exc)
    try:
        control.call({"t": "hello", "version": VERSION, "host_id": "recover"}, "welcome")
        reply = control.call(
            {
                "t": "deliver",
                "session_id": journal.mid,
                "frames": frames,
                "enclave_mids": journal.enclave_mids,
            },
            "delivered",
        )
    except MigSGXError as exc:
        return "unreachable", str(exc)
    finally:
        control.close()
    return str(reply["outcome"]), f"destination pid {reply['pid']}" if reply["pid"] else ""


def _lost(journal: Journal, outcome: str) -> str:
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
    stopped = [p for p in journal.fenced if _alive(p)]
    return (
        f"committed (the decision stands, the source never runs again), but {where}; its "
        f"claim store never activated {len(journal.enclave_mids)} enclave id(s): no copy runs. "
        "The state was held only by the frozen committed source enclaves, which end with "
        "the guardian. The source tree stays "
        f"stopped (pids {' '.join(map(str, stopped)) or 'none left'}): remove it by hand"
    )


_MIXED = (
    "some enclaves committed, the others have not decided yet: the first COMMIT is the "
    "commit point, so they must commit too"
)

_COPY_LOST = (
    "committed; the destination keeps the tree held, but its loaded copy died before "
    "it judged the decision: the committed source enclaves must deliver their state again"
)


def _is_guardian(pid: int) -> bool:
    """Whether ``pid`` is still a migration guardian (a recycled pid gets no signal)."""

    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"migsgx.agent.guardian" in argv


def _signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def _give_back(journal: Journal) -> None:
    """The source is the copy: it runs again, a container with its address.

    What the guardian would have done (:mod:`.guardian`), from the journal's
    ``undo`` notes: a post-copy CRIU that still holds the tree is ended (only a
    process that is still runc's or CRIU's: a pid may have been reused), the
    pod's ``eth0`` comes up, the cgroup thaws, the fenced tasks continue.
    Idempotent: a source the guardian gave back already is left as it runs.
    """

    notes = journal.undo
    serving = [int(p) for n in notes if n.startswith("criu ") for p in n.split()[1:]]
    for pid in serving:
        try:
            argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
        except OSError:
            continue
        if Path(argv0.decode(errors="replace")).name.startswith(("criu", "runc")):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    for pid in serving:  # (CRIU must have let go before SIGCONT can stick)
        deadline = time.monotonic() + 10
        while _alive(pid) and _state(pid) != "Z" and time.monotonic() < deadline:
            time.sleep(0.02)
    for note in notes:
        kind, _, arg = note.partition(" ")
        try:
            if kind == "netup" and Path(arg).exists():
                unlock(Path(arg))
            elif kind == "thaw":
                thaw_file(arg)
        except MigSGXError as exc:
            log.warning("giving the source back: %s: %s", note, exc)
    _signal_all(journal.fenced, signal.SIGCONT)


def _state(pid: int) -> str:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat[stat.rindex(")") + 2 :].split()[0]


def resolve(
    journal: Journal,
    platform_state: Path,
    identity: AgentIdentity,
    *,
    tool_gone: bool = False,
    redeliver: Redeliver | None = None,
    roll_forward: RollForward | None = None,
) -> Resolution:
    """Resolve one migration (see the module docstring).

    ``redeliver`` (the guardian's, which holds the committed source enclaves)
    delivers the state again when the destination lost a loaded copy;
    ``roll_forward`` (the guardian's too) commits the enclaves that had not
    decided when another of the same migration committed.
    """

    mid = journal.data["mid"]
    if journal.phase == "done":
        return Resolution(mid, journal.phase, "-", "done")
    if not tool_gone and _alive(int(journal.data["tool_pid"])) and journal.phase != "aborted":
        return Resolution(mid, journal.phase, "-", "in-progress", "its tool still runs")
    decisions = decisions_of(platform_state, journal.enclave_mids)
    kinds = {d.kind if d is not None else "none" for d in decisions}
    if kinds == {"commit", "none"} and roll_forward is not None:
        # The first COMMIT was the commit point: the rest commit too, never abort.
        roll_forward([i for i, d in enumerate(decisions) if d is None])
        decisions = decisions_of(platform_state, journal.enclave_mids)
        kinds = {d.kind if d is not None else "none" for d in decisions}
    if not decisions or kinds == {"none"}:
        # No source enclave decided: none committed, so no destination copy can run.
        if journal.phase in ("begun", "aborted") or not decisions:
            journal.update(phase="done")
            return Resolution(mid, journal.phase, "none", "stayed", "nothing was decided")
        return Resolution(
            mid, journal.phase, "none", "in-doubt",
            "the source enclaves never decided; if they are gone, so is their state",
        )  # fmt: skip
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
            _signal_all(journal.fenced, signal.SIGKILL)
            journal.update(phase="done")
            return Resolution(mid, journal.phase, "commit", "moved", detail)
        if outcome in ("unknown", "aborted"):
            return Resolution(mid, journal.phase, "commit", "lost", _lost(journal, outcome))
        if outcome == LostAfterCommitError.code:
            # Claimed, then its enclave died (W3): never delivered again; the source goes.
            _signal_all(journal.fenced, signal.SIGKILL)
            journal.update(phase="done")
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
    _give_back(journal)
    outcome, detail = _deliver(journal, identity, frames)
    if outcome in ("aborted", "unknown"):
        journal.update(phase="done")
        return Resolution(mid, journal.phase, "abort", "stayed", outcome)
    # Which copy runs is not in doubt: the source (no commit can ever exist).  The
    # destination's loaded copy goes once an ABORT reaches it; a later recover retries.
    return Resolution(
        mid, journal.phase, "abort", "stayed",
        f"the destination was not told yet ({outcome} {detail})".strip(),
    )  # fmt: skip


def recover(state: Path, identity: AgentIdentity | None = None) -> list[Resolution]:
    """Resolve every unfinished migration of the source host with platform state ``state``."""

    identity = identity or AgentIdentity.of_state(state)
    results = []
    for journal in Journal.all(identity.directory):
        try:
            result = resolve(journal, Path(state), identity)
            if result.detail == _COPY_LOST or result.detail.startswith(_MIXED):
                result = _through_guardian(journal, result)
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
    and this waits for its journal to say ``done``.  No guardian: the committed
    source enclaves ended with it, and so did the state.  (Undecided ones whose
    connection closed committed by themselves when their group had: what is
    still undecided then is an enclave that died before it could.)
    """

    pid = journal.guardian_pid
    if not pid or not _is_guardian(pid):
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
            + _lost(journal, "copy-lost"),
        )  # fmt: skip
    os.kill(pid, signal.SIGUSR1)
    deadline = time.monotonic() + GUARDIAN_WAIT
    while True:
        if Journal.load(journal.path).phase == "done":
            return Resolution(result.mid, "done", "commit", "moved",
                              f"the guardian (pid {pid}) delivered the state again")  # fmt: skip
        if not _is_guardian(pid):
            return _through_guardian(journal, result)  # (gone meanwhile: said as above)
        if time.monotonic() > deadline:
            break
        time.sleep(0.1)
    return Resolution(
        result.mid, journal.phase, result.decision, "in-doubt",
        f"{result.detail}; the guardian (pid {pid}) is at it: run recover later",
    )  # fmt: skip
