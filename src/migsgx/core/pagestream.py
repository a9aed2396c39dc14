"""The sealed page stream: CRIU's page-server bytes in AES-GCM frames (``docs/spec/pagestream.md``).

CRIU's own TLS (GnuTLS, 16 KiB records, a bounce buffer per splice) costs about
1.6 CPU-seconds per GiB on both ends together here, while AES-GCM itself runs at
many GB/s.  So CRIU talks plain to a local socket, and the agents carry its
bytes in large frames sealed with keys from the session's data key (which only
ever travels inside the agents' mutual TLS).  One stream per direction:

* frame = ``len`` (u32 BE, the sealed body's size) || AES-256-GCM(body), the
  4-byte length as associated data;
* nonce = 11-byte big-endian frame counter || 1 byte ``0x01`` on the last frame
  (else ``0x00``), as age's STREAM, so a dropped, repeated or reordered frame
  fails its tag, and a stream that ends without its last frame, or with bytes
  after it, is refused;
* key = HKDF-SHA256(data key, salt = session id, info = label || direction).

This module does no I/O (the relay is :mod:`migsgx.datapath.pagerelay`).  Every
authentication failure is one opaque :class:`~migsgx.errors.PageStreamError`.
"""

from __future__ import annotations

import struct
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ..errors import PageStreamError

__all__ = [
    "DOWN",
    "HEADER_SIZE",
    "MAX_PAYLOAD",
    "TAG_SIZE",
    "UP",
    "PageFrameOpener",
    "PageFrameSealer",
    "page_stream_key",
]

HEADER_SIZE: Final = 4
TAG_SIZE: Final = 16
#: Largest plaintext in one frame: big enough that per-frame costs vanish, small
#: enough that a receiver's buffer stays a few MiB.
MAX_PAYLOAD: Final = 4 << 20
UP: Final = b"up"  # source CRIU -> destination page server: the pages
DOWN: Final = b"down"  # page server -> source CRIU: its small answers
_LABEL: Final = b"migsgx/v1 page stream "
_COUNTER_LIMIT: Final = 1 << 88
_LENGTH: Final = struct.Struct(">I")
_HAVE_INTO: Final = hasattr(AESGCM, "encrypt_into") and hasattr(AESGCM, "decrypt_into")


def page_stream_key(data_key: bytes, session_id: bytes, direction: bytes) -> bytes:
    """The AES-256 key of one direction of one session's page stream."""

    if len(data_key) != 32 or not session_id or direction not in (UP, DOWN):
        raise ValueError("a 32-byte data key, a session id and UP or DOWN")
    return HKDF(
        algorithm=hashes.SHA256(), length=32, salt=session_id, info=_LABEL + direction
    ).derive(data_key)


def _nonce(counter: int, last: bool) -> bytes:
    return counter.to_bytes(11, "big") + (b"\x01" if last else b"\x00")


class PageFrameSealer:
    """Seals one direction's frames in order.  Not thread-safe: one per pump."""

    def __init__(self, key: bytes) -> None:
        self._aead = AESGCM(key)
        self._counter = 0
        self.done = False

    def seal_into(self, payload: memoryview, out: memoryview, *, last: bool = False) -> int:
        """Write the frame for ``payload`` into ``out``; return its size.

        ``out`` holds at least ``HEADER_SIZE + len(payload) + TAG_SIZE`` bytes.
        """

        n = len(payload)
        if self.done:
            raise ValueError("the stream has ended")
        if n > MAX_PAYLOAD:
            raise ValueError(f"a frame carries at most {MAX_PAYLOAD} bytes")
        if self._counter >= _COUNTER_LIMIT - 1:
            raise ValueError("the frame counter is exhausted")
        header = _LENGTH.pack(n + TAG_SIZE)
        out[:HEADER_SIZE] = header
        nonce = _nonce(self._counter, last)
        end = HEADER_SIZE + n + TAG_SIZE
        if _HAVE_INTO:
            self._aead.encrypt_into(nonce, payload, header, out[HEADER_SIZE:end])
        else:  # pragma: no cover - older cryptography
            out[HEADER_SIZE:end] = self._aead.encrypt(nonce, bytes(payload), header)
        self._counter += 1
        self.done = last
        return end

    def seal(self, payload: bytes, *, last: bool = False) -> bytes:
        out = bytearray(HEADER_SIZE + len(payload) + TAG_SIZE)
        self.seal_into(memoryview(payload), memoryview(out), last=last)
        return bytes(out)


class PageFrameOpener:
    """Opens one direction's frames in order; refuses anything out of place."""

    def __init__(self, key: bytes) -> None:
        self._aead = AESGCM(key)
        self._counter = 0
        self.done = False

    @staticmethod
    def body_size(header: bytes | bytearray | memoryview) -> int:
        """The sealed body's size from a frame's 4 header bytes (checked against the cap)."""

        size: int = _LENGTH.unpack(header)[0]
        if not TAG_SIZE <= size <= MAX_PAYLOAD + TAG_SIZE:
            raise PageStreamError("the page stream did not authenticate")
        return size

    def open_into(self, header: bytes, body: memoryview, out: memoryview) -> tuple[int, bool]:
        """Open one frame into ``out``; return (payload size, whether it was the last)."""

        if self.done:
            raise PageStreamError("the page stream did not authenticate")  # bytes after the end
        n = len(body) - TAG_SIZE
        for last in (False, True):
            try:
                if _HAVE_INTO:
                    self._aead.decrypt_into(_nonce(self._counter, last), body, header, out[:n])
                else:  # pragma: no cover - older cryptography
                    out[:n] = self._aead.decrypt(_nonce(self._counter, last), bytes(body), header)
            except InvalidTag:
                continue
            self._counter += 1
            self.done = last
            return n, last
        raise PageStreamError("the page stream did not authenticate")

    def open(self, frame: bytes) -> tuple[bytes, bool]:
        """One whole frame (header and body) -> (payload, last)."""

        if len(frame) < HEADER_SIZE or self.body_size(frame[:HEADER_SIZE]) != len(frame) - 4:
            raise PageStreamError("the page stream did not authenticate")
        out = bytearray(len(frame) - HEADER_SIZE - TAG_SIZE)
        n, last = self.open_into(
            frame[:HEADER_SIZE], memoryview(frame)[HEADER_SIZE:], memoryview(out)
        )
        return bytes(out[:n]), last

    def end(self) -> None:
        """The connection ended: without the last frame, the stream was truncated."""

        if not self.done:
            raise PageStreamError("the page stream ended before its last frame")
