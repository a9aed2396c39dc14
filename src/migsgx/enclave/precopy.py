"""Pre-copy of enclave memory while the enclave runs (``docs/spec/precopy.md``).

The trusted half of a live migration.  After the handshake, the source enclave
streams its memory in **rounds** while ECALLs keep being served: round 0 every
used page, each later round the pages written since the previous one (the OS's
dirty tracker, :mod:`.dirty`, says which).  Each round is one transfer in the
session's stream channel (a manifest, then one sparse section labelled
``round-K/memory``), so rounds are numbered, authenticated and bound into the
digest that LOADED confirms: a replayed, dropped or reordered round fails at the
destination.  A page may travel several times; the latest copy wins, because
rounds are applied in order.

The **final** transfer happens with the enclave quiesced: the pages written
since the last round, the small state, the persistent state, and a keyed digest
of the whole used memory computed by the source after it quiesced.  The
destination recomputes the digest over what it holds and refuses to confirm
the load on any difference: a tracker that hid a write costs a refused
migration (the source runs on), never a destination that differs silently.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ..errors import LiveMigrationError, MemoryDigestError, ProtocolError, StreamError
from ..migration.ring import ShmRing
from ..migration.rounds import (
    DIGEST_BODY,
    DIGEST_LABEL,
    FINAL_SECTIONS,
    MAX_ROUNDS,
    SEGMENT,
    combine_tags,
    memory_digest,
    round_label,
    segment_tag,
)
from ..migration.stream import TAG_SIZE, Manifest, Section, StreamChannel
from .dirty import DirtyTracker, open_tracker
from .memory import PAGE_SIZE, EnclaveMemory

__all__ = ["DestinationRounds", "SourceRounds", "digest_body", "final_dump", "final_load"]

MAX_MANIFEST_BYTES: Final = 16 << 20
_PAGES_PER_SEGMENT: Final = SEGMENT // PAGE_SIZE
RING_TIMEOUT: Final = 120.0


def _sparse(label: str, pages: Sequence[int]) -> Section:
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
    ring: ShmRing | None = None
    number: int = 0
    finalizing: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)
    _scratch: bytearray | None = None

    @classmethod
    def arm(cls, memory: EnclaveMemory, streams: StreamChannel) -> SourceRounds:
        return cls(memory, streams, open_tracker(memory.address, memory.size))

    def round(self, chunk_size: int) -> dict[str, Any]:
        """Send the next round while ECALLs run; returns its figures."""

        if self.finalizing:
            raise ProtocolError("the final transfer has begun; no more rounds")
        if self.number >= MAX_ROUNDS:
            raise LiveMigrationError(f"at most {MAX_ROUNDS} pre-copy rounds")
        t0 = time.perf_counter()
        pages: Sequence[int] = (
            range(self.memory.pages) if self.number == 0 else self.tracker.collect()
        )
        t_scan = time.perf_counter()
        sent = self.send(round_label(self.number), pages, chunk_size, last=True)
        figures = {
            "round": self.number,
            "pages": len(pages),
            "bytes": sent,
            "scan_seconds": t_scan - t0,
            "seconds": time.perf_counter() - t0,
        }
        self.history.append(figures)
        self.number += 1
        return figures

    def final_pages(self) -> Sequence[int]:
        """With the enclave quiesced: the pages written since the last round."""

        self.finalizing = True
        if self.number == 0:
            return range(self.memory.pages)  # no round went: everything is final
        return self.tracker.collect()

    def send(self, label: str, pages: Sequence[int], chunk_size: int, *, last: bool) -> int:
        """One transfer of a single sparse section (a round)."""

        section = _sparse(label, pages)
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
            ring = self._ring()
            index, slot = ring.acquire(RING_TIMEOUT)
            end = i == count - 1
            size = sealer.seal_into(part, slot[: len(part) + TAG_SIZE], final=end)
            ring.publish(index, size, final=end and last)
            sent += size
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
                ring = self._ring()
                index, slot = ring.acquire(RING_TIMEOUT)
                end = i == count - 1
                size = sealer.seal_into(part, slot[: len(part) + TAG_SIZE], final=end)
                ring.publish(index, size, final=end and last)
                sent += size
        finally:
            scratch.release()
            mem.release()
        return sent

    def _ring(self) -> ShmRing:
        if self.ring is None:
            raise ProtocolError("no ring was attached")
        return self.ring

    def _put(self, data: bytes, *, final: bool) -> int:
        ring = self._ring()
        index, slot = ring.acquire(RING_TIMEOUT)
        slot[: len(data)] = data
        ring.publish(index, len(data), final=final)
        return len(data)

    def close(self) -> None:
        self.tracker.close()


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
    _tags: dict[int, bytes] = field(default_factory=dict)
    _extent: int = 0  # bytes from 0 to the end of the highest page received

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
                for first, n in runs:
                    last = first + n - 1
                    for seg in range(first // _PAGES_PER_SEGMENT, last // _PAGES_PER_SEGMENT + 1):
                        self._tags.pop(seg, None)
                    self._extent = max(self._extent, (last + 1) * PAGE_SIZE)
                i += 1
        finally:
            scratch.release()
            mem.release()

    def _retag(self, length: int | None = None) -> list[bytes]:
        """Tags of every segment below ``length`` (default: whole segments received), cached.

        A segment's tag is dropped whenever a page of it arrives, so a cached tag
        is always the tag of what the memory holds now.  Only whole segments are
        cached; a last partial one is computed each time.
        """

        if self.digest_key is None:
            return []
        aead = AESGCM(self.digest_key)
        end = self._extent if length is None else length
        count = end // SEGMENT if length is None else -(-end // SEGMENT)
        tags: list[bytes] = []
        mem = self.memory.view()
        try:
            for i in range(count):
                start, stop = i * SEGMENT, min(end, (i + 1) * SEGMENT)
                tag = self._tags.get(i) if stop - start == SEGMENT else None
                if tag is None:
                    tag = segment_tag(aead, i, mem[start:stop])
                    if stop - start == SEGMENT:
                        self._tags[i] = tag
                tags.append(tag)
        finally:
            mem.release()
        return tags

    def own_digest(self, key: bytes, length: int) -> tuple[tuple[int, bytes], float]:
        """Our digest of memory ``0 .. length - 1``, and the seconds it took."""

        if not 0 <= length <= self.memory.size or length % PAGE_SIZE:
            raise StreamError("the memory layout covers more than this enclave's memory")
        t0 = time.perf_counter()
        if self.digest_key != key:
            self.digest_key = key
            self._tags.clear()
        ours = combine_tags(length, self._retag(length))
        return (length, ours), time.perf_counter() - t0

    def compare_digest(self, ours: tuple[int, bytes], body: bytes) -> None:
        """The source's digest of its final memory against ours: any difference refuses."""

        if len(body) != DIGEST_BODY.size:
            raise StreamError("malformed memory digest")
        length, theirs = DIGEST_BODY.unpack(body)
        if length != ours[0] or not hmac.compare_digest(ours[1], theirs):
            raise MemoryDigestError(
                "the migrated memory differs from the source's final memory "
                "(a written page was not reported); the load is refused"
            )


def digest_body(key: bytes, memory: EnclaveMemory) -> tuple[bytes, float]:
    """The source's digest section (used length and digest) and the seconds it took."""

    t0 = time.perf_counter()
    view = memory.view(0, memory.used)
    try:
        # One thread: on two busy cores a second one measured slower here.
        body = DIGEST_BODY.pack(memory.used, memory_digest(key, view))
    finally:
        view.release()
    return body, time.perf_counter() - t0


# --- the final transfer ------------------------------------------------------------------
def final_dump(
    rounds: SourceRounds, key: bytes, state: bytes, persistent: bytes, chunk: int
) -> dict[str, Any]:
    """Quiesced source: last dirty pages, small state, persistent state, memory digest.

    The digest is computed over all used memory after the quiesce, whatever the
    tracker said; its cost is reported as ``verify_seconds``.
    """

    t0 = time.perf_counter()
    pages = rounds.final_pages()
    t_scan = time.perf_counter()
    memory = _sparse("memory", pages)
    sections = (
        Section.dense("state", len(state)),
        memory,
        Section.dense("persistent", len(persistent)),
        Section.dense(DIGEST_LABEL, DIGEST_BODY.size),
    )
    sent = rounds.send_dense("manifest", memoryview(Manifest(sections).encode()), chunk, last=False)
    sent += rounds.send_dense(sections[0], memoryview(state), chunk, last=False)
    sent += rounds.send_section(memory, chunk, last=False)
    sent += rounds.send_dense(sections[2], memoryview(persistent), chunk, last=False)
    # The digest last: while it is computed here, the destination applies the
    # pages and computes its own (spec section 3), on the other core.
    body, verify_seconds = digest_body(key, rounds.memory)
    sent += rounds.send_dense(sections[3], memoryview(body), chunk, last=True)
    rounds._ring().wait_drained(RING_TIMEOUT)
    return {
        "bytes": sent,
        "memory_bytes": memory.length,
        "final_pages": len(pages),
        "scan_seconds": t_scan - t0,
        "verify_seconds": verify_seconds,
        "rounds": list(rounds.history),
    }


def final_load(
    rounds: DestinationRounds,
    key: bytes,
    max_state: int,
    max_persistent: int,
    *,
    used_length: Callable[[bytes], int],
) -> tuple[bytes, bytes, dict[str, Any]]:
    """Destination: the final transfer applied and its memory digest checked.

    ``used_length`` reads, from the small state, the used memory the digest
    will cover: our digest is computed before the source's arrives (while the
    source computes it), and the length in the digest section must match.
    """

    before = rounds.slots.received
    manifest = rounds.open_manifest()
    labels = tuple(s.label for s in manifest.sections)
    if labels != FINAL_SECTIONS:
        raise StreamError("unexpected sections in the final transfer")
    state_s, memory_s, persistent_s, digest_s = manifest.sections
    if state_s.page_size or persistent_s.page_size or digest_s.page_size:
        raise StreamError("unexpected sections in the final transfer")
    if (
        state_s.length > max_state
        or persistent_s.length > max_persistent
        or digest_s.length != DIGEST_BODY.size
    ):
        raise StreamError("the migrated state does not fit this enclave")
    state = bytearray(state_s.length)
    rounds.open_dense(state_s, memoryview(state))
    rounds.open_pages(memory_s)
    persistent = bytearray(persistent_s.length)
    rounds.open_dense(persistent_s, memoryview(persistent))
    ours, verify_seconds = rounds.own_digest(key, used_length(bytes(state)))
    body = bytearray(digest_s.length)
    rounds.open_dense(digest_s, memoryview(body))
    rounds.slots.end()
    rounds.compare_digest(ours, bytes(body))
    figures = {
        "bytes": rounds.slots.received - before,
        "memory_bytes": memory_s.length,
        "rounds": rounds.number,
        "verify_seconds": verify_seconds,
    }
    return bytes(state), bytes(persistent), figures
