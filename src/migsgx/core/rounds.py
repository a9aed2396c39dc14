"""Pre-copy rounds: the sans-I/O parts (``docs/spec/precopy.md``).

What both enclaves agree on, byte for byte (round labels, the final transfer's
sections, the keyed digest of the final memory), and when a driver stops the
rounds (:class:`StopRules`, plain values, no I/O).  The trusted half that
streams and applies rounds is ``enclave/precopy.py``; the driver that moves
them is ``datapath/live.py``.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

__all__ = [
    "DIGEST_BODY",
    "DIGEST_LABEL",
    "FINAL_SECTIONS",
    "MAX_ROUNDS",
    "PAGE",
    "SEGMENT",
    "StopRules",
    "combine_tags",
    "digest_key",
    "memory_digest",
    "round_label",
    "segment_tag",
]

PAGE: Final = 4096
MAX_ROUNDS: Final = 64
SEGMENT: Final = 256 << 10
DIGEST_LABEL: Final = "memory-digest"
FINAL_SECTIONS: Final = ("state", "memory", "persistent", DIGEST_LABEL)
DIGEST_INFO: Final = b"migsgx/v1 memory digest"
DIGEST_BODY: Final = struct.Struct(">Q32s")
"""The ``memory-digest`` section: u64 length of the covered memory, then the digest."""


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


def combine_tags(length: int, tags: Sequence[bytes]) -> bytes:
    """The digest from the used length and the tags of its segments, in order."""

    if len(tags) != -(-length // SEGMENT):
        raise ValueError("one tag per segment of the used memory")
    h = hashes.Hash(hashes.SHA256())
    h.update(DIGEST_INFO + length.to_bytes(8, "big"))
    for tag in tags:
        h.update(tag)
    return h.finalize()


def memory_digest(key: bytes, memory: memoryview | bytes) -> bytes:
    """Keyed digest of ``memory``: an AES-GMAC tag per 256 KiB segment, hashed together.

    GMAC runs at several GiB/s (``cryptography`` releases the GIL while it
    runs).  Nonces are the segment numbers; the key is used for this one memory
    image on each side.
    """

    view = memoryview(memory)
    aead = AESGCM(key)
    tags = [
        segment_tag(aead, i, view[start : start + SEGMENT])
        for i, start in enumerate(range(0, len(view), SEGMENT))
    ]
    return combine_tags(len(view), tags)


@dataclass(frozen=True)
class StopRules:
    """When pre-copy stops and the freeze begins; the first rule that holds names the stop.

    * ``converged``: the last round's dirty set, at the bandwidth round 0
      measured, would take at most ``downtime_target`` seconds to send;
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

    def __post_init__(self) -> None:
        if not 1 <= self.max_rounds <= 64:
            raise ValueError("max_rounds is 1..64 (the enclaves' own limit)")
        if self.downtime_target < 0 or self.max_seconds <= 0 or self.max_bytes_factor <= 0:
            raise ValueError("stop rule limits must be positive")
        if self.stall_rounds < 1:
            raise ValueError("stall_rounds is at least 1")

    def decide(
        self, rounds: Sequence[Mapping[str, Any]], elapsed: float, memory: int
    ) -> str | None:
        """The name of the rule that stops pre-copy after ``rounds``, or None to go on."""

        if not rounds:
            return None
        if len(rounds) >= 2:
            if self.estimate(rounds) <= self.downtime_target:
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

    @staticmethod
    def bandwidth(rounds: Sequence[Mapping[str, Any]]) -> float:
        """Bytes per second of the largest round so far (round 0, as a rule)."""

        big = max(rounds, key=lambda r: r["bytes"])
        return float(big["bytes"]) / max(float(big["seconds"]), 1e-6)

    @classmethod
    def estimate(cls, rounds: Sequence[Mapping[str, Any]]) -> float:
        """Seconds the final transfer of memory would take if it carried the last dirty set."""

        return float(rounds[-1]["pages"]) * PAGE / max(cls.bandwidth(rounds), 1.0)
