"""What ``migsgx recover`` reads, and what it says of one migration.

The durable records a resolution starts from: the source enclaves' decisions in
this host's platform store, which are final (``docs/spec/commit.md``), and the
ABORT frames enclaves returned where their record failed, which the journal
(:mod:`.journal`) keeps.  :class:`Resolution` is the answer for one migration
(``migsgx recover --json`` prints its fields).  Nothing here talks to an agent
or an enclave; only :func:`keep_aborts` writes (into the journal).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import cbor2

from .. import _proc
from ..sgx.counters import COUNTERS, CounterStore
from ..sgx.store_types import Decision
from .journal import Journal

__all__ = [
    "Resolution", "all_decided", "committed_any", "decisions_of", "keep_aborts", "kinds_of",
    "not_aborted", "stays", "with_returned_aborts",
]  # fmt: skip


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
    #: Gates on the source's listeners that stay closed (``source_host.gate_report``).
    closed_gates: list[dict[str, Any]] = field(default_factory=list)

    @property
    def in_doubt(self) -> bool:
        """In doubt, or unfinished on this host: a gate that stays closed drops every
        new client of the source's listeners until someone opens it (exit 7)."""

        return self.outcome in ("in-doubt",) or bool(self.closed_gates)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def decisions_of(platform_state: Path, mids: list[bytes]) -> list[Decision | None]:
    store = CounterStore(platform_state / COUNTERS)
    return [store.decision(mid) for mid in mids]


def kinds_of(decisions: Sequence[Decision | None]) -> list[str]:
    """Each enclave's decision kind (``commit``, ``abort``, ``revoked``), ``none`` if
    it has not decided."""

    return [d.kind if d is not None else "none" for d in decisions]


def all_decided(decisions: Sequence[Decision | None], kind: str) -> bool:
    """Whether there are decisions and every one is ``kind``."""

    return set(kinds_of(decisions)) == {kind}


def committed_any(decisions: Sequence[Decision | None]) -> bool:
    """Whether an enclave of the migration committed (a revoked COMMIT counts: 1.1)."""

    return bool({"commit", "revoked"} & set(kinds_of(decisions)))


def not_aborted(journal: Journal, decisions: Sequence[Decision | None]) -> list[int]:
    """The source enclaves that may still be frozen in this migration: by index.

    Those with no decision recorded, no ABORT frame returned (the journal's
    ``aborts``) and not found dead undecided (``source_lost``), whose recorded
    process (``holders``) still lives: such an enclave has not aborted, or
    nobody saw it abort.  One whose abort the platform store could not check
    (``group-unchecked``, ``docs/spec/commit.md`` 1.1 rule 4) stays frozen so,
    and so does one that does not answer.  The source is never given back
    without them (the application takes its enclaves all or none, and a frozen
    one answers no call).  None once the journal says ``aborted`` (whoever
    wrote it saw every live enclave abort) or ``done``, but for the enclaves an
    ``aborted`` journal names ``unconfirmed``: the tool's roll-back could not
    confirm their aborts (no answer, or a refusal), so they count as frozen
    whatever is recorded (a recorded ABORT whose answer was lost may still be
    frozen) until one answers an abort asked again (``docs/spec/commit.md`` 4).
    """

    if journal.phase == "done":
        return []
    lost = {i for i in journal.data.get("source_lost") or [] if type(i) is int}
    holders = journal.holders
    if journal.phase == "aborted":
        described = journal.enclaves
        return [
            i for i in journal.unconfirmed
            if i < len(decisions) and i not in lost
            and (_lives(holders[i]) if i < len(holders) and holders[i] else
                 i < len(described) and _described_lives(described[i]))
        ]  # fmt: skip
    returned = journal.aborts or [b""] * len(decisions)
    return [
        i for i, (d, frame) in enumerate(zip(decisions, returned, strict=True))
        if d is None and not frame and i not in lost and i < len(holders)
        and _lives(holders[i])
    ]  # fmt: skip


def _described_lives(described: str) -> bool:
    """Whether the enclave a journal's ``enclaves`` entry names still runs, by its pid
    (no hold was given, ``[]``: its hold refused, so no start time was recorded; a pid
    reused since counts as alive: in doubt, never a frozen enclave taken for gone).
    An entry that cannot be read names none."""

    try:
        pid = cbor2.loads(bytes.fromhex(described))["info"]["pid"]
    except (ValueError, KeyError, TypeError, cbor2.CBORDecodeError):
        return False
    return isinstance(pid, int) and not isinstance(pid, bool) and pid > 0 and _proc.alive(pid)


def _lives(holder: object) -> bool:
    """Whether a journal's ``holders`` entry names a process that still runs (the
    recorded pid with the recorded start time; a zombie has ended).  An entry that
    names none it can check (``[]``: no hold was given; damaged) counts as none."""

    if not (isinstance(holder, list) and len(holder) >= 3):
        return False
    pid, start = holder[0], holder[2]
    if not (isinstance(pid, int) and not isinstance(pid, bool) and pid > 0):
        return False
    if not (isinstance(start, str) and start):
        return False
    return str(_proc.start_time(pid) or "") == start and _proc.alive(pid)


def with_returned_aborts(
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


def keep_aborts(journal: Journal, frames: dict[int, bytes]) -> None:
    """Write the ABORT frames the source enclaves returned (by index) into the journal.

    Only where one returned a frame: :func:`.recover_resolve.resolve` carries
    them when the store recorded none (:func:`with_returned_aborts`).  A frame
    kept before stays where this round returned none (an enclave asked again
    after it aborted answers without one).
    """

    if any(frames.values()):
        count = len(journal.enclave_mids)
        kept = journal.aborts or [b""] * count
        journal.update(aborts=[(frames.get(i) or kept[i]).hex() for i in range(count)])


def stays(journal: Journal, platform_state: Path) -> bool:
    """Whether :func:`.recover_resolve.resolve` gives this migration to the source
    (``stayed``).

    No COMMIT, and an ABORT recorded or returned (the journal's ``aborts``), or
    nothing decided while the migration had not passed its fence; never while
    a live enclave has not aborted (:func:`not_aborted`).
    """

    decisions = decisions_of(platform_state, journal.enclave_mids)
    if not_aborted(journal, decisions):
        return False
    returned = journal.aborts or [b""] * len(decisions)
    kinds = {
        d.kind if d is not None else ("abort" if f else "none")
        for d, f in zip(decisions, returned, strict=True)
    }
    if "commit" in kinds:
        return False
    return not decisions or kinds != {"none"} or journal.phase in ("begun", "aborted")
