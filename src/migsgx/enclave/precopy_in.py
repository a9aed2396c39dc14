"""Pre-copy of enclave memory: the destination (``docs/spec/precopy.md``).

Rounds are applied in order, each page where its run says, so the latest copy
of a page wins; every slot is copied into private memory before it is opened
(one fetch).  Between rounds the destination keeps the digest tags of whole
segments it holds, so that the final check hashes only what the final
transfer touched; the source does the same from its own write log
(:mod:`.precopy`).  The check compares every segment's tag.
Nothing here runs enclave code: the state only becomes live on COMMIT.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

from ..core.manifest import Manifest, Section
from ..core.rounds import (
    DIGEST_HEADER,
    FINAL_SECTIONS,
    MAX_ROUNDS,
    PAGES_PER_SEGMENT,
    REPAIR_LABEL,
    SEGMENT,
    SegmentTags,
    digest_body_size,
    parse_digest_body,
    round_label,
)
from ..core.stream import TAG_SIZE
from ..core.stream_channel import StreamChannel
from ..datapath.ring import ShmRing
from ..errors import LiveMigrationError, MemoryDigestError, ProtocolError, StreamError
from .memory import PAGE_SIZE, EnclaveMemory

__all__ = ["DestinationRounds", "final_load", "repair_load"]

MAX_MANIFEST_BYTES: Final = 16 << 20
RING_TIMEOUT: Final = 120.0


# --- the destination ---------------------------------------------------------------------
class _Slots:
    """Slots from the ring, each copied into private memory before use (one fetch)."""

    def __init__(self, ring: ShmRing) -> None:
        self.ring = ring
        self._private = bytearray(ring.slot_size)
        self._view = memoryview(self._private)
        self.finals: list[bool] = []
        self.received = 0

    def take(self) -> memoryview:
        if self.finals and self.finals[-1]:
            raise StreamError("the transfer ended before its last chunk")
        index, view, final = self.ring.next(RING_TIMEOUT)
        n = len(view)
        self._view[:n] = view
        self.ring.release(index)
        self.finals.append(final)
        self.received += n
        return self._view[:n]

    def end(self) -> None:
        if not self.finals or not self.finals[-1] or any(self.finals[:-1]):
            raise StreamError("the transfer's end is not where the stream ends")
        self.finals.clear()


@dataclass
class DestinationRounds:
    """The destination enclave's side: rounds applied in order, then the final check."""

    memory: EnclaveMemory
    streams: StreamChannel
    ring: ShmRing | None = None
    number: int = 0
    pages_received: int = 0
    _slots: _Slots | None = None
    _scratch: bytearray | None = None
    _manifest_buf: bytearray | None = None
    digest_key: bytes | None = None
    # Digest tags of whole segments as they are now (section 3), kept up to date
    # between rounds so that the final check reads only what the final transfer changed.
    _tags: SegmentTags | None = None
    _extent: int = 0  # bytes from 0 to the end of the highest page received
    differing: list[int] = field(default_factory=list)  # segments of the last failed check
    repaired: bool = False
    # The source's digest section and the used length it covers, kept for a repair.
    source_digest: bytes = b""
    used_length: int = 0

    @property
    def slots(self) -> _Slots:
        if self.ring is None:
            raise ProtocolError("no ring was attached")
        if self._slots is None or self._slots.ring is not self.ring:
            self._slots = _Slots(self.ring)
        return self._slots

    def load_round(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        if self.number >= MAX_ROUNDS:
            raise LiveMigrationError(f"at most {MAX_ROUNDS} pre-copy rounds")
        before = self.slots.received
        manifest = self.open_manifest()
        if len(manifest.sections) != 1:
            raise StreamError("a pre-copy round carries one section")
        section = manifest.sections[0]
        if section.label != round_label(self.number):
            raise StreamError(f"round {self.number} expected, got {section.label!r}")
        self.open_pages(section)
        self.slots.end()
        self._retag()
        self.number += 1
        return {
            "round": self.number - 1,
            "pages": section.length // PAGE_SIZE,
            "bytes": self.slots.received - before,
            "seconds": time.perf_counter() - t0,
        }

    def open_manifest(self) -> Manifest:
        if self._manifest_buf is None:
            self._manifest_buf = bytearray(MAX_MANIFEST_BYTES)
        n = self.open_dense("manifest", memoryview(self._manifest_buf))
        return Manifest.decode(bytes(self._manifest_buf[:n]))

    def open_dense(self, expect: str | Section, sink: memoryview) -> int:
        opener = self.streams.opener(bytes(self.slots.take()), expect=expect)
        pos = 0
        while not opener.done:
            chunk = self.slots.take()
            room = sink[pos : pos + max(0, len(chunk) - TAG_SIZE)]
            if len(room) < len(chunk) - TAG_SIZE:
                raise StreamError("a stream is longer than its sink")
            pos += opener.open_into(chunk, room)
        return pos

    def open_pages(self, section: Section) -> None:
        """Write a sparse section's pages where they belong; later copies overwrite earlier."""

        if section.page_size != PAGE_SIZE:
            raise StreamError("enclave memory travels in 4 KiB pages")
        limit = self.memory.size // PAGE_SIZE
        if section.runs and section.runs[-1][0] + section.runs[-1][1] > limit:
            raise StreamError("a page lies outside this enclave's memory")
        opener = self.streams.opener(bytes(self.slots.take()), expect=section)
        chunk = opener.header.chunk_size
        if self._scratch is None or len(self._scratch) < chunk:
            self._scratch = bytearray(chunk)
        scratch = memoryview(self._scratch)
        mem = self.memory.view()
        try:
            i = 0
            while not opener.done:
                data = self.slots.take()
                runs = section.chunk_pages(i, chunk)
                if len(runs) == 1:
                    first, n = runs[0]
                    opener.open_into(data, mem[first * PAGE_SIZE : (first + n) * PAGE_SIZE])
                else:
                    size = opener.open_into(data, scratch)
                    pos = 0
                    for first, n in runs:
                        step = n * PAGE_SIZE
                        mem[first * PAGE_SIZE : first * PAGE_SIZE + step] = scratch[
                            pos : pos + step
                        ]
                        pos += step
                    assert pos == size
                self.pages_received += sum(n for _, n in runs)
                if self._tags is not None:
                    self._tags.forget_runs(runs)
                for first, n in runs[-1:]:
                    self._extent = max(self._extent, (first + n) * PAGE_SIZE)
                i += 1
        finally:
            scratch.release()
            mem.release()

    def tags(self, key: bytes) -> SegmentTags:
        """The tags of this memory under ``key``; kept while the key stays the same."""

        if self.digest_key != key or self._tags is None:
            self.digest_key = key
            self._tags = SegmentTags(key, self.memory.size)
        return self._tags

    def _retag(self) -> None:
        """Tags of every whole segment received so far, so the final check reads less."""

        if self.digest_key is None:
            return
        view = self.memory.view()
        try:
            self.tags(self.digest_key).group_tags(view, self._extent // SEGMENT * SEGMENT)
        finally:
            view.release()

    def own_digest(self, key: bytes, length: int) -> float:
        """Our tags of memory ``0 .. length - 1`` brought up to date; the seconds it took."""

        if not 0 <= length <= self.memory.size or length % PAGE_SIZE:
            raise StreamError("the memory layout covers more than this enclave's memory")
        t0 = time.perf_counter()
        view = self.memory.view()
        try:
            self.tags(key).group_tags(view, length)
        finally:
            view.release()
        return time.perf_counter() - t0

    def compare_digest(self, key: bytes, length: int, body: bytes) -> list[int]:
        """The segments where the source's final memory and ours differ (none: equal).

        ``body`` is the source's ``memory-digest`` section; a different used
        length refuses at once (``memory-digest``).
        """

        try:
            theirs_length, theirs = parse_digest_body(body)
        except ValueError as exc:
            raise StreamError(f"malformed memory digest: {exc}") from exc
        if theirs_length != length:
            raise MemoryDigestError(
                "the source's memory digest covers another length than its state declares"
            )
        view = self.memory.view()
        try:
            self.differing = self.tags(key).differing(view, length, theirs)
        finally:
            view.release()
        return self.differing


def final_load(
    rounds: DestinationRounds,
    key: bytes,
    max_state: int,
    max_persistent: int,
    *,
    used_length: Callable[[bytes], int],
    repair: bool = False,
) -> tuple[bytes, bytes, dict[str, Any]]:
    """Destination: the final transfer applied and its memory digest checked.

    ``used_length`` reads, from the small state, the used memory the digest
    will cover: our digest is computed before the source's arrives (while the
    source computes it), and the length in the digest section must match.
    With ``repair``, differing segments do not refuse yet: the figures name
    them under ``repair`` and :func:`repair_load` must follow.
    """

    before = rounds.slots.received
    t0 = time.monotonic()
    manifest = rounds.open_manifest()
    t_manifest = time.monotonic()
    labels = tuple(s.label for s in manifest.sections)
    if labels != FINAL_SECTIONS:
        raise StreamError("unexpected sections in the final transfer")
    state_s, memory_s, persistent_s, digest_s = manifest.sections
    if state_s.page_size or persistent_s.page_size or digest_s.page_size:
        raise StreamError("unexpected sections in the final transfer")
    if (
        state_s.length > max_state
        or persistent_s.length > max_persistent
        or not DIGEST_HEADER.size <= digest_s.length <= digest_body_size(rounds.memory.size)
    ):
        raise StreamError("the migrated state does not fit this enclave")
    state = bytearray(state_s.length)
    rounds.open_dense(state_s, memoryview(state))
    rounds.open_pages(memory_s)
    persistent = bytearray(persistent_s.length)
    rounds.open_dense(persistent_s, memoryview(persistent))
    t_applied = time.monotonic()
    length = used_length(bytes(state))
    verify_seconds = rounds.own_digest(key, length)
    t_own = time.monotonic()
    body = bytearray(digest_s.length)
    rounds.open_dense(digest_s, memoryview(body))
    rounds.slots.end()
    t_body = time.monotonic()
    rounds.source_digest, rounds.used_length = bytes(body), length
    differing = rounds.compare_digest(key, length, bytes(body))
    t_compared = time.monotonic()
    if differing and not repair:
        raise MemoryDigestError(
            "the migrated memory differs from the source's final memory "
            "(a written page was not reported); the load is refused"
        )
    figures: dict[str, Any] = {
        "bytes": rounds.slots.received - before,
        "memory_bytes": memory_s.length,
        "rounds": rounds.number,
        "verify_seconds": verify_seconds,
        "compare_seconds": t_compared - t_body,
        # CLOCK_MONOTONIC, as the source's steps: the first waits for the source.
        "timeline": {
            "wait_manifest": [t0, t_manifest],
            "apply": [t_manifest, t_applied],
            "own_digest": [t_applied, t_own],
            "wait_digest": [t_own, t_body],
            "compare": [t_body, t_compared],
        },
    }
    if differing:
        figures["repair"] = list(differing)
    return bytes(state), bytes(persistent), figures


def repair_load(rounds: DestinationRounds, key: bytes) -> dict[str, Any]:
    """Destination: the repair transfer applied, then every tag checked again (section 3.3).

    Once, after a final transfer whose check named segments.  The transfer may
    carry pages of those segments only; any segment that still differs
    refuses the load (``memory-digest``).
    """

    if not rounds.differing or rounds.repaired:
        raise ProtocolError("a repair follows a final check that found differences, once")
    rounds.repaired = True
    t0 = time.perf_counter()
    before = rounds.slots.received
    manifest = rounds.open_manifest()
    if len(manifest.sections) != 1 or manifest.sections[0].label != REPAIR_LABEL:
        raise StreamError("a repair transfer carries one section, repair/memory")
    section = manifest.sections[0]
    named = set(rounds.differing)
    for first, n in section.runs:
        low, high = first // PAGES_PER_SEGMENT, (first + n - 1) // PAGES_PER_SEGMENT
        if n <= 0 or not named.issuperset(range(low, high + 1)):
            raise StreamError("a repair carries a page of a segment that was not named")
    asked = len(rounds.differing)
    rounds.open_pages(section)
    rounds.slots.end()
    t_applied = time.perf_counter()
    if rounds.compare_digest(key, rounds.used_length, rounds.source_digest):
        raise MemoryDigestError(
            "the migrated memory still differs from the source's final memory after "
            "the repair; the load is refused"
        )
    return {
        "segments": asked,
        "pages": section.length // PAGE_SIZE,
        "bytes": rounds.slots.received - before,
        "verify_seconds": time.perf_counter() - t_applied,
        "seconds": time.perf_counter() - t0,
    }
