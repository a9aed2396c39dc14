"""Length-prefixed, size-capped CBOR frames with a declared schema.

Every message that crosses a process boundary in migsgx is one frame::

    u32 big-endian length N | N bytes of CBOR encoding one map

The map's ``"t"`` entry names the message type; a :class:`Schema` declares, for
each type, which fields it has and their Python types.  Decoding checks the
length cap before reading the body, decodes CBOR and refuses anything but plain
data (no tagged values, no shared or cyclic containers: never objects, never
code), and validates against the schema.  Anything else raises :class:`~migsgx.errors.FrameError`.

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
            # bool is an int in Python; do not let True pass as a length.  A field
            # declared as any value (``object``) takes booleans too.
            if isinstance(value, bool) and bool not in types and object not in types:
                raise FrameError(f"{self.name}: {mtype}: field {key!r} has wrong type")
            if not isinstance(value, types):
                raise FrameError(f"{self.name}: {mtype}: field {key!r} has wrong type")
        return msg


def encode(msg: Mapping[str, Any], *, max_size: int = DEFAULT_MAX_FRAME) -> bytes:
    msg = dict(msg)
    _check_plain(msg, sending=True)
    try:
        body = cbor2.dumps(msg)
    except (cbor2.CBOREncodeError, RecursionError) as exc:
        raise FrameError(f"frame cannot be encoded: {exc}") from exc
    if len(body) > max_size:
        raise FrameError(f"frame of {len(body)} bytes exceeds the cap of {max_size}")
    return HEADER.pack(len(body)) + body


# What a frame may hold: CBOR's plain data model and nothing else.
_PLAIN_SCALARS = (str, bytes, int, float, bool, type(None))
_SEND_SCALARS = (str, bytes, bytearray, int, float)
_PLAIN_KEYS = (str, int, bytes)


def _check_plain(msg: Any, *, sending: bool = False) -> None:
    """Refuse anything but plain data.

    cbor2 turns semantic tags into objects (datetime, Decimal, compiled regexes,
    sets, IP addresses, ...) and shared-value tags into shared or cyclic
    containers; none of those may come out of a frame.  A sender is held to the
    same rule (tuples and bytearrays pass: they encode as arrays and byte
    strings), so that it fails locally rather than having its peer drop the
    connection.
    """

    seen: set[int] = set()
    stack = [msg]
    while stack:
        item = stack.pop()
        if sending:
            # Subclasses (str enums, OrderedDict, ...) encode as their base type.
            scalar = item is None or isinstance(item, _SEND_SCALARS)
            container = isinstance(item, list | tuple | dict)
        else:
            scalar = type(item) in _PLAIN_SCALARS
            container = type(item) in (list, dict)
        if scalar:
            continue
        if not container:
            raise FrameError(f"frame holds a {type(item).__name__}, not plain data")
        if id(item) in seen:
            if sending:
                continue  # the encoder writes a shared value twice; it refuses cycles
            raise FrameError("frame holds a shared or cyclic value")
        seen.add(id(item))
        if isinstance(item, dict):
            for key, value in item.items():
                if not isinstance(key, _PLAIN_KEYS) or isinstance(key, bool):
                    raise FrameError("frame holds a map key that is not plain data")
                stack.append(value)
        else:
            stack.extend(item)


def decode_body(body: bytes, schema: Schema | None) -> dict[str, Any]:
    try:
        msg = cbor2.loads(body)
    except Exception as exc:  # cbor2 raises several types on garbage
        raise FrameError(f"frame body is not valid CBOR: {exc}") from exc
    _check_plain(msg)
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
