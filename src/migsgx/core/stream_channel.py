"""All streams of one migration session, in order: the session's side of the chunk stream.

:mod:`.stream` defines one stream (its header, sealing and opening, its summary)
and knows nothing of a session.  A session sends several streams under one
secret, and the receiver must refuse one that belongs to another migration,
names other enclaves, comes out of turn or carries another section's label:
that bookkeeping is this module's, kept apart so the stream format stays a
self-contained primitive that checkpoints and vectors use alone.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable

from ..errors import StreamError
from .manifest import Section
from .policy import EnclaveIdentity
from .stream import StreamHeader, StreamOpener, StreamSealer, StreamSummary, streams_digest

__all__ = ["StreamChannel"]


class StreamChannel:
    """All streams of one session, source to destination, numbered from 0.

    The source's channel makes sealers, the destination's makes openers; each
    checks that streams run one after the other and records their summaries.
    """

    def __init__(
        self,
        secret: bytes,
        *,
        migration_id: bytes,
        source: EnclaveIdentity,
        destination: EnclaveIdentity,
        sending: bool,
        rng: Callable[[int], bytes] = secrets.token_bytes,
    ) -> None:
        self._secret = bytes(secret)
        self._mid = bytes(migration_id)
        self._source = source
        self._destination = destination
        self._sending = sending
        self._rng = rng
        self._summaries: list[StreamSummary] = []
        self._current: StreamSealer | StreamOpener | None = None

    @property
    def summaries(self) -> tuple[StreamSummary, ...]:
        return tuple(self._summaries)

    @property
    def busy(self) -> bool:
        """True while a stream has been started and has not seen its final chunk."""

        return self._current is not None and not self._current.done

    def digest(self) -> bytes:
        return streams_digest(self._summaries)

    def _next(self) -> int:
        return len(self._summaries)

    def sealer(self, expect: str | Section, chunk_size: int) -> StreamSealer:
        """Start the next stream, for a label or for a manifest section."""

        if not self._sending:
            raise ValueError("the destination's channel only opens streams")
        if self.busy:
            raise ValueError("the previous stream has not ended")
        label, length = _expectation(expect, chunk_size, ValueError)
        header = StreamHeader(
            self._mid,
            self._source,
            self._destination,
            chunk_size,
            self._next(),
            self._rng(16),
            label,
        )
        sealer = StreamSealer(
            self._secret, header.pack(), length=length, on_final=self._summaries.append
        )
        self._current = sealer
        return sealer

    def opener(self, header_bytes: bytes, *, expect: str | Section) -> StreamOpener:
        """Check a received header against the session and what comes next; open it."""

        if self._sending:
            raise ValueError("the source's channel only seals streams")
        if self.busy:
            raise StreamError("the previous stream ended before its final chunk")
        header, used = StreamHeader.unpack(header_bytes)
        if used != len(header_bytes):
            raise StreamError("bytes after the stream header")
        if header.migration_id != self._mid:
            raise StreamError("stream belongs to another migration")
        if header.source.pack() != self._source.pack():
            raise StreamError("stream names another source enclave")
        if header.destination.pack() != self._destination.pack():
            raise StreamError("stream names another destination enclave")
        if header.sequence != self._next():
            raise StreamError(
                f"stream number {header.sequence} where {self._next()} was expected",
                sequence=header.sequence,
            )
        label, length = _expectation(expect, header.chunk_size, StreamError)
        if header.label != label:
            raise StreamError(f"stream labelled {header.label!r} where {label!r} was expected")
        opener = StreamOpener(
            self._secret, header_bytes, length=length, on_final=self._summaries.append
        )
        self._current = opener
        return opener


def _expectation(
    expect: str | Section, chunk_size: int, error: type[Exception]
) -> tuple[str, int | None]:
    if isinstance(expect, str):
        return expect, None
    if expect.page_size and chunk_size % expect.page_size:
        raise error(f"section {expect.label!r}: chunk size is not a multiple of its page size")
    return expect.label, expect.length
