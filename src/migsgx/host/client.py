"""The untrusted runtime: how an application creates enclaves and calls them.

``EnclaveClient.launch(image_dir)`` sends the image to the host's platform
service, which verifies it and starts the enclave process; the returned client
then carries ECALLs (many threads may call at once: each call has an id, one
reader thread routes replies) and answers the enclave's OCALLs with the
handlers the application registered.  Errors raised in the enclave arrive as
the same typed :mod:`migsgx.errors` exceptions.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import queue
import select
import socket
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import _proc
from ..channel import ECALL, ECALL_FRAME_MAX, IMAGE_FRAME_MAX
from ..errors import (
    ConfigError,
    ConnectionClosedError,
    EnclaveBusyError,
    EnclaveLostError,
    FrameError,
    MigSGXError,
    error_from_wire,
)
from ..wire import recv_frame, send_frame

if TYPE_CHECKING:  # (loaded by a launch: what only talks to running enclaves, or hands
    # their connections around, need not load image signing)
    from ..sgx.image import EnclaveImage

PLATFORM_SOCKET_ENV = "MIGSGX_PLATFORM_SOCKET"


@dataclass(frozen=True)
class EnclaveInfo:
    pid: int
    mr_enclave: bytes
    mr_signer: bytes
    isv_prod_id: int
    isv_svn: int
    debug: bool
    memory_size: int
    thread_slots: int
    ecalls: tuple[str, ...]


def platform_socket(path: str | Path | None = None) -> Path:
    if path is not None:
        return Path(path)
    env = os.environ.get(PLATFORM_SOCKET_ENV)
    if not env:
        raise ConfigError(
            f"no platform socket given and ${PLATFORM_SOCKET_ENV} is not set "
            "(start one with `migsgx platform serve --state DIR`)"
        )
    return Path(env)


class _Ecalls:
    def __init__(self, client: EnclaveClient) -> None:
        self._client = client

    def __getattr__(self, name: str) -> Callable[..., Any]:
        if name.startswith("_"):
            raise AttributeError(name)

        def call(*args: Any, timeout: float | None = None) -> Any:
            return self._client.call(name, *args, timeout=timeout)

        return call


class EnclaveClient:
    """The application's handle on one enclave.

    For migration, :meth:`detach` quiesces the handle (new ECALLs wait, ECALLs
    in flight finish) and gives up the enclave's connection so that a
    migration driver can take it and the application holds nothing that CRIU
    would have to dump; :meth:`reattach` gives the handle a connection again
    (the same one after an abort, the destination enclave's after a
    migration) and the waiting callers carry on.
    """

    def __init__(
        self,
        sock: socket.socket,
        info: EnclaveInfo,
        ocalls: Mapping[str, Callable[..., Any]] | None = None,
        *,
        image_files: Mapping[str, bytes] | None = None,
    ) -> None:
        self._sock: socket.socket | None = sock
        self.info = info
        self.image_files = dict(image_files or {})
        self._ocalls = dict(ocalls or {})
        self._ids = itertools.count(1)
        self._pending: dict[int, queue.Queue[dict[str, Any]]] = {}
        self._cond = threading.Condition()
        self._send_lock = threading.Lock()
        self._closed: MigSGXError | None = None
        self._admitting = True
        self.ecall = _Ecalls(self)
        #: Wakes the reader to stop it (:meth:`destroy`) without touching the socket.
        self._wake: int | None = None
        self._reader = self._start_reader(sock)

    def _start_reader(self, sock: socket.socket) -> threading.Thread:
        self._wake = os.eventfd(0, os.EFD_CLOEXEC)
        reader = threading.Thread(
            target=self._read_loop,
            args=(sock, self._wake),
            name="migsgx-ecall-reader",
            daemon=True,
        )
        reader.start()
        return reader

    def _drop_wake(self) -> None:
        wake, self._wake = self._wake, None
        if wake is not None:
            with contextlib.suppress(OSError):
                os.close(wake)

    # --- creation ----------------------------------------------------------------
    @classmethod
    def launch(
        cls,
        image: str | Path | EnclaveImage,
        *,
        socket_path: str | Path | None = None,
        ocalls: Mapping[str, Callable[..., Any]] | None = None,
        timeout: float = 30.0,
    ) -> EnclaveClient:
        from ..sgx.image import EnclaveImage

        img = image if isinstance(image, EnclaveImage) else EnclaveImage.load(Path(image))
        sock, info = launch_enclave(img, socket_path=socket_path, timeout=timeout)
        return cls(sock, info, ocalls, image_files=img.files)

    # --- calls -------------------------------------------------------------------
    def call(self, name: str, *args: Any, timeout: float | None = None) -> Any:
        call_id = next(self._ids)
        box: queue.Queue[dict[str, Any]] = queue.Queue()
        with self._cond:
            # While the enclave migrates, callers wait here and carry on afterwards.
            while not self._admitting and self._closed is None:
                self._cond.wait()
            if self._closed is not None:
                raise self._closed
            self._pending[call_id] = box
        try:
            self._send({"t": "ecall", "id": call_id, "fn": name, "args": list(args)})
            while True:
                try:
                    msg = box.get(timeout=timeout)
                except queue.Empty:
                    raise EnclaveLostError(f"ECALL {name} got no answer in {timeout} s") from None
                kind = msg["t"]
                if kind == "ret":
                    return msg["value"]
                if kind == "err":
                    raise error_from_wire(msg["code"], msg["message"])
                if kind == "ocall":
                    self._answer_ocall(msg)
        finally:
            with self._cond:
                self._pending.pop(call_id, None)
                self._cond.notify_all()

    def _answer_ocall(self, msg: dict[str, Any]) -> None:
        handler = self._ocalls.get(msg["fn"])
        reply: dict[str, Any] = {"t": "oret", "id": msg["id"], "ok": True, "value": None}
        if handler is None:
            reply.update(
                ok=False, code="error", message=f"the application has no OCALL {msg['fn']!r}"
            )
        else:
            try:
                reply["value"] = handler(*msg["args"])
            except MigSGXError as exc:
                reply.update(ok=False, code=exc.code, message=exc.message)
            except Exception as exc:
                reply.update(ok=False, code="error", message=f"OCALL failed: {exc!r}")
        try:
            self._send(reply)
        except FrameError:
            self._send(
                {
                    "t": "oret",
                    "id": msg["id"],
                    "ok": False,
                    "value": None,
                    "code": "error",
                    "message": f"OCALL {msg['fn']} returned no plain data",
                }
            )

    def _send(self, msg: dict[str, Any]) -> None:
        sock = self._sock
        if sock is None:
            raise EnclaveLostError("the enclave connection is detached")
        try:
            with self._send_lock:
                send_frame(sock, msg, max_size=ECALL_FRAME_MAX)
        except OSError as exc:
            raise EnclaveLostError("the enclave is gone") from exc

    def _read_loop(self, sock: socket.socket, wake: int) -> None:
        reason: MigSGXError
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        poller.register(wake, select.POLLIN)
        while True:
            if any(fd == wake for fd, _ in poller.poll()):
                # Destroyed: this reader stops between frames, and reads nothing more
                # that another holder of the connection may be waiting for.
                reason = EnclaveLostError("the enclave was destroyed")
                break
            try:
                msg = recv_frame(sock, ECALL, max_size=ECALL_FRAME_MAX)
            except ConnectionClosedError:
                reason = EnclaveLostError("the enclave closed its channel")
                break
            except MigSGXError as exc:
                reason = exc
                break
            except OSError as exc:
                reason = EnclaveLostError(f"the enclave channel broke: {exc}")
                break
            if msg["t"] == "detached":
                return  # the connection is quiet and about to change hands
            with self._cond:
                box = self._pending.get(msg.get("id", -1))
            if box is not None:
                box.put(msg)
            elif msg["t"] == "err" and msg["id"] == 0:
                reason = error_from_wire(msg["code"], msg["message"])
                break
        with self._cond:
            if self._sock is not sock:
                return
            self._closed = reason
            boxes = list(self._pending.values())
            self._cond.notify_all()
        for box in boxes:
            box.put({"t": "err", "id": 0, "code": reason.code, "message": reason.message})

    # --- migration -------------------------------------------------------------------
    def open_side_channel(self, timeout: float | None = 30.0) -> socket.socket:
        """A second connection to the enclave for a live migration's pre-copy rounds.

        ECALLs go on over this handle while a migration tool drives the rounds
        over the returned socket (``enclave/sidechannel.py``); the enclave
        serves only migration calls on it.
        """

        call_id = next(self._ids)
        box: queue.Queue[dict[str, Any]] = queue.Queue()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        with self._cond:
            if self._closed is not None:
                raise self._closed
            self._pending[call_id] = box
        try:
            sock = self._sock
            if sock is None:
                raise EnclaveLostError("the enclave connection is detached")
            try:
                with self._send_lock:
                    send_frame(
                        sock,
                        {"t": "ecall", "id": call_id, "fn": "__mig_side", "args": []},
                        max_size=ECALL_FRAME_MAX,
                    )
                    socket.send_fds(sock, [b"S"], [theirs.fileno()])
            except OSError as exc:
                raise EnclaveLostError("the enclave is gone") from exc
            try:
                msg = box.get(timeout=timeout)
            except queue.Empty:
                raise EnclaveLostError("the enclave did not take the side channel") from None
            if msg["t"] == "err":
                raise error_from_wire(msg["code"], msg["message"])
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
            with self._cond:
                self._pending.pop(call_id, None)
                self._cond.notify_all()
        return ours

    def detach(self, timeout: float | None = 30.0) -> socket.socket:
        """Quiesce and give up the enclave connection (see the class docstring)."""

        with self._cond:
            if self._closed is not None:
                raise self._closed
            if self._sock is None:
                raise EnclaveBusyError("the enclave is already detached")
            self._admitting = False
            if not self._cond.wait_for(lambda: not self._pending, timeout):
                self._admitting = True
                self._cond.notify_all()
                raise EnclaveBusyError(f"ECALLs still running after {timeout} s; not detached")
        self._send({"t": "detach"})
        self._reader.join(timeout)
        if self._reader.is_alive():
            raise EnclaveLostError("the enclave did not acknowledge the detach")
        with self._cond:
            sock, self._sock = self._sock, None
            self._drop_wake()
        assert sock is not None
        return sock

    def reattach(self, sock: socket.socket) -> None:
        """Carry on over ``sock``: the old connection, or the migrated enclave's."""

        with self._cond:
            if self._sock is not None:
                raise EnclaveBusyError("the enclave is attached already")
            self._sock = sock
            self._closed = None
            self._reader = self._start_reader(sock)
            self._admitting = True
            self._cond.notify_all()

    @property
    def detached(self) -> bool:
        with self._cond:
            return self._sock is None

    # --- teardown ------------------------------------------------------------------
    def destroy(self) -> None:
        """Destroy the enclave (its memory is wiped) and close this handle's descriptor.

        Only this descriptor: no ``shutdown``, which acts on the socket itself and
        so on every duplicate of it, the one the enclave holds while a migration
        keeps its state (``__mig_hold``) too, and would end a frozen or committed
        enclave at end of file.  Such an enclave reads the ``destroy``, keeps its
        state and serves on (``docs/spec/channels.md`` 4.5); any other wipes
        itself and exits.
        """

        with self._cond:
            sock = self._sock
            already = self._closed is not None
            self._closed = self._closed or EnclaveLostError("the enclave was destroyed")
            wake = self._wake
            self._cond.notify_all()
        if sock is None:
            return
        if not already:
            try:
                with self._send_lock:
                    send_frame(sock, {"t": "destroy"})
            except OSError:
                pass
        if wake is not None:
            with contextlib.suppress(OSError):
                os.eventfd_write(wake, 1)
        self._reader.join(timeout=5)
        sock.close()
        with self._cond:
            self._drop_wake()

    def __enter__(self) -> EnclaveClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.destroy()


def _listener_pid(sock: socket.socket) -> int:
    """The pid of the service that listens (``SO_PEERCRED``: the last to call
    ``listen``); 0 when it is outside this pid namespace (a container)."""

    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
    except OSError:
        return 0
    return int.from_bytes(creds[:4], "little")


def launch_enclave(
    image: EnclaveImage, *, socket_path: str | Path | None = None, timeout: float = 30.0
) -> tuple[socket.socket, EnclaveInfo]:
    """Ask the platform service to launch ``image``; return its connection and identity."""

    path = platform_socket(socket_path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot reach the platform service at {path}: {exc}") from exc
    owner = _listener_pid(sock)
    if owner > 0 and not _proc.alive(owner):
        sock.close()
        raise ConfigError(
            f"no platform service runs at {path}: the one that listened there (pid {owner})"
            " is gone; its socket is kept for a restarted one"
        )
    try:
        sock.settimeout(timeout)
        send_frame(sock, {"t": "launch", "files": dict(image.files)}, max_size=IMAGE_FRAME_MAX)
        first = recv_frame(sock, ECALL, max_size=ECALL_FRAME_MAX)
        sock.settimeout(None)
    except ConnectionClosedError as exc:
        sock.close()
        raise EnclaveLostError("the platform closed the connection during launch") from exc
    except TimeoutError as exc:
        sock.close()
        raise EnclaveLostError(f"the enclave did not start within {timeout} s") from exc
    except BaseException:
        sock.close()
        raise
    if first["t"] == "err":
        sock.close()
        raise error_from_wire(first["code"], first["message"])
    if first["t"] != "ready":
        sock.close()
        raise EnclaveLostError(f"unexpected first message {first['t']!r} from the enclave")
    info = EnclaveInfo(
        pid=first["pid"],
        mr_enclave=first["mr_enclave"],
        mr_signer=first["mr_signer"],
        isv_prod_id=first["isv_prod_id"],
        isv_svn=first["isv_svn"],
        debug=first["debug"],
        memory_size=first["memory_size"],
        thread_slots=first["thread_slots"],
        ecalls=tuple(first["ecalls"]),
    )
    return sock, info
