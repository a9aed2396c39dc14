"""The source's pre-copy rounds, sent while the enclave keeps serving ECALLs.

The dirty tracker, each round, and the repair of the segments the destination
named after the final transfer (``docs/spec/precopy.md``); the rounds
themselves are :mod:`.precopy`'s.
"""

from __future__ import annotations

from typing import Any

from ..core.commit import CommitState
from ..core.handshake import Role
from ..core.stream import TAG_SIZE
from ..errors import ProtocolError
from . import precopy
from .migrator_source import _SourceSide
from .migrator_state import MIN_CHUNK


class _Rounds(_SourceSide):
    """A live migration's source: rounds before the final dump."""

    def precopy_round(self, chunk_size: int) -> dict[str, Any]:
        """Source: the next pre-copy round, while the enclave keeps serving ECALLs."""

        _streams, ring = self._ready(Role.SOURCE)
        if self.rounds_out is None:
            raise ProtocolError("pre-copy rounds need the dirty tracker (__mig_track)")
        if not MIN_CHUNK <= chunk_size <= ring.slot_size - TAG_SIZE or chunk_size % 4096:
            raise ProtocolError("chunk size must be whole pages and fit a ring slot")
        self.rounds_out.ring = ring  # each round comes with a ring of its own
        return self.rounds_out.round(chunk_size)

    def precopy_repair(self, segments: list[int], chunk_size: int) -> dict[str, Any]:
        """Source, quiesced, final transfer sent: the segments the destination named, once."""

        _streams, ring = self._ready(Role.SOURCE)
        if self.rounds_out is None or not self.dumped:
            raise ProtocolError("a repair follows a live migration's final transfer")
        if self.source_commit is not None and self.source_commit.state is not (
            CommitState.AWAIT_LOADED
        ):
            raise ProtocolError("the destination confirmed the load already: no repair")
        if not isinstance(segments, list):
            raise ProtocolError("a repair names a list of segments")
        if not MIN_CHUNK <= chunk_size <= ring.slot_size - TAG_SIZE or chunk_size % 4096:
            raise ProtocolError("chunk size must be whole pages and fit a ring slot")
        self.rounds_out.ring = ring
        return precopy.repair_dump(self.rounds_out, segments, chunk_size)

    def precopy_track(self) -> dict[str, Any]:
        """Source: arm the OS's dirty tracking before round 0, or say at once that it cannot."""

        if self.role is not Role.SOURCE or self.keys is None or self.dumped:
            raise ProtocolError("pre-copy needs a migration whose dump has not begun")
        if self.rounds_out is None:
            self.rounds_out = precopy.SourceRounds.arm(
                self.instance.memory, self.keys.streams, self._digest_key()
            )
        return {"pages": self.instance.memory.pages}

    def precopy_active(self) -> bool:
        """True while rounds run and the final dump has not begun (a driver may go away)."""

        return (
            self.role is Role.SOURCE
            and not self.dumped
            and not self.dumping
            and not (self.rounds_out is not None and self.rounds_out.finalizing)
        )
