"""The faults a storm draws from: every named fault point of a migration, by the party hit.

A storm (:mod:`migsgx.lab.storm`) migrates one application back and forth and,
for each migration, draws one fault at random from a seed: ``kill -9`` of a party
(the tool, its guardian, the source application, enclave or platform service;
the destination agent, enclave or platform service), or a network fault of a
connection (drop, stall, corrupted record), at one named point
(:data:`migsgx.agent.faults.POINTS`), or no fault at all.  Every fault is
reached through ``MIGSGX_FAULT``, never by sleeping, so a seed replays the same
sequence of faults.

A fault is drawn only where it acts in the mode the storm runs
(:func:`unreachable`): a point the migration never passes in that mode (no
early handshake with ``--late-handshake``; ``tool.abort-answered`` comes only
where another fault rolled the migration back), or an action with nothing to act
on there (no guardian before the freeze), would let the migration pass
untested.  The storm reads whether each point named fired (:func:`fired`); one
that did not is a failure of the run, never a pass.

What a fault may cost is part of its description: where the party killed held
the only copy of the state (the source enclave before the decision, the
destination enclave or agent after the claim), losing it is the documented
outcome (``docs/spec/commit.md``, section 5); everywhere else exactly one copy
must run with every acknowledged write.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final

from .storm_timeline import marks

__all__ = ["AGENT_POINTS", "SOURCE_ENCLAVE", "TOOL_POINTS", "Fault", "draw", "fired", "parse",
           "unreachable"]  # fmt: skip

#: The tool's points, in the order a migration reaches them.
TOOL_POINTS: Final = (
    "tool.after-handshake",
    "tool.after-prepare",
    "tool.before-dump",
    "tool.before-images",
    "tool.after-group",
    "tool.before-commit",
    "tool.abort-answered",  # (reached only where the migration rolls back)
    "tool.after-commit",
    "tool.before-token",
    "tool.before-release",
)
#: Where the decision is written: points from here on are past the commit point.
_TOOL_DECIDED: Final = TOOL_POINTS.index("tool.after-commit")

#: What the tool does at one of its points: kill a party of the source host, itself, or
#: break its control (``-control``) or enclave data (``-data``) connection.
TOOL_ACTIONS: Final = (
    "kill",
    "kill-guardian",
    "kill-guardian-and-tool",
    "kill-source",
    "kill-source-enclave",
    "kill-source-platform",
    "kill-source-platform-and-tool",
    "drop-control",
    "stall-control",
    "corrupt-control",
    "drop-data",
    "stall-data",
    "corrupt-data",
)

#: The destination agent's points, in the order a migration reaches them.
AGENT_POINTS: Final = (
    "agent.before-restore",
    "agent.after-restore",
    "agent.before-claim",
    "agent.after-claim",
    "agent.before-resume",
)
#: From here on the destination enclave claimed the migration id: it holds the only copy.
_AGENT_CLAIMED: Final = AGENT_POINTS.index("agent.after-claim")

AGENT_ACTIONS: Final = ("kill", "kill-platform", "kill-enclave", "stall")

#: :attr:`Fault.may_lose` of a source enclave killed before the decision: the tool
#: says so with its own status (11, ``source-enclave-lost``), not 6.
SOURCE_ENCLAVE: Final = "the source enclave held the only copy"

_PARTY: Final = {
    "kill": "{side}",
    "kill-guardian": "guardian",
    "kill-guardian-and-tool": "guardian + tool",
    "kill-source": "source app",
    "kill-source-enclave": "source enclave",
    "kill-source-platform": "source platform service",
    "kill-source-platform-and-tool": "source platform service + tool",
    "kill-platform": "destination platform service",
    "kill-enclave": "destination enclave",
}


@dataclass(frozen=True)
class Fault:
    """One fault: ``MIGSGX_FAULT`` of the tool (``tool``) or of the destination agent
    (``agent``); both empty for a migration without a fault."""

    tool: str = ""
    agent: str = ""

    @property
    def spec(self) -> str:
        """How a storm names it (``--fault``): ``none``, or the specs joined by ``+``."""

        return "+".join(s for s in (self.tool, self.agent) if s) or "none"

    @property
    def kind(self) -> str:
        """The fault's kind, for the summary: ``none``, ``kill -9 PARTY``, ``connection X``."""

        if not (self.tool or self.agent):
            return "none"
        action = (self.tool or self.agent).partition(":")[2]
        if action == "stall" or action.endswith(("-control", "-data")):
            return f"connection {action.partition('-')[0]}"
        side = "tool" if self.tool else "destination agent"
        return "kill -9 " + _PARTY[action].format(side=side)

    @property
    def points(self) -> list[str]:
        """Every fault point this fault names (the tool's may be several, comma-joined)."""

        specs = [*self.tool.split(","), *self.agent.split(",")]
        return [s.strip().partition(":")[0] for s in specs if s.strip()]

    @property
    def kills_tool(self) -> bool:
        """Whether the tool itself dies by SIGKILL (its exit status is then -9)."""

        action = self.tool.partition(":")[2]
        return action in ("kill", "kill-guardian-and-tool", "kill-source-platform-and-tool")

    @property
    def may_lose(self) -> str:
        """Why the state may be lost (the killed party held its only copy), or ``""``.

        ``gone``: the source application itself was killed before it moved.
        """

        point, _, action = self.tool.partition(":")
        if action == "kill-source" and TOOL_POINTS.index(point) < _TOOL_DECIDED:
            return "gone"
        if action == "kill-source-enclave" and TOOL_POINTS.index(point) < _TOOL_DECIDED:
            return SOURCE_ENCLAVE
        point, _, action = self.agent.partition(":")
        if action in ("kill", "kill-enclave") and AGENT_POINTS.index(point) >= _AGENT_CLAIMED:
            return "the destination enclave held the only copy"
        return ""


def parse(spec: str) -> Fault:
    """The fault ``spec`` names (:attr:`Fault.spec`), checked against the known points."""

    if spec == "none":
        return Fault()
    tool = agent = ""
    for part in spec.split("+"):
        point, _, action = part.partition(":")
        if point in TOOL_POINTS and action in TOOL_ACTIONS:
            tool = part
        elif point in AGENT_POINTS and action in AGENT_ACTIONS:
            agent = part
        else:
            raise ValueError(f"unknown storm fault {part!r}")
    return Fault(tool, agent)


#: Reached only where the migration rolls back: a second fault's doing (a pair's,
#: ``benchmarks/storm_pairs.py``), never a single fault's.
_ROLL_BACK_ONLY: Final = ("tool.abort-answered",)
#: The guardian starts after the freeze: before it, these kill nothing.
_GUARDIAN_ACTIONS: Final = ("kill-guardian", "kill-guardian-and-tool")
#: With ``--late-handshake`` the enclaves' data connections open after ``prepare``,
#: in each enclave's own thread: a ``-data`` fault before the dump finds none (or
#: races with their opening).
_NO_DATA_YET: Final = ("tool.after-prepare", "tool.before-dump")


def unreachable(spec: str, options: Sequence[str] = ()) -> str:
    """Why the fault ``POINT:ACTION`` never acts in a migration run with ``options``
    (more options of ``migsgx migrate``), or ``""`` where it does."""

    point, _, action = spec.partition(":")
    late = "--late-handshake" in options
    if point in _ROLL_BACK_ONLY:
        return f"{point} is reached only where another fault rolled the migration back"
    if point == "tool.after-handshake" and late:
        return "--late-handshake: no handshake before the freeze"
    if point == "tool.after-handshake" and action in _GUARDIAN_ACTIONS:
        return f"{action} at {point}: the guardian starts after the freeze"
    if late and point in _NO_DATA_YET and action.endswith("-data"):
        return f"--late-handshake: no data connection is open at {point}"
    return ""


def draw(rng: random.Random, *, none_share: float = 0.15, options: Sequence[str] = ()) -> Fault:
    """One fault, from ``rng``: none (``none_share``), or one at a point of the tool
    or of the destination agent (about half each); one that never acts with
    ``options`` (:func:`unreachable`) is drawn again from the same ``rng``."""

    while True:
        roll = rng.random()
        if roll < none_share:
            return Fault()
        if roll < none_share + (1 - none_share) / 2:
            fault = Fault(tool=f"{rng.choice(TOOL_POINTS)}:{rng.choice(TOOL_ACTIONS)}")
        else:
            fault = Fault(agent=f"{rng.choice(AGENT_POINTS)}:{rng.choice(AGENT_ACTIONS)}")
        if not unreachable(fault.tool or fault.agent, options):
            return fault


def fired(points: Iterable[str], texts: Iterable[str], since: float = 0.0) -> dict[str, bool]:
    """Whether each of a fault's ``points`` (:attr:`Fault.points`) fired: its mark
    (``migsgx fault: POINT:...``, :func:`~.storm_timeline.marks`) at or after ``since``
    in one of ``texts`` (the tool's stderr, the agent's log, the guardian's)."""

    seen = {
        name.partition(":")[0]
        for text in texts
        for kind, name, t in marks(text)
        if kind == "fault" and t >= since
    }
    return {point: point in seen for point in points}
