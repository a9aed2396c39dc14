"""An end's hold on its enclave: runtime calls, and the ring's mover beside a call.

Both ends (and the checkpoint drivers) call their enclave one runtime call at
a time on its ECALL connection, and while a call fills or drains a
shared-memory ring, a worker thread moves the ring's slots to or from the
peer, a staging buffer or a file.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Callable
from typing import Any, Final

from .. import _proc
from ..channel import HOLD_WATCHED
from ..core.stream import TAG_SIZE
from ..errors import (
    ConnectionClosedError,
    EnclaveLostError,
    MigSGXError,
    ProtocolError,
    error_from_wire,
)
from ..system.process import tree_pids
from ..wire import recv_frame, send_frame
from .ring import ShmRing
from .ring_handover import send_ring_fds
from .ring_spec import RingPeerGoneError


class EnclaveLink:
    """Runtime calls (``__mig_*``) on an enclave's ECALL connection, one at a time.

    The end (outgoing or incoming) owns the connection outright while it migrates the enclave, so
    requests and replies simply alternate.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._ids = 1 << 40
        self._lock = threading.Lock()
        #: Fault injection (the tool's ``tool.ring-handover``): runs between the
        #: ``__mig_ring`` frame and the descriptors that follow it.
        self.before_ring_fds: Callable[[], None] | None = None

    def call(self, name: str, *args: Any) -> Any:
        from ..channel import ECALL, ECALL_FRAME_MAX

        with self._lock:
            self._ids += 1
            call_id = self._ids
            try:
                send_frame(
                    self.sock,
                    {"t": "ecall", "id": call_id, "fn": name, "args": list(args)},
                    max_size=ECALL_FRAME_MAX,
                )
                while True:
                    msg = recv_frame(self.sock, ECALL, max_size=ECALL_FRAME_MAX)
                    if msg.get("id") in (call_id, 0):
                        break
            except (OSError, ConnectionClosedError) as exc:
                raise EnclaveLostError(f"the enclave went away during {name}") from exc
        if msg["t"] == "err":
            raise error_from_wire(msg["code"], msg["message"])
        if msg["t"] != "ret":
            raise ProtocolError(f"unexpected {msg['t']!r} from the enclave during {name}")
        return msg["value"]

    def give_ring(self, ring: ShmRing) -> None:
        """Hand the enclave its end of ``ring`` (descriptors follow the call frame)."""

        from ..channel import ECALL, ECALL_FRAME_MAX

        with self._lock:
            self._ids += 1
            call_id = self._ids
            send_frame(self.sock, {"t": "ecall", "id": call_id, "fn": "__mig_ring", "args": []})
            if self.before_ring_fds is not None:
                self.before_ring_fds()
            send_ring_fds(self.sock, ring)
            msg = recv_frame(self.sock, ECALL, max_size=ECALL_FRAME_MAX)
        if msg["t"] == "err":
            raise error_from_wire(msg["code"], msg["message"])

    def hold(self, app_pid: int | None = None, nonce: bytes = b"") -> int:
        """Give the enclave a duplicate of our end of this connection (``__mig_hold``).

        From then on our death (and that of every other holder) is no end of
        file for the enclave: it keeps its state until someone takes the
        duplicate back from it (root, ``pidfd_getfd``) or it aborts.  With
        ``app_pid`` (the application's pid here), pidfds of it and of every
        process of its tree that holds this connection too (:func:`holders_of`)
        go along: an enclave that aborted lets the duplicate go once the last of
        them exited (``docs/spec/channels.md`` 7.1).  ``nonce`` names this hold (the
        journal records it; ``__mig_held`` checks it).  Returns the duplicate's
        descriptor number in the enclave process.
        """

        from ..channel import ECALL, ECALL_FRAME_MAX

        fds = [self.sock.fileno()]
        pidfds = []
        for pid in [] if app_pid is None else holders_of(self.sock, app_pid):
            with contextlib.suppress(OSError):  # (gone: the abort ends it with our end)
                pidfds.append(os.pidfd_open(pid))
        fds += pidfds
        try:
            with self._lock:
                self._ids += 1
                call_id = self._ids
                args = [nonce] if nonce else []
                send_frame(self.sock, {"t": "ecall", "id": call_id, "fn": "__mig_hold",
                                       "args": args})  # fmt: skip
                socket.send_fds(self.sock, [b"H"], fds)
                msg = recv_frame(self.sock, ECALL, max_size=ECALL_FRAME_MAX)
        finally:
            for pidfd in pidfds:
                os.close(pidfd)
        if msg["t"] == "err":
            err = error_from_wire(msg["code"], msg["message"])
            # The kind decides what a refusal means (:func:`kept_by_another`): kept
            # where this process knows no class of it (``hold-kept`` is the runtime's).
            err.context["wire_code"] = str(msg["code"])
            raise err
        return int(msg["value"])


#: The kinds of a refused ``__mig_hold`` that mean another party's duplicate of this
#: connection is kept there (the application, or any process holding the connection,
#: sent a hold of its own first): a driver's own hold then cannot be given, and the
#: duplicate the enclave keeps names no nonce of the driver's journal, so ``migsgx
#: recover`` could not take it back.  Any other refusal (an enclave runtime older than
#: the call answers ``unknown-ecall``, or ``enclave-busy`` while quiesced: it took the
#: call for an application's ECALL) keeps nobody's duplicate.
HOLD_KEPT_BY_ANOTHER: Final = frozenset({"hold-kept"})


def refusal_kind(refusal: BaseException) -> str:
    """The kind of a refused call: its code as the enclave sent it (kept by
    :meth:`EnclaveLink.hold` where this process knows no class of that code, which
    then rebuilds the root type), else the error's own code or type."""

    if isinstance(refusal, MigSGXError):
        return str(refusal.context.get("wire_code", refusal.code))
    return type(refusal).__name__


def kept_by_another(refusal: BaseException) -> bool:
    """Whether a refused :meth:`EnclaveLink.hold` means that the enclave keeps a
    duplicate of another party's (:data:`HOLD_KEPT_BY_ANOTHER`): decided by the kind
    (:func:`refusal_kind`), never by the message."""

    return refusal_kind(refusal) in HOLD_KEPT_BY_ANOTHER


def holders_of(sock: socket.socket, app_pid: int) -> list[int]:
    """``app_pid``, then the processes of its tree that hold ``sock``'s socket as well.

    ``sock`` is the application's end of an enclave connection, handed over by
    ``prepare``: a process the application forked before keeps a descriptor of
    the same socket, and may go on using the enclave after ``app_pid`` exited.
    At most :data:`~migsgx.channel.HOLD_WATCHED` in all (the first found).
    """

    link = f"socket:[{os.fstat(sock.fileno()).st_ino}]"
    found = [app_pid]
    for pid in tree_pids(app_pid)[1:]:
        if len(found) >= HOLD_WATCHED:
            break
        if _proc.holds(pid, link):
            found.append(pid)
    return found


class _Worker:
    """A thread whose exception is re-raised by :meth:`join`.

    On failure it closes ``ring``, so that the enclave at the ring's other end
    sees the doorbell go dead at once instead of waiting for a slot.
    """

    def __init__(self, target: Callable[[], Any], name: str, ring: ShmRing) -> None:
        self.error: BaseException | None = None
        self._target = target
        self._ring = ring
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._target()
        except BaseException as exc:
            self.error = exc
            with contextlib.suppress(Exception):
                self._ring.close()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)
        if self.error is not None:
            raise self.error


def _call_beside(link: EnclaveLink, worker: _Worker, name: str, *args: Any) -> Any:
    """A runtime call while ``worker`` moves the ring's slots.

    A failing worker closes the ring, so the enclave then fails too, with "the
    ring's peer is gone": then the worker's own error is the cause to report.
    (If the enclave itself is gone, that is the cause.)  A worker that failed only
    because the enclave shut its ring end (the enclave refused the stream) is
    not: the enclave's own error is.
    """

    try:
        return link.call(name, *args)
    except EnclaveLostError:
        raise
    except MigSGXError as exc:
        if isinstance(worker.error, MigSGXError) and not isinstance(
            worker.error, RingPeerGoneError
        ):
            raise worker.error from exc
        raise


def _slot_size(chunk_size: int) -> int:
    return chunk_size + TAG_SIZE


RING_TIMEOUT = 120.0
