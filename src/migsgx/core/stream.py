"""The authenticated chunk stream that carries enclave state (``docs/spec/stream.md``).

age-style STREAM over AES-256-GCM: fixed-size chunks, nonce = 11-byte big-endian
counter || last-chunk flag, every chunk bound to a header that names the migration,
both enclaves, the chunk size, the stream's number in the session and its label.
A transfer is a sealed manifest followed by one stream per section it lists; the
manifest (:mod:`.manifest`) alone tells the receiver where every chunk's plaintext goes.

The hot path (:meth:`StreamSealer.seal_into`, :meth:`StreamOpener.open_into`) works
on caller-owned buffers with ``AESGCM.encrypt_into``/``decrypt_into`` when the
installed ``cryptography`` has them, so sealing allocates nothing per chunk.
Sealers and openers are not thread-safe; use one per thread.

One stream at a time: the session that numbers them and checks each against
what comes next is :mod:`.stream_channel`.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Final, TypeAlias

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ..errors import StreamError
from ..limits import STREAM_MAX_CHUNK_SIZE, STREAM_MIN_CHUNK_SIZE
from .manifest import label_bytes
from .policy import EnclaveIdentity

BytesLike: TypeAlias = bytes | bytearray | memoryview
"""Contiguous byte buffers (cast other views with ``memoryview.cast("B")``)."""

__all__ = [
    "MAX_CHUNK_SIZE",
    "MIN_CHUNK_SIZE",
    "TAG_SIZE",
    "StreamHeader",
    "StreamOpener",
    "StreamSealer",
    "StreamSummary",
    "streams_digest",
]

MAGIC: Final = b"MGXS"
VERSION: Final = 1
TAG_SIZE: Final = 16
MIN_CHUNK_SIZE: Final = STREAM_MIN_CHUNK_SIZE
MAX_CHUNK_SIZE: Final = STREAM_MAX_CHUNK_SIZE
COUNTER_LIMIT: Final = 1 << 88

_FIXED: Final = struct.Struct(">4sBBHII16s16s68s68s")  # 184 bytes, then the label
_NONCE_LOW: Final = struct.Struct(">QB")  # counter < 2**64 at offset 3, then the flag
_pack_low: Final = _NONCE_LOW.pack_into
_LOW_LIMIT: Final = 1 << 64
_LAST_COUNTER: Final = (1 << 88) - 1
_SUMMARY: Final = struct.Struct(">I32s11s16s")
_KEY_INFO: Final = b"migsgx/v1 stream key"
_DIGEST_LABEL: Final = b"migsgx/v1 stream digest"
HAVE_INTO: Final = hasattr(AESGCM, "encrypt_into") and hasattr(AESGCM, "decrypt_into")


def _sha256(data: bytes) -> bytes:
    h = hashes.Hash(hashes.SHA256())
    h.update(data)
    return h.finalize()


# --- header ----------------------------------------------------------------------
@dataclass(frozen=True)
class StreamHeader:
    """The clear-text stream header; its bytes are the AAD of every chunk."""

    migration_id: bytes
    source: EnclaveIdentity
    destination: EnclaveIdentity
    chunk_size: int
    sequence: int
    salt: bytes
    label: str

    def __post_init__(self) -> None:
        if len(self.migration_id) != 16 or len(self.salt) != 16:
            raise ValueError("migration id and salt are 16 bytes")
        if not MIN_CHUNK_SIZE <= self.chunk_size <= MAX_CHUNK_SIZE:
            raise ValueError(f"chunk size must be in {MIN_CHUNK_SIZE}..{MAX_CHUNK_SIZE}")
        if not 0 <= self.sequence <= 0xFFFFFFFF:
            raise ValueError("sequence number out of range")
        label_bytes(self.label)

    def pack(self) -> bytes:
        raw = label_bytes(self.label)
        return (
            _FIXED.pack(
                MAGIC,
                VERSION,
                len(raw),
                0,
                self.chunk_size,
                self.sequence,
                self.migration_id,
                self.salt,
                self.source.pack(),
                self.destination.pack(),
            )
            + raw
        )

    @classmethod
    def unpack(cls, data: bytes) -> tuple[StreamHeader, int]:
        """Parse a header at the start of ``data``; return it and its length in bytes."""

        if len(data) < _FIXED.size:
            raise StreamError("stream header is truncated")
        magic, version, label_len, reserved, chunk, seq, mid, salt, src, dst = _FIXED.unpack_from(
            data
        )
        if magic != MAGIC:
            raise StreamError("not a migsgx stream header")
        if version != VERSION:
            raise StreamError(f"unsupported stream format version {version}", version=version)
        if reserved != 0:
            raise StreamError("stream header reserved bytes are not zero")
        end = _FIXED.size + label_len
        if len(data) < end:
            raise StreamError("stream header is truncated")
        try:
            label = bytes(data[_FIXED.size : end]).decode("ascii")
            src_id, dst_id = EnclaveIdentity.unpack(src), EnclaveIdentity.unpack(dst)
            header = cls(mid, src_id, dst_id, chunk, seq, salt, label)
        except ValueError as exc:
            raise StreamError(f"invalid stream header: {exc}") from exc
        return header, end


@dataclass(frozen=True)
class StreamSummary:
    """What both ends record when a stream ends; LOADED binds the digest of all of them."""

    sequence: int
    header_hash: bytes
    chunks: int
    length: int

    def pack(self) -> bytes:
        return _SUMMARY.pack(
            self.sequence,
            self.header_hash,
            self.chunks.to_bytes(11, "big"),
            self.length.to_bytes(16, "big"),
        )


def streams_digest(summaries: Iterable[StreamSummary]) -> bytes:
    items = [s.pack() for s in summaries]
    return _sha256(_DIGEST_LABEL + len(items).to_bytes(4, "big") + b"".join(items))


# --- sealing and opening -------------------------------------------------------------
class _Stream:
    """Key, nonce and bookkeeping shared by both ends of one stream."""

    def __init__(
        self,
        secret: bytes,
        header_bytes: bytes,
        *,
        length: int | None,
        on_final: Callable[[StreamSummary], None] | None,
    ) -> None:
        header, used = StreamHeader.unpack(header_bytes)
        if used != len(header_bytes):
            raise StreamError("bytes after the stream header")
        if len(secret) != 32:
            raise ValueError("the stream secret is 32 bytes")
        if length is not None and length < 0:
            raise ValueError("length must not be negative")
        self.header = header
        self.header_bytes = bytes(header_bytes)
        key = HKDF(
            algorithm=hashes.SHA256(), length=32, salt=header.salt, info=_KEY_INFO + header_bytes
        ).derive(secret)
        self._aead = AESGCM(key)
        self._aad = self.header_bytes
        self._chunk = header.chunk_size
        self._nonce = bytearray(12)
        self._counter = 0
        self._length = 0
        self._expect = length
        self._last = None if length is None else max(0, -(-length // header.chunk_size) - 1)
        self._done = False
        self._summary: StreamSummary | None = None
        self._on_final = on_final

    @property
    def position(self) -> int:
        """The counter of the next chunk (its index in the stream)."""

        return self._counter

    @property
    def done(self) -> bool:
        return self._done

    def _set_nonce(self, final: bool) -> None:
        counter = self._counter
        if counter < 1 << 64:
            _NONCE_LOW.pack_into(self._nonce, 3, counter, final)
        else:
            self._nonce[:11] = counter.to_bytes(11, "big")
            self._nonce[11] = final

    def _expected_size(self, index: int) -> int:
        assert self._expect is not None
        return min(self._chunk, self._expect - index * self._chunk)

    def _end(self) -> None:
        self._done = True
        self._summary = StreamSummary(
            self.header.sequence, _sha256(self.header_bytes), self._counter, self._length
        )
        if self._on_final is not None:
            self._on_final(self._summary)

    def summary(self) -> StreamSummary:
        """The stream's summary; raises StreamError if its final chunk has not been seen."""

        if self._summary is None:
            raise StreamError("the stream ended before its final chunk", label=self.header.label)
        return self._summary


class StreamSealer(_Stream):
    """The source end of one stream."""

    def seal_into(self, plaintext: BytesLike, out: BytesLike, *, final: bool) -> int:
        """Seal one chunk into ``out`` (at least ``len(plaintext) + 16`` bytes); return its size.

        Buffers are byte-format (``bytes``, ``bytearray``, ``memoryview`` of bytes).
        """

        size = len(plaintext)
        counter = self._counter
        if self._done:
            raise ValueError("the stream has ended; no chunk may follow the final one")
        if final:
            if size > self._chunk:
                raise ValueError("the final chunk is larger than the chunk size")
            if size == 0 and counter:
                raise ValueError("an empty final chunk is only allowed for an empty stream")
        elif size != self._chunk:
            raise ValueError("every chunk but the final one must be exactly the chunk size")
        if self._expect is not None and (
            size != self._expected_size(counter) or final != (counter == self._last)
        ):
            raise ValueError("chunk does not match the declared length of the stream")
        if counter >= _LAST_COUNTER and (counter > _LAST_COUNTER or not final):
            raise StreamError("stream chunk counter overflow")
        if counter < _LOW_LIMIT:
            _pack_low(self._nonce, 3, counter, final)
        else:
            self._set_nonce(final)
        want = size + TAG_SIZE
        if len(out) != want:
            if len(out) < want:
                raise ValueError(f"output buffer must hold {want} bytes")
            out = memoryview(out)[:want]
        if HAVE_INTO:
            self._aead.encrypt_into(self._nonce, plaintext, self._aad, out)
        else:  # cryptography without the *_into methods
            memoryview(out)[:] = self._aead.encrypt(bytes(self._nonce), bytes(plaintext), self._aad)
        self._counter = counter + 1
        self._length += size
        if final:
            self._end()
        return want

    def seal_chunk(self, plaintext: BytesLike, *, final: bool) -> bytes:
        out = bytearray(len(plaintext) + TAG_SIZE)
        self.seal_into(plaintext, out, final=final)
        return bytes(out)

    def seal(self, payload: BytesLike) -> bytes:
        """Seal a whole payload as the rest of this stream; return the chunks concatenated."""

        view = memoryview(payload).cast("B")
        if self._counter:
            raise ValueError("seal() seals a whole stream; chunks were sealed already")
        chunk = self._chunk
        count = max(1, -(-len(view) // chunk))
        out = bytearray(len(view) + count * TAG_SIZE)
        o = memoryview(out)
        for i in range(count):
            part = view[i * chunk : (i + 1) * chunk]
            start = i * (chunk + TAG_SIZE)
            self.seal_into(part, o[start : start + len(part) + TAG_SIZE], final=i == count - 1)
        return bytes(out)


class StreamOpener(_Stream):
    """The destination end of one stream."""

    _failed = False

    def open_into(self, ciphertext: BytesLike, out: BytesLike, *, final: bool | None = None) -> int:
        """Open one chunk into the start of ``out``; return the plaintext length.

        ``final`` is an optional, unauthenticated hint from the transport. On any
        error the part of ``out`` given to this chunk is zeroed, and the stream is
        dead: every later call raises.
        """

        size = len(ciphertext) - TAG_SIZE
        counter = self._counter
        if self._failed:
            raise StreamError("the stream failed earlier")
        if self._done:
            self._failed = True
            raise StreamError("chunk after the final chunk")
        if not 0 <= size <= self._chunk:
            self._failed = True
            raise StreamError("chunk has an invalid size")
        view = out
        if len(out) != size:
            if len(out) < size:
                raise ValueError(f"output buffer must hold {size} bytes")
            view = memoryview(out)[:size]
        if counter > _LAST_COUNTER:
            self._failed = True
            raise StreamError("stream chunk counter overflow")
        if self._expect is not None:
            last = self._last
            assert last is not None
            if counter > last or size != self._expected_size(counter):
                self._failed = True
                raise StreamError("chunk does not match the length the manifest declares")
            candidates: tuple[bool, ...] = (counter == last,)
        elif size < self._chunk:
            candidates = (True,)
        elif final is not None:
            candidates = (final,)
        else:
            candidates = (False, True)
        for flag in candidates:
            if counter < _LOW_LIMIT:
                _pack_low(self._nonce, 3, counter, flag)
            else:
                self._set_nonce(flag)
            try:
                if HAVE_INTO:
                    self._aead.decrypt_into(self._nonce, ciphertext, self._aad, view)
                else:  # cryptography without the *_into methods
                    memoryview(view)[:] = self._aead.decrypt(
                        bytes(self._nonce), bytes(ciphertext), self._aad
                    )
            except InvalidTag:
                continue
            break
        else:
            self._fail(view)
            raise StreamError("chunk failed authentication") from None
        if flag and size == 0 and counter:
            self._fail(view)
            raise StreamError("empty final chunk after data")
        self._counter = counter + 1
        self._length += size
        if flag:
            self._end()
        return size

    def _fail(self, buffer: BytesLike) -> None:
        self._failed = True
        view = memoryview(buffer)
        flat = view.cast("B") if view.format != "B" else view
        flat[:] = bytes(flat.nbytes)

    def open_chunk(self, ciphertext: BytesLike, *, final: bool | None = None) -> bytes:
        out = bytearray(max(0, len(ciphertext) - TAG_SIZE))
        size = self.open_into(ciphertext, out, final=final)
        return bytes(out[:size])

    def open(self, chunks: BytesLike) -> bytes:
        """Open the rest of a stream given as its concatenated chunks (spec 5.1)."""

        view = memoryview(chunks).cast("B")
        full = self._chunk + TAG_SIZE
        out = bytearray()
        pos = 0
        while True:
            rest = len(view) - pos
            if rest < TAG_SIZE:
                self._failed = True
                raise StreamError("stream ended before its final chunk")
            if self._expect is not None and self._counter <= (self._last or 0):
                take = min(rest, self._expected_size(self._counter) + TAG_SIZE)
            else:
                take = min(rest, full)
            out += self.open_chunk(view[pos : pos + take], final=rest <= full)
            pos += take
            if self._done:
                if pos != len(view):
                    self._failed = True
                    raise StreamError("data after the final chunk")
                return bytes(out)
