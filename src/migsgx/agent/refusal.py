"""The destination agent's half of the way back from a COMMIT it never acted on.

A post-copy tree that a former agent held can never run (no other agent can
open its page window again, ``docs/spec/commit.md`` section 6 item 5): a
restarted agent kills it.  If the source had committed by then, its enclaves
hold the only state, frozen.  The agent therefore keeps a note of such a
session (:data:`REFUSABLE`, in place of its work directory: the source host's
address, this agent's, the enclaves' announced infos and the migration ids
they loaded), and answers ``refuse {session_id, index}`` from that source host
with a data port and a fresh data key: there a fresh enclave of the announced
image runs a re-delivery handshake offered in mode ``refuse``, refuses the
migration id in this host's claim store for good and sends the proof back
(section 2.2).  Nothing of the state comes, nothing runs here; a refusal of an
id some enclave claimed fails in the store, whatever this note says.
"""

from __future__ import annotations

import contextlib
import json
import logging
import secrets
import select
import shutil
import socket
import threading
import time
from pathlib import Path
from typing import Any, Final

import cbor2

from .._fs import write_private
from ..datapath.incoming import IncomingEnclave
from ..errors import MigSGXError, ProtocolError
from ..host.appctl import info_from_wire
from ..host.client import EnclaveInfo
from .datalink import accept_data, check_pinned
from .held import HeldRecord, _own

__all__ = ["REFUSABLE", "Refusal", "mark_refusable", "refusable_note", "serve_refusal"]

log = logging.getLogger("migsgx.agent")

REFUSABLE: Final = "refusable.json"
#: How long a refusal's listener waits for its data connection (unless its session
#: ends first), and each read of the refusal.
ACCEPT_TIMEOUT: Final = 30.0
#: How long it still waits once the control connection that asked for it ended: for
#: a data connection on its way (the tool connects before it closes that one).
END_GRACE: Final = 1.0


def mark_refusable(directory: Path, record: HeldRecord) -> None:
    """Replace a killed post-copy session's work directory by the note a refusal needs."""

    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    note = {"peer": record.peer, "local": record.local, "enclaves": record.enclaves,
            "arrivals": record.arrivals}  # fmt: skip
    write_private(directory / REFUSABLE, json.dumps(note, sort_keys=True).encode())


def refusable_note(work_dir: Path, session_id: bytes) -> dict[str, Any] | None:
    """The note of a session ended that way, if this agent wrote one (None otherwise)."""

    path = work_dir / session_id.hex() / REFUSABLE
    if not path.exists():
        return None
    try:
        note = json.loads(_own(path))
    except (OSError, ValueError, MigSGXError):
        return None
    if not (
        isinstance(note, dict)
        and isinstance(note.get("peer"), str)
        and isinstance(note.get("local"), str)
        and isinstance(note.get("enclaves"), list)
        and all(isinstance(e, str) for e in note["enclaves"])
    ):
        return None
    return note


class Refusal:
    """One ``refuse`` request's listener, and the refusal run on the connection it takes.

    It lives no longer than it must: the listener closes once it took its one
    connection, or once the control connection that asked for it ended
    (:meth:`end`; the tool makes its data connection first), after at most
    :data:`END_GRACE` for a connection still on its way; without either, after
    :data:`ACCEPT_TIMEOUT`.
    """

    def __init__(
        self,
        listener: socket.socket,
        key: bytes,
        session_id: bytes,
        index: int,
        announced: EnclaveInfo,
        peer: str,
        platform_socket: Path,
    ) -> None:
        self.port = int(listener.getsockname()[1])
        self.key = key
        listener.setblocking(False)
        self._listener = listener
        self._ended: float | None = None
        self._closed = threading.Event()
        self._wake, self._woken = socket.socketpair()
        self._woken.setblocking(False)
        self.thread = threading.Thread(
            target=self._run,
            args=(session_id, index, announced, peer, platform_socket),
            name="migsgx-agent-refuse", daemon=True,
        )  # fmt: skip
        self.thread.start()

    def end(self) -> None:
        """The control connection that asked ended: returns once the listener is
        closed (a connection already made is still taken).  Idempotent."""

        if self._ended is None:
            self._ended = time.monotonic()
            with contextlib.suppress(OSError):
                self._wake.send(b"x")
        self._closed.wait(END_GRACE + 1.0)

    def _accepted(self) -> socket.socket | None:
        """The data connection; None when none came in time.  The listener is closed."""

        deadline = time.monotonic() + ACCEPT_TIMEOUT
        try:
            while True:
                with contextlib.suppress(BlockingIOError, InterruptedError):
                    conn, _ = self._listener.accept()
                    conn.setblocking(True)
                    return conn
                if self._ended is not None:
                    deadline = min(deadline, self._ended + END_GRACE)
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                select.select([self._listener, self._woken], [], [], left)
                with contextlib.suppress(OSError):  # (BlockingIOError: not woken)
                    self._woken.recv(64)
        finally:
            self._listener.close()
            self._closed.set()

    def _run(
        self,
        session_id: bytes,
        index: int,
        announced: EnclaveInfo,
        peer: str,
        platform_socket: Path,
    ) -> None:
        tag = session_id.hex()[:8]
        conn: socket.socket | None = None
        try:
            conn = self._accepted()
            if conn is None:
                log.info("migration %s: enclave %d: no data connection came for the refusal",
                         tag, index)  # fmt: skip
                return
            _refuse_one(conn, self.key, session_id, index, announced, peer, platform_socket)
        except (MigSGXError, OSError) as exc:
            log.warning("migration %s: enclave %d: no refusal: %s", tag, index, exc)
        finally:
            if conn is not None:
                with contextlib.suppress(OSError):
                    conn.close()
            self._wake.close()
            self._woken.close()


def serve_refusal(
    note: dict[str, Any], index: int, session_id: bytes, platform_socket: Path
) -> Refusal:
    """Listen for one data connection that refuses enclave ``index``'s id."""

    if not 0 <= index < len(note["enclaves"]):
        raise ProtocolError("no such enclave")
    try:
        wire = cbor2.loads(bytes.fromhex(note["enclaves"][index]))
        announced = EnclaveInfo(**info_from_wire(wire))
    except (ValueError, TypeError, KeyError, cbor2.CBORDecodeError) as exc:
        raise ProtocolError("the session's note names no usable enclave") from exc
    local = str(note["local"])
    listener = socket.socket(socket.AF_INET6 if ":" in local else socket.AF_INET)
    try:
        listener.bind((local, 0))
        listener.listen(1)
    except OSError:
        listener.close()
        raise
    return Refusal(
        listener, secrets.token_bytes(32), session_id, index, announced, str(note["peer"]),
        platform_socket,
    )  # fmt: skip


def _refuse_one(
    conn: socket.socket,
    key: bytes,
    session_id: bytes,
    index: int,
    announced: EnclaveInfo,
    peer: str,
    platform_socket: Path,
) -> None:
    """Refuse enclave ``index``'s id on the accepted data connection ``conn``."""

    conn.settimeout(ACCEPT_TIMEOUT)
    addr = conn.getpeername()
    if addr[0] != peer:
        raise ProtocolError(f"a refusal's data connection from {addr[0]}")
    if accept_data(conn, key, session_id) != index:
        raise ProtocolError("the data connection names another enclave")
    engine, offer = IncomingEnclave.accept_offer(conn, platform_socket)
    check_pinned(engine.image, announced)
    if offer["mode"] != "refuse":
        raise ProtocolError("only a refusal is taken for a session that ended")
    engine.receive(conn, offer)
    log.warning("migration %s: enclave %d: the migration id was refused here for good "
                "(the tree could never run); the source may run again",
                session_id.hex()[:8], index)  # fmt: skip
