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

from ..sgx.counters import COUNTERS, CounterStore
from ..sgx.store_types import Decision
from .journal import Journal

__all__ = [
    "Resolution", "all_decided", "decisions_of", "keep_aborts", "kinds_of", "stays",
    "with_returned_aborts",
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

    @property
    def in_doubt(self) -> bool:
        return self.outcome in ("in-doubt",)

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
    them when the store recorded none (:func:`with_returned_aborts`).
    """

    if any(frames.values()):
        count = len(journal.enclave_mids)
        journal.update(aborts=[frames.get(i, b"").hex() for i in range(count)])


def stays(journal: Journal, platform_state: Path) -> bool:
    """Whether :func:`.recover_resolve.resolve` gives this migration to the source
    (``stayed``).

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
