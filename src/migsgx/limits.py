"""Chunk size, ring slots and image sizes: every limit in one place, with its reason.

A chunk size travels from the command line through the agent, the engine's
offer, the enclave's migrator and the stream header; each of them checks it
against the ranges below and nothing else, so a value valid at one step is valid
at every step.  No I/O here: the sans-I/O core imports this module too.
"""

from __future__ import annotations

from typing import Final

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_SLOTS",
    "MAX_CHUNK_SIZE",
    "MAX_IMAGE_BYTES",
    "MAX_MEMORY_HINT",
    "MAX_OFFER_SLOTS",
    "MAX_SLOTS",
    "MAX_SLOT_SIZE",
    "MIGRATE_CHUNK_SIZE",
    "MIN_CHUNK_SIZE",
    "STREAM_MAX_CHUNK_SIZE",
    "STREAM_MIN_CHUNK_SIZE",
    "check_chunk_size",
]

# --- the stream format (docs/spec/stream.md) -------------------------------------------
#: What a stream header may declare.  Small chunks are legal in the format (the
#: test vectors use them); a migration uses the narrower range below.
STREAM_MIN_CHUNK_SIZE: Final = 64
STREAM_MAX_CHUNK_SIZE: Final = 1 << 24

# --- a migration -----------------------------------------------------------------------
#: What an engine offers and accepts, and what the enclave's migrator takes: a
#: ring slot must also hold a stream header, and a peer may not make the other
#: side stage more than 16 MiB per chunk.
MIN_CHUNK_SIZE: Final = 4096
MAX_CHUNK_SIZE: Final = STREAM_MAX_CHUNK_SIZE
#: 128 KiB x 2 slots: 0.03-0.04 % of a 1 GiB enclave in extra memory over the four
#: processes of a migration, shared pages counted once (docs/benchmarks.md, "Memory").
DEFAULT_CHUNK_SIZE: Final = 128 << 10
DEFAULT_SLOTS: Final = 2
#: The enclave streams of a stop-and-copy ``migrate`` (a process or container moving
#: beside CRIU's dump on the same cores): 1 MiB x 2 slots, a ring of 2 MiB and a
#: private copy of 1 MiB per destination enclave, against a sealed page relay that
#: holds 4 MiB frames on each host anyway.  An eighth of the chunks: each costs a
#: wake-up of four processes, which a loaded machine makes slow; paired against
#: 128 KiB (docs/benchmarks.md, "Larger chunks on the process path").
MIGRATE_CHUNK_SIZE: Final = 1 << 20

#: The most ring slots a source may ask a destination to allocate (a peer's offer).
MAX_OFFER_SLOTS: Final = 64
#: The largest memory hint an offer may carry (its destination caps it further at
#: the enclave's declared memory, which it faults in ahead at most).
MAX_MEMORY_HINT: Final = 1 << 46

# --- the shared-memory ring ------------------------------------------------------------
MAX_SLOTS: Final = 256
MAX_SLOT_SIZE: Final = 64 << 20

# --- checkpoint and container images ----------------------------------------------------
#: The most image bytes one migration or container archive may carry.
MAX_IMAGE_BYTES: Final = 512 << 20


def check_chunk_size(chunk_size: int, *, fits: int | None = None) -> bool:
    """Whether a migration may use ``chunk_size`` (and it fits ``fits`` bytes, if given)."""

    upper = MAX_CHUNK_SIZE if fits is None else min(MAX_CHUNK_SIZE, fits)
    return isinstance(chunk_size, int) and MIN_CHUNK_SIZE <= chunk_size <= upper
