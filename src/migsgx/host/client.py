"""The untrusted runtime: how an application creates enclaves and calls them.

``EnclaveClient.launch(image_dir)`` sends the image to the host's platform
service, which verifies it and starts the enclave process; the returned client
then carries ECALLs (many threads may call at once: each call has an id, one
reader thread routes replies) and answers the enclave's OCALLs with the
handlers the application registered.  Errors raised in the enclave arrive as
the same typed :mod:`migsgx.errors` exceptions.
"""

from __future__ import annotations

import itertools
import os
import queue
import socket
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..channel import ECALL, ECALL_FRAME_MAX, IMAGE_FRAME_MAX
from ..errors import (
    ConfigError,
    ConnectionClosedError,
    EnclaveLostError,
    MigSGXError,
    error_from_wire,
)
from ..sgx.image import EnclaveImage
from ..wire import recv_frame, send_frame

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
    def __init__(
        self,
        sock: socket.socket,
        info: EnclaveInfo,
        ocalls: Mapping[str, Callable[..., Any]] | None = None,
    ) -> None:
        self._sock = sock
        self.info = info
        self._ocalls = dict(ocalls or {})
        self._ids = itertools.count(1)
        self._pending: dict[int, queue.Queue[dict[str, Any]]] = {}
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._closed: MigSGXError | None = None
        self.ecall = _Ecalls(self)
        self._reader = threading.Thread(
            target=self._read_loop, name="migsgx-ecall-reader", daemon=True
        )
        self._reader.start()

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
        img = image if isinstance(image, EnclaveImage) else EnclaveImage.load(Path(image))
        path = platform_socket(socket_path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(path))
        except OSError as exc:
            sock.close()
            raise ConfigError(f"cannot reach the platform service at {path}: {exc}") from exc
        try:
            sock.settimeout(timeout)
            send_frame(sock, {"t": "launch", "files": dict(img.files)}, max_size=IMAGE_FRAME_MAX)
            first = recv_frame(sock, ECALL, max_size=ECALL_FRAME_MAX)
            sock.settimeout(None)
        except ConnectionClosedError as exc:
            sock.close()
            raise EnclaveLostError("the platform closed the connection during launch") from exc
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
        return cls(sock, info, ocalls)

    # --- calls -------------------------------------------------------------------
    def call(self, name: str, *args: Any, timeout: float | None = None) -> Any:
        call_id = next(self._ids)
        box: queue.Queue[dict[str, Any]] = queue.Queue()
        with self._lock:
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
            with self._lock:
                self._pending.pop(call_id, None)

    def _answer_ocall(self, msg: dict[str, Any]) -> None:
        handler = self._ocalls.get(msg["fn"])
        reply: dict[str, Any] = {"t": "oret", "id": msg["id"], "ok": True, "value": None}
        if handler is None:
            reply.update(ok=False, code="unknown-ecall", message=f"no OCALL {msg['fn']!r}")
        else:
            try:
                reply["value"] = handler(*msg["args"])
            except MigSGXError as exc:
                reply.update(ok=False, code=exc.code, message=exc.message)
            except Exception as exc:
                reply.update(ok=False, code="error", message=f"OCALL failed: {exc!r}")
        self._send(reply)

    def _send(self, msg: dict[str, Any]) -> None:
        try:
            with self._send_lock:
                send_frame(self._sock, msg, max_size=ECALL_FRAME_MAX)
        except OSError as exc:
            raise EnclaveLostError("the enclave is gone") from exc

    def _read_loop(self) -> None:
        reason: MigSGXError
        while True:
            try:
                msg = recv_frame(self._sock, ECALL, max_size=ECALL_FRAME_MAX)
            except ConnectionClosedError:
                reason = EnclaveLostError("the enclave closed its channel")
                break
            except MigSGXError as exc:
                reason = exc
                break
            except OSError as exc:
                reason = EnclaveLostError(f"the enclave channel broke: {exc}")
                break
            with self._lock:
                box = self._pending.get(msg.get("id", -1))
            if box is not None:
                box.put(msg)
            elif msg["t"] == "err" and msg["id"] == 0:
                reason = error_from_wire(msg["code"], msg["message"])
                break
        with self._lock:
            self._closed = reason
            boxes = list(self._pending.values())
        for box in boxes:
            box.put({"t": "err", "id": 0, "code": reason.code, "message": reason.message})

    # --- teardown ------------------------------------------------------------------
    def destroy(self) -> None:
        """Destroy the enclave (its memory is wiped) and close the channel."""

        with self._lock:
            already = self._closed is not None
        if not already:
            try:
                self._send({"t": "destroy"})
            except EnclaveLostError:
                pass
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        self._reader.join(timeout=5)

    def __enter__(self) -> EnclaveClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.destroy()
