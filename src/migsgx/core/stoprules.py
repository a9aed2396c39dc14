"""When a live migration's pre-copy rounds stop (``docs/spec/precopy.md``).

Plain values, no I/O and nothing heavier than the standard library: the tool
reads its options at start (``agent/source_options.py``) and must not load the
rounds' arrays (numpy, :mod:`.rounds`) to do so.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

__all__ = ["PAGE", "SEGMENT", "StopRules"]

PAGE: Final = 4096
#: Bytes of memory one segment tag covers (:mod:`.rounds`).
SEGMENT: Final = 32 << 10


@dataclass(frozen=True)
class StopRules:
    """When pre-copy stops and the freeze begins; the first rule that holds names the stop.

    * ``converged``: the last round's dirty set, at the bandwidth round 0
      measured, would take at most ``downtime_target`` seconds to send and
      to check (:meth:`estimate`), and the rounds have *settled*: the last
      one took at least ``settle`` times as long as the one before
      (:meth:`settled`).  The final transfer carries what is written during
      the last round, so its size follows that round's length; rounds
      shrink towards a floor (the scan, the round trips) that does not grow
      with the enclave, and stopping there keeps the freeze nearly the same
      at every size (``settle=0`` stops at the first round under the target);
    * ``no-convergence``: the dirty set has not shrunk below its smallest size
      so far for ``stall_rounds`` rounds (the writer outruns the link);
    * ``max-rounds``, ``max-seconds``, ``max-bytes`` (a multiple of the
      memory size): hard limits.
    """

    downtime_target: float = 0.05
    max_rounds: int = 30
    max_seconds: float = 120.0
    max_bytes_factor: float = 2.0
    stall_rounds: int = 3
    settle: float = 0.6

    def __post_init__(self) -> None:
        if not 1 <= self.max_rounds <= 64:
            raise ValueError("max_rounds is 1..64 (the enclaves' own limit)")
        if self.downtime_target < 0 or self.max_seconds <= 0 or self.max_bytes_factor <= 0:
            raise ValueError("stop rule limits must be positive")
        if self.stall_rounds < 1:
            raise ValueError("stall_rounds is at least 1")
        if not 0 <= self.settle <= 1:
            raise ValueError("settle is 0..1")

    def decide(
        self, rounds: Sequence[Mapping[str, Any]], elapsed: float, memory: int
    ) -> str | None:
        """The name of the rule that stops pre-copy after ``rounds``, or None to go on."""

        if not rounds:
            return None
        if len(rounds) >= 2:
            if self.estimate(rounds) <= self.downtime_target and self.settled(rounds):
                return "converged"
            sizes = [r["pages"] for r in rounds[1:]]
            best = sizes.index(min(sizes))
            if len(sizes) - 1 - best >= self.stall_rounds:
                return "no-convergence"
        if len(rounds) >= self.max_rounds:
            return "max-rounds"
        if elapsed >= self.max_seconds:
            return "max-seconds"
        if sum(r["bytes"] for r in rounds) >= self.max_bytes_factor * max(memory, PAGE):
            return "max-bytes"
        return None

    def settled(self, rounds: Sequence[Mapping[str, Any]]) -> bool:
        """Whether another round would hardly be shorter than the last (or nothing was written)."""

        last, before = rounds[-1], rounds[-2]
        if not last["pages"]:
            return True
        return float(last["seconds"]) >= self.settle * float(before["seconds"])

    @staticmethod
    def bandwidth(rounds: Sequence[Mapping[str, Any]]) -> float:
        """Bytes per second of the largest round so far (round 0, as a rule)."""

        big = max(rounds, key=lambda r: r["bytes"])
        return float(big["bytes"]) / max(float(big["seconds"]), 1e-6)

    @staticmethod
    def tag_rate(rounds: Sequence[Mapping[str, Any]]) -> float | None:
        """Bytes per second the source tagged segments at during the rounds, if it said."""

        read = sum(float(r.get("tagged_bytes") or 0) for r in rounds)
        seconds = sum(float(r.get("tag_seconds") or 0) for r in rounds)
        return read / seconds if read > 0 and seconds > 0 else None

    @classmethod
    def estimate(cls, rounds: Sequence[Mapping[str, Any]]) -> float:
        """Seconds the final transfer would take if it carried the last dirty set.

        The pages at the bandwidth measured, plus the source's part of the
        digest check: at most one segment per page (section 3.2), at the rate
        the rounds tagged at (no part where the rounds did not say).
        """

        pages = float(rounds[-1]["pages"])
        send = pages * PAGE / max(cls.bandwidth(rounds), 1.0)
        rate = cls.tag_rate(rounds)
        if rate is None:
            return send
        memory = max(float(rounds[0]["bytes"]), float(SEGMENT))
        return send + min(pages * SEGMENT, memory) / rate
