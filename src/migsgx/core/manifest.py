"""What a transfer carries: the manifest and its sections (``docs/spec/stream.md``).

A transfer is a sealed manifest followed by one stream per section it lists; the
manifest alone tells the receiver where every chunk's plaintext goes.  This is
the format only; :mod:`.stream` seals and opens the bytes.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Final

import cbor2

from ..errors import StreamError
from ..wire import Schema

__all__ = [
    "MANIFEST_LABEL",
    "MAX_LABEL",
    "MAX_MANIFEST",
    "MAX_SECTIONS",
    "Manifest",
    "Section",
    "label_bytes",
]

MAX_LABEL: Final = 64
MANIFEST_LABEL: Final = "manifest"
MAX_MANIFEST: Final = 1 << 24
MAX_SECTIONS: Final = 4096


def label_bytes(label: str) -> bytes:
    """A label as the header and manifest carry it; the one rule for both."""

    raw = label.encode("ascii", "replace") if isinstance(label, str) else b""
    if not 1 <= len(raw) <= MAX_LABEL or any(not 0x21 <= b <= 0x7E for b in raw):
        raise ValueError("a label is 1..64 printable ASCII characters without spaces")
    return raw


MANIFEST_SCHEMA: Final = Schema("migsgx.manifest", {"manifest": {"v": int, "sections": list}})
SECTION_SCHEMA: Final = Schema(
    "migsgx.manifest.section",
    {
        "dense": {"label": str, "length": int},
        "sparse": {"label": str, "page_size": int, "runs": list},
    },
)


@dataclass(frozen=True)
class Section:
    """One region of enclave state: dense bytes, or a sparse set of pages (runs)."""

    label: str
    length: int
    page_size: int = 0
    runs: tuple[tuple[int, int], ...] = ()
    _rank: tuple[int, ...] = field(default=(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if label_bytes(self.label) == MANIFEST_LABEL.encode():
            raise ValueError("'manifest' is reserved")
        if not 0 <= self.length < 1 << 64:
            raise ValueError("section length out of range")
        if self.page_size == 0:
            if self.runs:
                raise ValueError("a dense section has no page runs")
            return
        if self.page_size & (self.page_size - 1) or not 64 <= self.page_size <= 65536:
            raise ValueError("page size must be a power of two in 64..65536")
        ranks, total, end = [], 0, 0
        for first, count in self.runs:
            if count < 1 or first < end or first + count > 1 << 64:
                raise ValueError("page runs must be increasing, disjoint and non-empty")
            ranks.append(total)
            total += count
            end = first + count
        if total * self.page_size != self.length:
            raise ValueError("sparse section length is not pages x page size")
        object.__setattr__(self, "_rank", tuple(ranks))

    @classmethod
    def dense(cls, label: str, length: int) -> Section:
        return cls(label, length)

    @classmethod
    def sparse(cls, label: str, pages: Iterable[int], page_size: int = 4096) -> Section:
        if isinstance(pages, range) and pages.step == 1:
            # All pages of a region (a pre-copy round 0): one run, without a
            # loop over a million pages that would hold the interpreter lock.
            one = ((pages.start, len(pages)),) if len(pages) else ()
            return cls(label, len(pages) * page_size, page_size, one)
        import numpy as np  # here: the tool and the agent read manifests without it

        try:
            # Vectorised: a pre-copy round may name a hundred thousand scattered
            # pages, and a loop over them holds the interpreter lock (0.3 s).
            ordered = np.sort(np.fromiter(pages, dtype=np.int64))
        except OverflowError:
            raise ValueError("a page number is out of range") from None
        if ordered.size:
            ordered = ordered[np.concatenate(([True], np.diff(ordered) != 0))]
        unique = ordered
        if not unique.size:
            return cls(label, 0, page_size, ())
        breaks = np.flatnonzero(np.diff(unique) != 1) + 1
        firsts = unique[np.concatenate(([0], breaks))]
        counts = np.diff(np.concatenate(([0], breaks, [unique.size])))
        runs = tuple(zip(firsts.tolist(), counts.tolist(), strict=True))
        return cls(label, int(unique.size) * page_size, page_size, runs)

    def chunk_count(self, chunk_size: int) -> int:
        return max(1, -(-self.length // chunk_size))

    def chunk_extent(self, index: int, chunk_size: int) -> tuple[int, int]:
        """Offset and length of chunk ``index``'s plaintext within the section."""

        if not 0 <= index < self.chunk_count(chunk_size):
            raise ValueError("chunk index out of range")
        offset = index * chunk_size
        return offset, min(chunk_size, self.length - offset)

    def chunk_pages(self, index: int, chunk_size: int) -> list[tuple[int, int]]:
        """Sparse sections: the runs ``(first_page, count)`` chunk ``index`` carries, in order."""

        if not self.page_size or chunk_size % self.page_size:
            raise ValueError("not a sparse section, or chunk size not a multiple of page size")
        offset, size = self.chunk_extent(index, chunk_size)
        lo, hi = offset // self.page_size, (offset + size) // self.page_size
        out: list[tuple[int, int]] = []
        k = max(0, bisect_right(self._rank, lo) - 1)
        while lo < hi:
            first, count = self.runs[k]
            skip = lo - self._rank[k]
            take = min(count - skip, hi - lo)
            out.append((first + skip, take))
            lo += take
            k += 1
        return out

    def to_cbor(self) -> dict[str, Any]:
        if not self.page_size:
            return {"t": "dense", "label": self.label, "length": self.length}
        runs = [[first, count] for first, count in self.runs]
        return {"t": "sparse", "label": self.label, "page_size": self.page_size, "runs": runs}


@dataclass(frozen=True)
class Manifest:
    """The first stream of a transfer: which sections follow, in order."""

    sections: tuple[Section, ...]

    def __post_init__(self) -> None:
        labels = [s.label for s in self.sections]
        if len(set(labels)) != len(labels) or len(labels) > MAX_SECTIONS:
            raise ValueError("section labels must be distinct, at most 4096 sections")

    def encode(self) -> bytes:
        return bytes(
            cbor2.dumps({"t": "manifest", "v": 1, "sections": [s.to_cbor() for s in self.sections]})
        )

    @classmethod
    def decode(cls, data: bytes) -> Manifest:
        if len(data) > MAX_MANIFEST:
            raise StreamError("manifest too large")
        try:
            msg = MANIFEST_SCHEMA.validate(cbor2.loads(data))
            if msg["v"] != 1:
                raise ValueError(f"unsupported manifest version {msg['v']}")
            sections = []
            for raw in msg["sections"]:
                sec = SECTION_SCHEMA.validate(raw)
                if sec["t"] == "dense":
                    sections.append(Section(sec["label"], sec["length"]))
                    continue
                runs = tuple(_run(r) for r in sec["runs"])
                total = sum(c for _, c in runs) * sec["page_size"]
                sections.append(Section(sec["label"], total, sec["page_size"], runs))
            return cls(tuple(sections))
        except StreamError:
            raise
        except Exception as exc:  # malformed CBOR, schema or value errors
            raise StreamError(f"invalid manifest: {exc}") from exc


def _run(raw: Any) -> tuple[int, int]:
    if (
        not isinstance(raw, list)
        or len(raw) != 2
        or not all(type(v) is int and 0 <= v < 1 << 64 for v in raw)
    ):
        raise ValueError("a page run is [first_page, page_count]")
    return raw[0], raw[1]
