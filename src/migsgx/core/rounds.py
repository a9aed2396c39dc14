"""Pre-copy rounds: the sans-I/O parts (``docs/spec/precopy.md``).

What both enclaves agree on, byte for byte (round labels, the final transfer's
sections, the keyed digest of the final memory).  When a driver stops the rounds
(:class:`~.stoprules.StopRules`) is :mod:`.stoprules`, re-exported here.  The
trusted half that streams and applies rounds is ``enclave/precopy.py``; the
driver that moves them is ``datapath/live.py``.
"""

from __future__ import annotations

import hmac
import struct
from collections.abc import Sequence
from typing import Final

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .stoprules import PAGE, SEGMENT, StopRules

__all__ = [
    "DIGEST_HEADER",
    "DIGEST_LABEL",
    "DIGEST_VERSION",
    "FINAL_SECTIONS",
    "GROUP",
    "MAX_ROUNDS",
    "PAGE",
    "REPAIR_LABEL",
    "SEGMENT",
    "SegmentTags",
    "StopRules",
    "digest_body_size",
    "digest_key",
    "full_digest_body",
    "groups_of",
    "parse_digest_body",
    "round_label",
    "segment_tag",
]

MAX_ROUNDS: Final = 64
PAGES_PER_SEGMENT: Final = SEGMENT // PAGE
GROUP: Final = 16
"""Segments per group: the digest section carries one tag per group (512 KiB of memory)."""
TAG: Final = 16
DIGEST_VERSION: Final = 3
DIGEST_LABEL: Final = "memory-digest"
REPAIR_LABEL: Final = "repair/memory"
FINAL_SECTIONS: Final = ("state", "memory", "persistent", DIGEST_LABEL)
DIGEST_INFO: Final = b"migsgx/v3 memory digest"
DIGEST_HEADER: Final = struct.Struct(">BxHIQ")
"""The ``memory-digest`` section's head: version, segments per group, segment size, used
length; the group tags follow."""
_GROUP_NONCE: Final = 1 << 95  # group tags' nonces, apart from the segments' (u96be(i))


def round_label(number: int) -> str:
    """The label of round ``number``'s only section; the destination expects them in order."""

    return f"round-{number}/memory"


def digest_key(stream_secret: bytes, migration_id: bytes) -> bytes:
    """The digest's key: from the session's stream secret, for this migration only."""

    return HKDF(algorithm=hashes.SHA256(), length=32, salt=migration_id, info=DIGEST_INFO).derive(
        stream_secret
    )


def segment_tag(aead: AESGCM, index: int, segment: memoryview | bytes) -> bytes:
    """``T_i``: the AES-GMAC tag of segment ``index`` (section 3)."""

    return aead.encrypt(index.to_bytes(12, "big"), b"", segment)


def segments_of(length: int) -> int:
    """How many segments cover ``length`` bytes of used memory (the last may be partial)."""

    return -(-length // SEGMENT)


def groups_of(length: int) -> int:
    """How many group tags the digest of ``length`` bytes of used memory carries."""

    return -(-segments_of(length) // GROUP)


def digest_body_size(length: int) -> int:
    """Bytes of the ``memory-digest`` section for ``length`` bytes of used memory."""

    return DIGEST_HEADER.size + TAG * groups_of(length)


def parse_digest_body(body: bytes) -> tuple[int, bytes]:
    """(used length, group tags) from a ``memory-digest`` section; ``ValueError`` if malformed."""

    if len(body) < DIGEST_HEADER.size:
        raise ValueError("short memory digest")
    version, group, segment, length = DIGEST_HEADER.unpack_from(body)
    if version != DIGEST_VERSION or group != GROUP or segment != SEGMENT or body[1] != 0:
        raise ValueError("memory digest of another version")
    if len(body) != digest_body_size(length):
        raise ValueError("memory digest of the wrong size")
    return length, body[DIGEST_HEADER.size :]


def full_digest_body(key: bytes, memory: memoryview | bytes) -> bytes:
    """The ``memory-digest`` section of ``memory`` computed from scratch (vectors, tests)."""

    tags = SegmentTags(key, max(len(memory), 1))
    return tags.body(memoryview(memory), len(memory))


class SegmentTags:
    """The digest tags of one memory's segments and groups as they are now, kept across rounds.

    A tag is *valid* while nothing may have changed its segment since it was
    computed; whoever changes memory (or learns that it changed) calls
    :meth:`forget_pages` or :meth:`forget_runs` first, and :meth:`refresh`
    recomputes only what is missing.  On the destination, memory changes only
    by the pages it applies.  On the source, the enclave's own write log says
    which segments were written since the previous scan; a tag computed after
    scan ``k`` stays valid only if scan ``k + 1`` and every later one leave its
    segment out (``docs/spec/precopy.md``, section 3.2).  A group's tag (over
    its segments' tags) is valid while all of its segments' are, so the
    section that travels, one tag per group, costs what was written, not the
    memory's size.  A last, partial segment or group is never kept: the used
    length may grow.  Sans-I/O: memory is a view handed in.
    """

    def __init__(self, key: bytes, size: int) -> None:
        if size <= 0:
            raise ValueError("a memory of at least one byte")
        self._aead = AESGCM(key)
        self.count = segments_of(size)
        self.group_count = groups_of(size)
        self._tags = bytearray(TAG * self.count)
        self._valid = np.zeros(self.count, dtype=np.bool_)
        self._groups = bytearray(TAG * self.group_count)
        self._group_valid = np.zeros(self.group_count, dtype=np.bool_)
        self.hashed_bytes = 0  # what refresh() read, for the figures

    def forget_pages(self, pages: Sequence[int] | npt.NDArray[np.int64]) -> int:
        """Segments holding any of ``pages`` are stale; returns how many segments that names."""

        if not len(pages):
            return 0
        index = np.unique(np.asarray(pages, dtype=np.int64) // PAGES_PER_SEGMENT)
        index = index[(index >= 0) & (index < self.count)]
        self._valid[index] = False
        self._group_valid[index // GROUP] = False
        return int(index.size)

    def forget_runs(self, runs: Sequence[tuple[int, int]]) -> None:
        """Segments touched by runs ``(first page, count)`` are stale."""

        for first, n in runs:
            if n > 0:
                low, high = first // PAGES_PER_SEGMENT, (first + n - 1) // PAGES_PER_SEGMENT
                self._valid[low : high + 1] = False
                self._group_valid[low // GROUP : high // GROUP + 1] = False

    def forget_all(self) -> None:
        self._valid[:] = False
        self._group_valid[:] = False

    def stale(self, length: int) -> int:
        """Segments below ``length`` without a valid tag."""

        return int(segments_of(length) - np.count_nonzero(self._valid[: segments_of(length)]))

    def refresh(self, memory: memoryview, length: int) -> int:
        """Tag every segment below ``length`` that lacks a valid tag; returns the bytes read."""

        n = segments_of(length)
        if n > self.count:
            raise ValueError("the used length exceeds the memory")
        read = 0
        aead, tags = self._aead, self._tags
        for i in np.flatnonzero(~self._valid[:n]).tolist():
            start = i * SEGMENT
            stop = min(length, start + SEGMENT)
            tags[TAG * i : TAG * (i + 1)] = aead.encrypt(
                i.to_bytes(12, "big"), b"", memory[start:stop]
            )
            read += stop - start
            if stop - start == SEGMENT:
                self._valid[i] = True
        self.hashed_bytes += read
        return read

    def group_tags(self, memory: memoryview, length: int) -> memoryview:
        """``G_0 .. G_{m-1}`` for ``length`` bytes: segments refreshed, then stale groups."""

        self.refresh(memory, length)
        n, m = segments_of(length), groups_of(length)
        aead, tags, groups = self._aead, memoryview(self._tags), self._groups
        for j in np.flatnonzero(~self._group_valid[:m]).tolist():
            first, stop = j * GROUP, min(n, (j + 1) * GROUP)
            groups[TAG * j : TAG * (j + 1)] = aead.encrypt(
                (_GROUP_NONCE | j).to_bytes(12, "big"), b"", tags[TAG * first : TAG * stop]
            )
            # Kept only if all of its segments are whole and kept (never the last, partial one).
            if stop - first == GROUP and bool(self._valid[first:stop].all()):
                self._group_valid[j] = True
        return memoryview(groups)[: TAG * m]

    def body(self, memory: memoryview, length: int) -> bytes:
        """The ``memory-digest`` section for ``length`` bytes: refreshed, then every group tag."""

        tags = self.group_tags(memory, length)
        return DIGEST_HEADER.pack(DIGEST_VERSION, GROUP, SEGMENT, length) + tags

    def differing(self, memory: memoryview, length: int, theirs: bytes) -> list[int]:
        """Segments of the groups whose tags differ from ``theirs`` (a peer's, same length).

        A group tag says that some segment of it differs, not which: all of
        its segments are named (a repair resends them, section 3.3).
        """

        ours = self.group_tags(memory, length)
        if len(ours) != len(theirs):
            raise ValueError("tags over another length")
        if hmac.compare_digest(ours, theirs):
            return []  # the common case, in one pass
        a = np.frombuffer(ours, dtype=np.uint8).reshape(-1, TAG)
        b = np.frombuffer(theirs, dtype=np.uint8).reshape(-1, TAG)
        n = segments_of(length)
        return [
            i
            for j in np.flatnonzero((a != b).any(axis=1)).tolist()
            for i in range(j * GROUP, min(n, (j + 1) * GROUP))
        ]
