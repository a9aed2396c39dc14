"""The state again, without the tool: the guardian's half of window W2.

A committed source enclave keeps its frozen state until it is released, and the
guardian holds its connection once the tool is gone.  When the destination's
loaded copy died before it judged the decision (the agent answers a delivery
with ``copy-lost`` and keeps the tree held), this delivers the state again
exactly as the tool would (``docs/spec/commit.md``, 2.1): the destination agent
is asked, over the agents' mutual-TLS channel, for a fresh enclave
(``redeliver {session_id, index}``); it answers with a data port and the held
session's data key; the source enclave runs a new attested handshake with the
same migration id (the same destination platform only), dumps its frozen state
again and, on the fresh copy's LOADED, issues a COMMIT token of that session.

What the guardian needs for it comes through its pipe from the tool (the
enclave's info and image files, which are not secret); the data key is asked
for when needed and kept in memory only.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

import cbor2

from ..datapath.engine import OutgoingEnclave
from ..errors import InDoubtError, MigSGXError, ProtocolError
from ..host.appctl import info_from_wire, info_to_wire
from ..host.client import EnclaveInfo
from .control import CONNECT_TIMEOUT, AgentConnection
from .datalink import open_data
from .journal import Journal
from .protocol import VERSION
from .tls import AgentIdentity

__all__ = ["HeldEnclave", "redeliver_state"]

CONTROL_TIMEOUT: Final = 30.0
#: Runtime call ids of a re-delivery: far from the tool's (2**40 on) and the
#: guardian's own, so that a late answer to a dead tool's call is never taken.
_CALL_IDS: Final = 1 << 53


@dataclass
class HeldEnclave:
    """A committed source enclave's connection and what its offer names."""

    sock: socket.socket
    info: EnclaveInfo
    image_files: dict[str, bytes]
    mode: str = "pipelined"

    def describe(self) -> str:
        """One guardian pipe note's payload (hex CBOR; nothing in it is secret)."""

        wire = {"info": info_to_wire(self.info), "image_files": self.image_files,
                "mode": self.mode}  # fmt: skip
        return cbor2.dumps(wire).hex()

    @classmethod
    def parse(cls, sock: socket.socket, payload: str) -> HeldEnclave:
        try:
            wire = cbor2.loads(bytes.fromhex(payload))
            files = wire["image_files"]
            if not isinstance(files, dict) or not all(
                isinstance(k, str) and isinstance(v, bytes) for k, v in files.items()
            ):
                raise ValueError("image files")
            return cls(sock, EnclaveInfo(**info_from_wire(wire["info"])), dict(files),
                       str(wire.get("mode") or "pipelined"))  # fmt: skip
        except (ValueError, KeyError, TypeError, cbor2.CBORDecodeError) as exc:
            raise ProtocolError(f"bad enclave note for the guardian: {exc}") from exc


def _ask(journal: Journal, identity: AgentIdentity, index: int) -> tuple[int, bytes]:
    control = AgentConnection(journal.to, identity, CONTROL_TIMEOUT)
    try:
        control.call({"t": "hello", "version": VERSION, "host_id": "guardian"}, "welcome")
        reply = control.call(
            {"t": "redeliver", "session_id": journal.mid, "index": index}, "redelivery"
        )
    finally:
        control.close()
    return int(reply["data_port"]), bytes(reply.get("data_key") or b"")


def redeliver_state(
    journal: Journal,
    identity: AgentIdentity,
    held: Mapping[int, HeldEnclave],
    frames: Sequence[bytes],
) -> list[bytes]:
    """Deliver the state of every lost copy again; the decision frames to deliver now.

    ``frames`` are the recorded COMMIT tokens (one per enclave).  An enclave
    whose copy still waits keeps its token; a fresh copy gets a token of its
    own session.  Raises :class:`InDoubtError` when a copy could not be
    replaced (nothing changed: the decision stands, a later attempt may work).
    """

    out = list(frames)
    for index, frame in enumerate(frames):
        enclave = held.get(index)
        if enclave is None:
            raise InDoubtError(f"enclave {index}: the guardian does not hold it")
        try:
            port, key = _ask(journal, identity, index)
            if not port:
                continue  # that copy still waits (or decided): its token goes again
            peer = socket.create_connection((journal.to[0], port), timeout=CONNECT_TIMEOUT)
        except (MigSGXError, OSError) as exc:
            raise InDoubtError(f"enclave {index}: no fresh copy: {exc}") from exc
        source = OutgoingEnclave(enclave.sock, enclave.info, enclave.image_files,
                                 mode=enclave.mode)  # fmt: skip
        source.link._ids = _CALL_IDS + index * (1 << 32)
        source.token = bytes(frame)  # committed: the recorded token
        source._finished = True  # a failed attempt never asks it to abort (it cannot)
        source.index = index
        try:
            peer.settimeout(None)
            open_data(peer, key, journal.mid, index)
            out[index] = source.redeliver(peer)
        except (MigSGXError, OSError) as exc:
            if source.token is None or source.token == bytes(frame):
                raise InDoubtError(
                    f"enclave {index}: delivering the state again failed: {exc}"
                ) from exc
            # The fresh copy loaded and a token of its session exists, but it did not
            # confirm on the data connection: that token goes over TLS instead.
            out[index] = source.token
        finally:
            with contextlib.suppress(OSError):
                peer.close()
    return out
