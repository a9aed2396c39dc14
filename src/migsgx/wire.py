"""Length-prefixed, size-capped CBOR frames with a declared schema.

Every message that crosses a process boundary in migsgx is one frame::

    u32 big-endian length N | N bytes of CBOR encoding one map

The map's ``"t"`` entry names the message type; a :class:`Schema` declares, for
each type, which fields it has and their Python types.  Decoding checks the
length cap before reading the body, decodes CBOR with no tag hooks (so only
plain data comes out: never objects, never code), and validates against the
schema.  Anything else raises :class:`~migsgx.errors.FrameError`.

The codec is sans-I/O (:class:`FrameDecoder`); :func:`send_frame` and
:func:`recv_frame` are thin blocking helpers over a socket.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import cbor2

from .errors import ConnectionClosedError, FrameError

HEADER = struct.Struct(">I")
DEFAULT_MAX_FRAME = 1 << 20  # 1 MiB: control messages are small


@dataclass(frozen=True)
class Schema:
    """Message types and their fields: ``{type: {field: python_type | tuple}}``.

    A field whose type tuple contains ``type(None)`` may be absent or null.
    Extra fields are refused, so that a peer cannot smuggle data past a check.
    """

    name: str
    messages: Mapping[str, Mapping[str, type | tuple[type, ...]]] = field(default_factory=dict)

    def validate(self, msg: Any) -> dict[str, Any]:
        if not isinstance(msg, dict):
            raise FrameError(f"{self.name}: frame is not a map")
        mtype = msg.get("t")
        if not isinstance(mtype, str) or mtype not in self.messages:
            raise FrameError(f"{self.name}: unknown message type {mtype!r}")
        fields = self.messages[mtype]
        for key in msg:
            if key != "t" and key not in fields:
                raise FrameError(f"{self.name}: {mtype}: unexpected field {key!r}")
        for key, ftype in fields.items():
            types = ftype if isinstance(ftype, tuple) else (ftype,)
            if key not in msg:
                if type(None) in types:
                    continue
                raise FrameError(f"{self.name}: {mtype}: missing field {key!r}")
            value = msg[key]
            # bool is an int in Python; do not let True pass as a length.
            if isinstance(value, bool) and bool not in types:
                raise FrameError(f"{self.name}: {mtype}: field {key!r} has wrong type")
            if not isinstance(value, types):
                raise FrameError(f"{self.name}: {mtype}: field {key!r} has wrong type")
        return msg


def encode(msg: Mapping[str, Any], *, max_size: int = DEFAULT_MAX_FRAME) -> bytes:
    body = cbor2.dumps(dict(msg))
    if len(body) > max_size:
        raise FrameError(f"frame of {len(body)} bytes exceeds the cap of {max_size}")
    return HEADER.pack(len(body)) + body


def decode_body(body: bytes, schema: Schema | None) -> dict[str, Any]:
    try:
        msg = cbor2.loads(body)
    except Exception as exc:  # cbor2 raises several types on garbage
        raise FrameError(f"frame body is not valid CBOR: {exc}") from exc
    if schema is None:
        if not isinstance(msg, dict):
            raise FrameError("frame is not a map")
        return msg
    return schema.validate(msg)


class FrameDecoder:
    """Sans-I/O decoder: feed bytes with :meth:`receive`, take frames from :meth:`frames`."""

    def __init__(self, schema: Schema | None, *, max_size: int = DEFAULT_MAX_FRAME) -> None:
        self._schema = schema
        self._max = max_size
        self._buf = bytearray()

    def receive(self, data: bytes) -> None:
        self._buf += data

    def frames(self) -> Iterator[dict[str, Any]]:
        while len(self._buf) >= HEADER.size:
            (length,) = HEADER.unpack_from(self._buf)
            if length > self._max:
                raise FrameError(f"frame of {length} bytes exceeds the cap of {self._max}")
            if len(self._buf) < HEADER.size + length:
                return
            body = bytes(self._buf[HEADER.size : HEADER.size + length])
            del self._buf[: HEADER.size + length]
            yield decode_body(body, self._schema)

    @property
    def pending(self) -> int:
        return len(self._buf)


class _Sock(Protocol):
    def sendall(self, data: bytes, /) -> Any: ...
    def recv_into(self, buffer: Any, nbytes: int = ..., /) -> int: ...


def recv_exactly(sock: _Sock, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        r = sock.recv_into(view[got:], n - got)
        if r == 0:
            if got == 0:
                raise ConnectionClosedError("peer closed the connection")
            raise FrameError(f"connection closed inside a frame ({got} of {n} bytes)")
        got += r
    return bytes(buf)


def send_frame(sock: _Sock, msg: Mapping[str, Any], *, max_size: int = DEFAULT_MAX_FRAME) -> None:
    sock.sendall(encode(msg, max_size=max_size))


def recv_frame(
    sock: _Sock, schema: Schema | None, *, max_size: int = DEFAULT_MAX_FRAME
) -> dict[str, Any]:
    """Read one frame; the length cap is checked before the body is read."""

    (length,) = HEADER.unpack(recv_exactly(sock, HEADER.size))
    if length > max_size:
        raise FrameError(f"frame of {length} bytes exceeds the cap of {max_size}")
    return decode_body(recv_exactly(sock, length), schema)
