"""Opening a data connection: a mutual proof keyed from the TLS control session.

The bulk of an enclave's migration travels on its own TCP connection (the
state inside is sealed end to end by the enclaves, and the enclaves attest to
each other on it).  What the connection itself must not do is let someone who
is not the session's peer in: the destination would otherwise launch whatever
an on-path attacker offers.  Before this exchange the first frame carried the
session's bearer token in clear; now the token never leaves TLS.

The destination's ``ready`` reply (on the mutually authenticated TLS control
connection) carries a fresh 32-byte *data key*.  A data connection then opens
with three fixed-size records, checked before any byte is parsed as a frame::

    D -> S  challenge  "MIGSGXD1" || nonce_d (32)                         40 bytes
    S -> D  hello      "MIGSGXS1" || index (u16 BE) || nonce_s (32) ||
                       HMAC-SHA256(key, "migsgx data source" || mid || nonce_d || nonce_s || index)
                                                                          74 bytes
    D -> S  proof      HMAC-SHA256(key, "migsgx data dest" || mid || nonce_d || nonce_s || index)
                                                                          32 bytes

Both nonces are fresh per connection, so a recorded hello does not open a
second connection (replay); each side proves knowledge of the key (mutual).
The exchange authenticates the peers, not every later byte: a TCP hijacker
could still inject an ``offer``, so the destination also pins the offered image
to the MRENCLAVE that ``begin`` announced over TLS before it launches anything
(:func:`check_pinned`), and everything after the offer is the enclaves'
attested, sealed stream.  Spec: ``docs/spec/channels.md``, "data connection".
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import socket
from collections.abc import Callable
from typing import Final

from ..errors import ConnectionClosedError, DataLinkError, ImageError, ImagePinError
from ..host.client import EnclaveInfo
from ..sgx.image import EnclaveImage

__all__ = [
    "CHALLENGE_SIZE",
    "HELLO_SIZE",
    "KEY_SIZE",
    "PROOF_SIZE",
    "DestinationLink",
    "SourceLink",
    "accept_data",
    "check_pinned",
    "open_data",
]

KEY_SIZE: Final = 32
NONCE_SIZE: Final = 32
MAC_SIZE: Final = 32
_CHALLENGE_MAGIC: Final = b"MIGSGXD1"
_HELLO_MAGIC: Final = b"MIGSGXS1"
CHALLENGE_SIZE: Final = len(_CHALLENGE_MAGIC) + NONCE_SIZE
HELLO_SIZE: Final = len(_HELLO_MAGIC) + 2 + NONCE_SIZE + MAC_SIZE
PROOF_SIZE: Final = MAC_SIZE
_SOURCE_LABEL: Final = b"migsgx data source"
_DEST_LABEL: Final = b"migsgx data dest"


def _mac(key: bytes, label: bytes, mid: bytes, nonce_d: bytes, nonce_s: bytes, index: int) -> bytes:
    # mid has a variable length: prefix it so that no two inputs share an encoding.
    msg = b"".join(
        (label, len(mid).to_bytes(1, "big"), mid, nonce_d, nonce_s, index.to_bytes(2, "big"))
    )
    return hmac.new(key, msg, hashlib.sha256).digest()


def _check_key(key: bytes) -> None:
    if not isinstance(key, bytes) or len(key) != KEY_SIZE:
        raise ValueError("a data key is 32 bytes")


class DestinationLink:
    """The destination's half, with no I/O: challenge, check the hello, prove."""

    def __init__(
        self, key: bytes, mid: bytes, *, randbytes: Callable[[int], bytes] = secrets.token_bytes
    ) -> None:
        _check_key(key)
        self._key = key
        self._mid = mid
        self._nonce_d = randbytes(NONCE_SIZE)
        self._nonce_s = b""
        self.index: int | None = None

    def challenge(self) -> bytes:
        return _CHALLENGE_MAGIC + self._nonce_d

    def receive_hello(self, record: bytes) -> int:
        """The enclave index the source opens; one opaque error for every failure."""

        if len(record) != HELLO_SIZE or not record.startswith(_HELLO_MAGIC):
            raise DataLinkError("the data connection did not authenticate")
        body = record[len(_HELLO_MAGIC) :]
        index = int.from_bytes(body[:2], "big")
        nonce_s, mac = body[2 : 2 + NONCE_SIZE], body[2 + NONCE_SIZE :]
        want = _mac(self._key, _SOURCE_LABEL, self._mid, self._nonce_d, nonce_s, index)
        if not hmac.compare_digest(mac, want):
            raise DataLinkError("the data connection did not authenticate")
        self._nonce_s = nonce_s
        self.index = index
        return index

    def proof(self) -> bytes:
        if self.index is None:
            raise ValueError("no authenticated hello yet")
        return _mac(self._key, _DEST_LABEL, self._mid, self._nonce_d, self._nonce_s, self.index)


class SourceLink:
    """The source's half, with no I/O: answer the challenge, check the proof."""

    def __init__(
        self,
        key: bytes,
        mid: bytes,
        index: int,
        *,
        randbytes: Callable[[int], bytes] = secrets.token_bytes,
    ) -> None:
        _check_key(key)
        if not 0 <= index < 1 << 16:
            raise ValueError("an enclave index is 0 to 65535")
        self._key = key
        self._mid = mid
        self._index = index
        self._nonce_s = randbytes(NONCE_SIZE)
        self._nonce_d = b""

    def hello(self, challenge: bytes) -> bytes:
        if len(challenge) != CHALLENGE_SIZE or not challenge.startswith(_CHALLENGE_MAGIC):
            raise DataLinkError("the destination sent no valid challenge")
        self._nonce_d = challenge[len(_CHALLENGE_MAGIC) :]
        mac = _mac(self._key, _SOURCE_LABEL, self._mid, self._nonce_d, self._nonce_s, self._index)
        return _HELLO_MAGIC + self._index.to_bytes(2, "big") + self._nonce_s + mac

    def receive_proof(self, record: bytes) -> None:
        want = _mac(self._key, _DEST_LABEL, self._mid, self._nonce_d, self._nonce_s, self._index)
        if not self._nonce_d or not hmac.compare_digest(record, want):
            raise DataLinkError("the destination did not prove it holds the session's data key")


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        part = sock.recv(n - len(buf))
        if not part:
            raise ConnectionClosedError("the data connection closed during its opening")
        buf += part
    return bytes(buf)


def accept_data(sock: socket.socket, key: bytes, mid: bytes) -> int:
    """Destination: run the opening on an accepted connection; the enclave index."""

    link = DestinationLink(key, mid)
    sock.sendall(link.challenge())
    index = link.receive_hello(_recv_exactly(sock, HELLO_SIZE))
    sock.sendall(link.proof())
    return index


def open_data(sock: socket.socket, key: bytes, mid: bytes, index: int) -> None:
    """Source: run the opening on a fresh connection before anything else is sent."""

    link = SourceLink(key, mid, index)
    sock.sendall(link.hello(_recv_exactly(sock, CHALLENGE_SIZE)))
    link.receive_proof(_recv_exactly(sock, PROOF_SIZE))


def check_pinned(image: EnclaveImage, announced: EnclaveInfo) -> None:
    """Refuse an offered image unless it is the one ``begin`` announced over TLS.

    MRENCLAVE is the canonical digest of the image's files (``image.md``), so an
    equal MRENCLAVE is the same code; the signer is compared too.  Only the
    signature check runs on the offered bytes (nothing of them executes).
    """

    try:
        sig = image.verify()
    except ImageError as exc:
        raise ImagePinError(f"the offered enclave image does not verify: {exc.code}") from exc
    if not (
        hmac.compare_digest(sig.mr_enclave, announced.mr_enclave)
        and hmac.compare_digest(sig.mr_signer, announced.mr_signer)
    ):
        raise ImagePinError(
            f"the offered enclave image (MRENCLAVE {sig.mr_enclave.hex()[:16]}...) is not the "
            f"one the control session announced ({announced.mr_enclave.hex()[:16]}...)"
        )
