"""Pre-copy of enclave memory while the enclave runs: the source (``docs/spec/precopy.md``).

The trusted half of a live migration.  After the handshake, the source enclave
streams its memory in **rounds** while ECALLs keep being served: round 0 every
used page, each later round the pages written since the previous one (the OS's
dirty tracker, :mod:`.dirty`, says which).  Each round is one transfer in the
session's stream channel (a manifest, then one sparse section labelled
``round-K/memory``), so rounds are numbered, authenticated and bound into the
digest that LOADED confirms: a replayed, dropped or reordered round fails at the
destination (:mod:`.precopy_in`).  A page may travel several times; the latest
copy wins, because rounds are applied in order.

The **final** transfer happens with the enclave quiesced: the pages written
since the last round, the small state, the persistent state, and the keyed
digest tags of every segment of the used memory as it is after the quiesce.
The source keeps the tags between rounds (:class:`~..core.rounds.SegmentTags`)
and recomputes after the quiesce only the segments its write log names; the
log is the enclave's own, not the OS's page report, which decides only what
travels.  The destination compares the tags with its own; the segments that
differ come once more (:func:`repair_dump`), and a difference left refuses the
load: a tracker that hid a write costs a few more pages in the downtime, or a
refused migration (the source runs on), never a destination that differs
silently.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from ..core.manifest import Manifest, Section
from ..core.rounds import (
    DIGEST_LABEL,
    MAX_ROUNDS,
    PAGES_PER_SEGMENT,
    REPAIR_LABEL,
    SegmentTags,
    digest_body_size,
    round_label,
    segments_of,
)
from ..core.stream import TAG_SIZE, StreamSealer
from ..core.stream_channel import StreamChannel
from ..datapath.ring import ShmRing
from ..errors import LiveMigrationError, ProtocolError
from .dirty import DirtyTracker, open_tracker
from .memory import PAGE_SIZE, EnclaveMemory

__all__ = ["SourceRounds", "digest_body", "final_dump", "repair_dump", "sparse_section"]

RING_TIMEOUT: Final = 120.0


def sparse_section(label: str, pages: Sequence[int]) -> Section:
    return Section.sparse(label, pages, PAGE_SIZE)


# --- the source --------------------------------------------------------------------------
@dataclass
class SourceRounds:
    """The source enclave's rounds: which pages went, and the tracker that says what changed.

    The tracker is armed when this object is made (``__mig_track``), before
    round 0 reads anything: whatever is written while round 0 reads is reported
    by the next scan, so a page may travel twice but is never missed (by an
    honest tracker).
    """

    memory: EnclaveMemory
    streams: StreamChannel
    tracker: DirtyTracker
    tags: SegmentTags
    ring: ShmRing | None = None
    number: int = 0
    finalizing: bool = False
    repaired: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)
    _scratch: bytearray | None = None

    @classmethod
    def arm(cls, memory: EnclaveMemory, streams: StreamChannel, key: bytes) -> SourceRounds:
        """Tracking armed now; ``key`` is the memory digest's (``digest_key``)."""

        tracker = open_tracker(memory.address, memory.size)
        return cls(memory, streams, tracker, SegmentTags(key, memory.size))

    def _scan(self) -> list[int]:
        """The pages to send; the segments the write log names lose their tags first.

        Only the used memory is walked: nothing beyond it migrates, and a page
        there keeps its written bit until the used memory grows over it and a
        scan reports it (``docs/spec/precopy.md``, section 3.2).
        """

        reported, written = self.tracker.collect_with_log(self.memory.used)
        self.tags.forget_pages(written)
        return reported

    def round(self, chunk_size: int) -> dict[str, Any]:
        """Send the next round while ECALLs run; returns its figures."""

        if self.finalizing:
            raise ProtocolError("the final transfer has begun; no more rounds")
        if self.number >= MAX_ROUNDS:
            raise LiveMigrationError(f"at most {MAX_ROUNDS} pre-copy rounds")
        t0 = time.perf_counter()
        pages: Sequence[int] = range(self.memory.pages) if self.number == 0 else self._scan()
        t_scan = time.perf_counter()
        sent = self.send(round_label(self.number), pages, chunk_size, last=True)
        t_sent = time.perf_counter()
        # Tags of what memory holds now, valid until the next scan names their
        # segments; the groups' too, so that the final check computes few of either.
        view = self.memory.view()
        before = self.tags.hashed_bytes
        try:
            self.tags.group_tags(view, self.memory.used)
        finally:
            view.release()
        tagged = self.tags.hashed_bytes - before
        t_end = time.perf_counter()
        figures = {
            "round": self.number,
            "pages": len(pages),
            "bytes": sent,
            "scan_seconds": t_scan - t0,
            "tag_seconds": t_end - t_sent,
            "tagged_bytes": tagged,
            "seconds": t_end - t0,
        }
        self.history.append(figures)
        self.number += 1
        return figures

    def final_pages(self) -> Sequence[int]:
        """With the enclave quiesced: the pages written since the last round."""

        self.finalizing = True
        if self.number == 0:
            return range(self.memory.pages)  # no round went: everything is final
        return self._scan()

    def send(self, label: str, pages: Sequence[int], chunk_size: int, *, last: bool) -> int:
        """One transfer of a single sparse section (a round)."""

        section = sparse_section(label, pages)
        manifest = Manifest((section,)).encode()
        sent = self.send_dense("manifest", memoryview(manifest), chunk_size, last=False)
        return sent + self.send_section(section, chunk_size, last=last)

    def send_dense(self, expect: str | Section, data: memoryview, chunk: int, *, last: bool) -> int:
        sealer = self.streams.sealer(expect, chunk)
        sent = self._put(sealer.header_bytes, final=False)
        total = len(data)
        count = max(1, -(-total // chunk))
        for i in range(count):
            part = data[i * chunk : min(total, (i + 1) * chunk)]
            sent += self._seal_put(sealer, part, end=i == count - 1, last=last)
        return sent

    def send_section(self, section: Section, chunk: int, *, last: bool) -> int:
        """A sparse section's pages, gathered chunk by chunk from enclave memory."""

        sealer = self.streams.sealer(section, chunk)
        sent = self._put(sealer.header_bytes, final=False)
        if self._scratch is None or len(self._scratch) < chunk:
            self._scratch = bytearray(chunk)
        scratch = memoryview(self._scratch)
        mem = self.memory.view()
        try:
            count = section.chunk_count(chunk)
            for i in range(count):
                runs = section.chunk_pages(i, chunk)
                if len(runs) == 1:
                    first, n = runs[0]
                    part = mem[first * PAGE_SIZE : (first + n) * PAGE_SIZE]
                else:
                    pos = 0
                    for first, n in runs:
                        size = n * PAGE_SIZE
                        scratch[pos : pos + size] = mem[
                            first * PAGE_SIZE : first * PAGE_SIZE + size
                        ]
                        pos += size
                    part = scratch[:pos]
                sent += self._seal_put(sealer, part, end=i == count - 1, last=last)
        finally:
            scratch.release()
            mem.release()
        return sent

    def _ring(self) -> ShmRing:
        if self.ring is None:
            raise ProtocolError("no ring was attached")
        return self.ring

    def _seal_put(self, sealer: StreamSealer, part: memoryview, *, end: bool, last: bool) -> int:
        """One chunk sealed straight into a ring slot (``end``: its stream's last chunk,
        ``last``: the transfer's last stream); the bytes the slot holds."""

        ring = self._ring()
        index, slot = ring.acquire(RING_TIMEOUT)
        size = sealer.seal_into(part, slot[: len(part) + TAG_SIZE], final=end)
        ring.publish(index, size, final=end and last)
        return size

    def _put(self, data: bytes, *, final: bool) -> int:
        ring = self._ring()
        index, slot = ring.acquire(RING_TIMEOUT)
        slot[: len(data)] = data
        ring.publish(index, len(data), final=final)
        return len(data)

    def close(self) -> None:
        self.tracker.close()


def digest_body(rounds: SourceRounds) -> tuple[bytes, float, int]:
    """The source's digest section, the seconds it took and the bytes it read (quiesced).

    Only segments without a valid tag are read: those the write log named since
    their tags were computed, and all of them if no round went.
    """

    t0 = time.perf_counter()
    before = rounds.tags.hashed_bytes
    view = rounds.memory.view()
    try:
        body = rounds.tags.body(view, rounds.memory.used)
    finally:
        view.release()
    return body, time.perf_counter() - t0, rounds.tags.hashed_bytes - before


def final_dump(rounds: SourceRounds, state: bytes, persistent: bytes, chunk: int) -> dict[str, Any]:
    """Quiesced source: last dirty pages, small state, persistent state, memory digest.

    The digest covers all used memory as it is after the quiesce: tags kept
    from the rounds where the enclave's write log shows no write since, the
    rest recomputed now.  Its cost is reported as ``verify_seconds``.
    """

    t0 = time.monotonic()
    pages = rounds.final_pages()
    t_scan = time.monotonic()
    memory = sparse_section("memory", pages)
    sections = (
        Section.dense("state", len(state)),
        memory,
        Section.dense("persistent", len(persistent)),
        Section.dense(DIGEST_LABEL, digest_body_size(rounds.memory.used)),
    )
    sent = rounds.send_dense("manifest", memoryview(Manifest(sections).encode()), chunk, last=False)
    sent += rounds.send_dense(sections[0], memoryview(state), chunk, last=False)
    sent += rounds.send_section(memory, chunk, last=False)
    sent += rounds.send_dense(sections[2], memoryview(persistent), chunk, last=False)
    t_sent = time.monotonic()
    # The digest last: while it is computed here, the destination applies the
    # pages and computes its own (spec section 3), on the other core.
    body, verify_seconds, verify_bytes = digest_body(rounds)
    t_digest = time.monotonic()
    sent += rounds.send_dense(sections[3], memoryview(body), chunk, last=True)
    rounds._ring().wait_drained(RING_TIMEOUT)
    t_end = time.monotonic()
    return {
        "bytes": sent,
        "memory_bytes": memory.length,
        "final_pages": len(pages),
        "digest_bytes": len(body),
        "scan_seconds": t_scan - t0,
        "verify_seconds": verify_seconds,
        "verify_bytes": verify_bytes,
        "rounds": list(rounds.history),
        # CLOCK_MONOTONIC, one clock for every process of the host: the driver
        # lays these beside its own steps of the freeze.
        "timeline": {
            "final_scan": [t0, t_scan],
            "final_send": [t_scan, t_sent],
            "source_digest": [t_sent, t_digest],
            "digest_send": [t_digest, t_end],
        },
    }


def repair_dump(rounds: SourceRounds, segments: list[int], chunk: int) -> dict[str, Any]:
    """Quiesced source, after the final transfer: the named segments' pages again, once.

    The destination names the segments whose tags differ (``precopy.md``,
    section 3.3).  The list comes through the untrusted side, so it only
    decides what travels: the pages are this quiesced memory's, sealed in the
    same stream, and the destination checks every tag again.
    """

    if not rounds.finalizing or rounds.repaired:
        raise ProtocolError("a repair follows the final transfer, once")
    count = segments_of(rounds.memory.used)
    if not all(type(s) is int for s in segments):
        raise ProtocolError("a repair names segments by number")
    if not segments or segments != sorted(set(segments)) or segments[0] < 0:
        raise ProtocolError("a repair names segments, ascending, each once")
    if segments[-1] >= count:
        raise ProtocolError("a repair names a segment beyond the used memory")
    rounds.repaired = True
    t0 = time.perf_counter()
    used = rounds.memory.pages
    pages = [
        p
        for s in segments
        for p in range(s * PAGES_PER_SEGMENT, min((s + 1) * PAGES_PER_SEGMENT, used))
    ]
    sent = rounds.send(REPAIR_LABEL, pages, chunk, last=True)
    rounds._ring().wait_drained(RING_TIMEOUT)
    return {
        "segments": len(segments),
        "pages": len(pages),
        "bytes": sent,
        "seconds": time.perf_counter() - t0,
    }
