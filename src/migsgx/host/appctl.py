"""The application's side of a migration: hand its enclave connections over and back.

An application opts in with :func:`enable_migration`; its untrusted runtime
then listens on an *abstract* Unix socket, ``\\0migsgx-app-<pid>-<token>``.
Abstract sockets live in the network namespace and need no file, so CRIU
dumps the listener with the process and restores it into the destination's
namespace, where the agent finds it again
(:func:`migsgx.agent.applink.find_control`).  Only
root or the application's own user may connect (``SO_PEERCRED``).  The
caller's side (the agent's) is :mod:`migsgx.agent.applink`.

One request per connection; the application answers and closes its end
first, so that once the caller has seen end-of-file the application holds no
connection to anything outside itself (what CRIU requires).  Requests:

``prepare``
    Detach every registered :class:`~migsgx.host.client.EnclaveClient` (new
    ECALLs wait, ECALLs in flight finish) and pass each enclave connection to
    the caller with ``SCM_RIGHTS``, with the enclave's identity and image.
``resume``
    The migration was aborted: the same connections come back, ECALLs go on;
    each enclave is then told to let the duplicate it held go (``__mig_unhold``:
    our end of file ends it again).
``attach``
    After the restore on the destination: the destination enclaves'
    connections come in, in the same order, and ECALLs go on there.
``status``
    How many enclaves, and whether they are handed over.

Messages are :mod:`migsgx.wire` frames checked against :data:`APPCTL`
(:mod:`.appctl_wire`: the schema, frames with descriptors, the enclave info).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, Final

from ..errors import MigSGXError, register_error
from .appctl_wire import (
    APPCTL,
    APPCTL_FRAME_MAX,
    check_image_files,
    close_fds,
    info_from_wire,
    info_to_wire,
    recv_frame_fds,
    send_frame_fds,
)
from .client import EnclaveClient, EnclaveInfo

__all__ = [
    "APPCTL",
    "CONTROL_PREFIX",
    "AppControlError",
    "MigrationControl",
    "check_image_files",
    "close_fds",
    "enable_migration",
    "info_from_wire",
    "info_to_wire",
]

CONTROL_PREFIX: Final = "migsgx-app-"
REQUEST_TIMEOUT: Final = 60.0
#: How long ``resume`` (and ``attach``) waits for each enclave to let its duplicate go
#: (``__mig_unhold``).
UNHOLD_TIMEOUT: Final = 5.0

#: A test reaches the application inside ``resume`` here, its connections taken back
#: and no ``__mig_unhold`` sent: ``MIGSGX_FAULT=app.resume-taken:wait-file=PATH``
#: (held there), or ``...:no-unhold`` (answers without it, as a runtime older than
#: that call).  The agent's fault syntax (:mod:`migsgx.agent.faults`), read here:
#: this layer imports nothing above it.
_RESUME_POINT: Final = "app.resume-taken"
_RESUME_WAIT: Final = 120.0


@register_error
class AppControlError(MigSGXError):
    """The application's migration control refused or failed a request."""

    code = "appctl"


def _resume_fault() -> str | None:
    for item in os.environ.get("MIGSGX_FAULT", "").split(","):
        point, _, action = item.strip().partition(":")
        if point != _RESUME_POINT:
            continue
        sys.stderr.write(f"migsgx fault: {point}:{action} at {time.monotonic():.6f}\n")
        sys.stderr.flush()
        if action.startswith("wait-file="):
            path = action.partition("=")[2]
            deadline = time.monotonic() + _RESUME_WAIT
            while not os.path.exists(path) and time.monotonic() < deadline:
                time.sleep(0.02)
        return action
    return None


def _peer_allowed(conn: socket.socket) -> bool:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid in (0, os.getuid())


# --- the application's side ---------------------------------------------------------------
class MigrationControl:
    """The listener in the application; one request at a time."""

    def __init__(self, clients: Iterable[EnclaveClient] = (), *, name: str | None = None) -> None:
        self._clients: list[EnclaveClient] = list(clients)
        self._handed: list[EnclaveClient] | None = None
        self._lock = threading.Lock()
        self.name = name or f"{CONTROL_PREFIX}{os.getpid()}-{secrets.token_hex(8)}"
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._handlers: dict[
            str, Callable[[dict[str, Any], list[int]], tuple[dict[str, Any], list[socket.socket]]]
        ] = {
            "prepare": self._prepare,
            "side": self._side,
            "resume": self._resume,
            "attach": self._attach,
            "status": self._status,
        }

    # --- registration ---------------------------------------------------------------------
    def add(self, client: EnclaveClient) -> EnclaveClient:
        with self._lock:
            if self._handed is not None:
                raise AppControlError("cannot add an enclave while a migration is under way")
            self._clients.append(client)
        return client

    def remove(self, client: EnclaveClient) -> None:
        with self._lock:
            if self._handed is not None:
                raise AppControlError("cannot remove an enclave while a migration is under way")
            self._clients.remove(client)

    @property
    def clients(self) -> list[EnclaveClient]:
        with self._lock:
            return list(self._clients)

    # --- lifetime -------------------------------------------------------------------------
    def start(self) -> MigrationControl:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind("\0" + self.name)
            sock.listen(4)
        except OSError as exc:
            sock.close()
            raise AppControlError(f"cannot listen on @{self.name}: {exc}") from exc
        self._listener = sock
        self._thread = threading.Thread(target=self._serve, name="migsgx-appctl", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _serve(self) -> None:
        while True:
            listener = self._listener
            if listener is None:
                return
            try:
                conn, _ = listener.accept()
            except OSError:
                if self._listener is None:
                    return
                continue
            with conn:
                if _peer_allowed(conn):
                    self._handle(conn)

    def _handle(self, conn: socket.socket) -> None:
        conn.settimeout(REQUEST_TIMEOUT)
        try:
            msg, fds = recv_frame_fds(conn, APPCTL, max_size=APPCTL_FRAME_MAX)
        except (MigSGXError, OSError):
            return
        handler = self._handlers.get(msg["t"])
        out: list[socket.socket] = []
        try:
            if handler is None:
                raise AppControlError(f"{msg['t']!r} is not a request")
            with self._lock:
                reply, out = handler(msg, fds)
        except MigSGXError as exc:
            reply = {"t": "err", "code": exc.code, "message": exc.message}
        finally:
            close_fds(fds)  # handlers dup what they keep
        try:
            send_frame_fds(conn, reply, [s.fileno() for s in out], max_size=APPCTL_FRAME_MAX)
        except (MigSGXError, OSError):
            if out:
                # The caller never got the connections: keep running with them here.
                with self._lock:
                    self._take_back(out)
            return
        for sock in out:
            sock.close()

    # --- requests -------------------------------------------------------------------------
    def _prepare(
        self, msg: dict[str, Any], fds: list[int]
    ) -> tuple[dict[str, Any], list[socket.socket]]:
        if self._handed is not None:
            raise AppControlError("the enclaves are handed over already")
        timeout = float(msg["timeout"])
        detached: list[tuple[EnclaveClient, socket.socket]] = []
        try:
            for client in self._clients:
                detached.append((client, client.detach(timeout)))
        except BaseException:
            for client, sock in detached:
                client.reattach(sock)
            raise
        self._handed = [client for client, _ in detached]
        enclaves = [
            {"info": info_to_wire(c.info), "image_files": dict(c.image_files)} for c, _ in detached
        ]
        return {"t": "prepared", "enclaves": enclaves}, [sock for _, sock in detached]

    def _side(
        self, msg: dict[str, Any], fds: list[int]
    ) -> tuple[dict[str, Any], list[socket.socket]]:
        """Live migration: a side channel to each enclave for the pre-copy rounds.

        Nothing is handed over: the application keeps calling its enclaves.
        ``prepare`` later hands over the connections in the same order.
        """

        if self._handed is not None:
            raise AppControlError("the enclaves are handed over already")
        opened: list[socket.socket] = []
        try:
            for client in self._clients:
                opened.append(client.open_side_channel())
        except BaseException:
            for sock in opened:
                sock.close()
            raise
        enclaves = [
            {"info": info_to_wire(c.info), "image_files": dict(c.image_files)}
            for c in self._clients
        ]
        return {"t": "prepared", "enclaves": enclaves}, opened

    def _take_back(self, socks: list[socket.socket]) -> None:
        handed, self._handed = self._handed or [], None
        for client, sock in zip(handed, socks, strict=True):
            client.reattach(sock)

    def _adopt(self, fds: list[int]) -> list[socket.socket]:
        if self._handed is None:
            raise AppControlError("no enclaves are handed over")
        if len(fds) != len(self._handed):
            raise AppControlError(
                f"expected {len(self._handed)} enclave connections, got {len(fds)}"
            )
        return [socket.socket(fileno=os.dup(fd)) for fd in fds]

    def _resume(
        self, msg: dict[str, Any], fds: list[int]
    ) -> tuple[dict[str, Any], list[socket.socket]]:
        socks = self._adopt(fds)
        count = len(socks)
        handed = self._handed or []
        self._take_back(socks)
        if _resume_fault() == "no-unhold":
            return {"t": "ok", "enclaves": count}, []  # as a runtime older than __mig_unhold
        for client in handed:
            # After an abort each enclave kept the driver's duplicate of this
            # connection, so that no party's death between its abort and now
            # could end it with the state (``__mig_hold``): the connection is
            # ours again, and our end of file ends it once more.
            with contextlib.suppress(MigSGXError):
                client.call("__mig_unhold", timeout=UNHOLD_TIMEOUT)
        return {"t": "ok", "enclaves": count}, []

    def _attach(
        self, msg: dict[str, Any], fds: list[int]
    ) -> tuple[dict[str, Any], list[socket.socket]]:
        if self._handed is not None and len(msg["enclaves"]) != len(self._handed):
            raise AppControlError("one enclave info per connection is needed")
        infos = [EnclaveInfo(**info_from_wire(item)) for item in msg["enclaves"]]
        socks = self._adopt(fds)
        handed = self._handed or []
        self._take_back(socks)
        for client, info in zip(handed, infos, strict=True):
            client.info = info
            # A restore's enclave kept its driver's duplicate of this connection
            # from its activation on (``__mig_hold``): the connection is ours now,
            # and our end of file ends it again.  (One that holds none: no change.)
            with contextlib.suppress(MigSGXError):
                client.call("__mig_unhold", timeout=UNHOLD_TIMEOUT)
        return {"t": "ok", "enclaves": len(socks)}, []

    def _status(
        self, msg: dict[str, Any], fds: list[int]
    ) -> tuple[dict[str, Any], list[socket.socket]]:
        return {
            "t": "state",
            "pid": os.getpid(),
            "enclaves": len(self._clients),
            "handed_over": self._handed is not None,
        }, []


_active: MigrationControl | None = None
_active_lock = threading.Lock()


def enable_migration(clients: Iterable[EnclaveClient] = ()) -> MigrationControl:
    """Start (once per process) the migration control with these enclave clients.

    A second call adds the clients to the running control.
    """

    global _active
    with _active_lock:
        if _active is None:
            _active = MigrationControl(clients).start()
        else:
            for client in clients:
                _active.add(client)
        return _active
