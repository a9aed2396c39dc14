"""The platform service of one host: ``migsgx platform serve``.

It plays the parts that, on real SGX, the CPU, the driver (``/dev/sgx_enclave``)
and the architectural enclaves (AESM: quoting, counters) play.  Applications
connect to its Unix socket (bind-mountable into containers, like the AESM
socket), send an enclave image, and after EINIT succeeds get their connection
handed to a new enclave process that the service started.  Enclave processes
are children of the service, never of the application, so CRIU never dumps
enclave memory with the application.  Each enclave gets a private channel
back to the service, bound to the identity the service measured.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization

from ..channel import IMAGE_FRAME_MAX, LAUNCH, PLATFORM
from ..errors import ConnectionClosedError, LaunchError, MigSGXError, ProtocolError
from ..wire import recv_frame, send_frame
from .counters import RecordUpdate
from .image import EnclaveImage
from .platform import EmulatedPlatform, LocalServices
from .structs import KeyRequest, ReportBody, TargetInfo

SOCKET_NAME = "enclave.sock"
LAUNCH_TIMEOUT = 30.0


def default_socket(state_dir: Path) -> Path:
    return Path(state_dir) / SOCKET_NAME


@dataclass
class EnclaveRecord:
    pid: int
    name: str
    identity: ReportBody
    process: subprocess.Popen[bytes] | None  # None: launched by an earlier service, reattached
    started: float = field(default_factory=time.time)


class PlatformService:
    def __init__(
        self,
        platform: EmulatedPlatform,
        socket_path: Path | None = None,
        *,
        allowed_signers: set[bytes] | None = None,
        allow_debug: bool = True,
        log_dir: Path | None = None,
        warm_spare: bool = False,
    ) -> None:
        self.platform = platform
        self.socket_path = Path(socket_path or default_socket(platform.state_dir))
        self.allowed_signers = allowed_signers
        self.allow_debug = allow_debug
        self.log_dir = Path(log_dir or platform.state_dir / "logs")
        self.enclaves: dict[int, EnclaveRecord] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._listener: socket.socket | None = None
        self.warm_spare = warm_spare
        self._spare: tuple[subprocess.Popen[bytes], socket.socket] | None = None
        self._spare_lock = threading.Lock()
        self._reattach: socket.socket | None = None

    # --- lifecycle -------------------------------------------------------------
    def bind(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(self.socket_path))
        # Any local application may ask for an enclave, as with /dev/sgx_enclave.
        os.chmod(self.socket_path, 0o666)  # noqa: S103
        sock.listen(64)
        self._listener = sock
        self._bind_reattach()
        self._refill_spare()

    def serve_forever(self) -> None:
        if self._listener is None:
            self.bind()
        assert self._listener is not None
        self._listener.settimeout(0.2)
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                self._reap()
                continue
            except OSError:
                if self._stop.is_set():
                    break
                raise
            conn.settimeout(LAUNCH_TIMEOUT)  # a client that never sends must not hold a thread
            threading.Thread(target=self._handle_launch, args=(conn,), daemon=True).start()

    def shutdown(self, *, kill_enclaves: bool = True) -> None:
        self._stop.set()
        if self._listener is not None:
            self._listener.close()
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        spare = self._take_spare()
        if spare is not None:
            spare[1].close()
            spare[0].kill()
            spare[0].wait()
        if self._reattach is not None:
            self._reattach.close()
        if kill_enclaves:
            with self._lock:
                records = [r for r in self.enclaves.values() if r.process is not None]
            for rec in records:
                assert rec.process is not None
                with contextlib.suppress(ProcessLookupError):
                    rec.process.send_signal(signal.SIGTERM)
            for rec in records:
                assert rec.process is not None
                try:
                    rec.process.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    rec.process.kill()
                    rec.process.wait()

    def _reap(self) -> None:
        with self._lock:
            for pid, rec in list(self.enclaves.items()):
                if rec.process is not None and rec.process.poll() is not None:
                    del self.enclaves[pid]

    # --- launch ----------------------------------------------------------------
    def _handle_launch(self, conn: socket.socket) -> None:
        try:
            msg = recv_frame(conn, LAUNCH, max_size=IMAGE_FRAME_MAX)
            if msg["t"] != "launch":
                raise ProtocolError("expected a launch request")
            self.launch(conn, msg["files"])
        except ConnectionClosedError:
            pass
        except MigSGXError as exc:
            with contextlib.suppress(OSError):
                send_frame(conn, {"t": "err", "id": 0, "code": exc.code, "message": exc.message})
        except OSError:
            pass
        except Exception as exc:
            # A bug here must not pass silently: the application gets a typed error.
            with contextlib.suppress(OSError):
                err = LaunchError(
                    f"the platform failed to launch the enclave: {type(exc).__name__}"
                )
                send_frame(conn, {"t": "err", "id": 0, "code": err.code, "message": err.message})
        finally:
            conn.close()

    def launch(self, conn: socket.socket, files: dict[Any, Any]) -> EnclaveRecord:
        if not all(isinstance(k, str) and isinstance(v, bytes) for k, v in files.items()):
            raise LaunchError("image files must map names to bytes")
        image = EnclaveImage.from_files(files)
        identity, _sig = self.platform.einit(image)
        if self.allowed_signers is not None and identity.mr_signer not in self.allowed_signers:
            raise LaunchError(
                f"launch control: MRSIGNER {identity.mr_signer.hex()} is not allowed on this host"
            )
        if identity.attributes.debug and not self.allow_debug:
            raise LaunchError("launch control: debug enclaves are not allowed on this host")
        conn.settimeout(None)
        init = {"t": "init", "files": dict(image.files), "identity": identity.pack()}
        spare = self._take_spare()
        if spare is not None:
            proc, ours = spare
            send_frame(ours, init, max_size=IMAGE_FRAME_MAX)
            socket.send_fds(ours, [b"A"], [conn.fileno()])
        else:
            proc, ours = self._start_runtime(f"enclave-{image.manifest.name}.log", conn)
            send_frame(ours, init, max_size=IMAGE_FRAME_MAX)
        # How the enclave finds this platform again if the service restarts.
        ticket = self.platform.reattach_ticket(identity)
        send_frame(ours, {"t": "ticket", "name": self.reattach_name, "ticket": ticket})
        self._refill_spare()
        rec = EnclaveRecord(proc.pid, image.manifest.name, identity, proc)
        with self._lock:
            self.enclaves[proc.pid] = rec
        threading.Thread(
            target=self._serve_enclave,
            args=(ours, self.platform.services_for(identity), rec),
            daemon=True,
        ).start()
        return rec

    # --- reattach: enclaves of an earlier service -------------------------------------
    @property
    def reattach_name(self) -> str:
        """The abstract socket where enclaves find this host's platform again.

        Enclave processes cannot see the state directory (it is hidden from
        them), but they share the service's network namespace.
        """

        digest = hashlib.sha256(str(self.platform.state_dir.resolve()).encode()).hexdigest()
        return f"migsgx-platform-{digest[:32]}"

    def _bind_reattach(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind("\0" + self.reattach_name)
        except OSError:
            sock.close()  # another service of this state runs: it serves the reattach
            return
        sock.listen(16)
        self._reattach = sock
        threading.Thread(target=self._accept_reattach, name="migsgx-reattach", daemon=True).start()

    def _accept_reattach(self) -> None:
        assert self._reattach is not None
        while not self._stop.is_set():
            try:
                conn, _ = self._reattach.accept()
            except OSError:
                return
            conn.settimeout(LAUNCH_TIMEOUT)
            threading.Thread(target=self._reattach_one, args=(conn,), daemon=True).start()

    def _reattach_one(self, conn: socket.socket) -> None:
        """An enclave process of an earlier service: bound again to the identity its
        ticket names (a MAC only this platform makes), never to one it claims."""

        try:
            msg = recv_frame(conn, PLATFORM)
            if msg["t"] != "reattach":
                raise ProtocolError("expected a reattach request")
            identity = self.platform.reattach_identity(msg["identity"], msg["ticket"])
            if identity is None:
                raise LaunchError("the reattach ticket does not verify")
            pid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[0]
            send_frame(conn, {"t": "ok", "value": None})
        except (MigSGXError, OSError, ValueError):
            conn.close()
            return
        conn.settimeout(None)
        rec = EnclaveRecord(pid, "reattached", identity, None)
        with self._lock:
            self.enclaves.setdefault(pid, rec)
        self._serve_enclave(conn, self.platform.services_for(identity), rec)

    # --- enclave processes ----------------------------------------------------------
    def _start_runtime(
        self, log_name: str, conn: socket.socket | None
    ) -> tuple[subprocess.Popen[bytes], socket.socket]:
        """Start an enclave runtime process; ``conn`` None makes a spare."""

        log = open(self.log_dir / log_name, "ab")  # noqa: SIM115
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        fds = [theirs.fileno()] + ([conn.fileno()] if conn is not None else [])
        app_args = ["--app", str(conn.fileno())] if conn is not None else []
        try:
            proc = subprocess.Popen(
                [
                    *self._isolation_prefix(),
                    sys.executable,
                    # -P: the working directory is not put on sys.path, so no file
                    # beside the service can be imported into the enclave unmeasured.
                    "-P",
                    "-m",
                    "migsgx.enclave.runtime",
                    "--channel",
                    str(theirs.fileno()),
                    *app_args,
                ],
                pass_fds=tuple(fds),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
                close_fds=True,
            )
        except OSError as exc:
            ours.close()
            raise LaunchError(f"cannot start the enclave process: {exc}") from exc
        finally:
            theirs.close()
            log.close()
        return proc, ours

    def _take_spare(self) -> tuple[subprocess.Popen[bytes], socket.socket] | None:
        with self._spare_lock:
            spare, self._spare = self._spare, None
        if spare is not None and spare[0].poll() is not None:
            spare[1].close()
            return None
        return spare

    def _refill_spare(self) -> None:
        """Keep one runtime process warm (started, imported, self-tested) for the next launch."""

        if not self.warm_spare or self._stop.is_set():
            return

        def start() -> None:
            try:
                spare = self._start_runtime("enclaves.log", None)
            except LaunchError:
                return
            with self._spare_lock:
                if self._spare is None and not self._stop.is_set():
                    self._spare = spare
                    return
            spare[1].close()
            spare[0].kill()
            spare[0].wait()

        threading.Thread(target=start, name="migsgx-spare", daemon=True).start()

    def _isolation_prefix(self) -> list[str]:
        """Hide the platform's state (root secret, keys) from enclave code.

        On SGX the fused key never leaves the CPU; here it is a file, so each
        enclave process gets a private mount namespace with an empty, inaccessible
        tmpfs over the state directory.  Needs root (CAP_SYS_ADMIN); without it
        the enclave runs as the service's user and the directory's 0700 mode is
        the only barrier.  Once the tmpfs is in place the enclave drops every
        capability (``setpriv``): otherwise, still root, it could unmount the
        tmpfs, or read the state through ``/proc/<service>/root`` or the
        service's memory.
        """

        if os.geteuid() != 0 or shutil.which("unshare") is None:
            return []
        drop = ""
        if shutil.which("setpriv") is not None:
            drop = (
                "setpriv --bounding-set=-all --inh-caps=-all --ambient-caps=-all --no-new-privs -- "
            )
        return [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "--",
            "/bin/sh",
            "-c",
            f'mount -t tmpfs -o size=4k,mode=000 migsgx-hidden "$0" && exec {drop}"$@"',
            str(self.platform.state_dir.resolve()),
        ]

    # --- the private channel of one enclave ------------------------------------
    def _serve_enclave(self, sock: socket.socket, svc: LocalServices, rec: EnclaveRecord) -> None:
        with sock:
            while True:
                try:
                    msg = recv_frame(sock, PLATFORM)
                except (ConnectionClosedError, OSError):
                    break
                except MigSGXError:
                    break
                try:
                    value = self._answer(svc, msg)
                    reply: dict[str, Any] = {"t": "ok", "value": value}
                except MigSGXError as exc:
                    reply = {"t": "err", "code": exc.code, "message": exc.message}
                except Exception as exc:
                    reply = {
                        "t": "err",
                        "code": "platform",
                        "message": f"platform request failed: {type(exc).__name__}",
                    }
                try:
                    send_frame(sock, reply)
                except OSError:
                    break
        if rec.process is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                rec.process.wait(timeout=5)

    def _answer(self, svc: LocalServices, msg: dict[str, Any]) -> Any:
        kind = msg["t"]
        if kind == "getkey":
            return svc.get_key(KeyRequest.unpack(msg["request"]))
        if kind == "report":
            return svc.report(TargetInfo.unpack(msg["target"]), msg["data"]).pack()
        if kind == "quote":
            return svc.quote(msg["data"])
        if kind == "roots":
            return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in svc.trusted_roots())
        if kind == "ctr_create":
            return list(svc.counter_create(msg["initial"]))
        if kind == "ctr_read":
            return svc.counter_read(msg["id"])
        if kind == "ctr_inc":
            return svc.counter_increment(msg["id"], msg["by"])
        if kind == "ctr_destroy":
            svc.counter_destroy(msg["id"])
            return None
        if kind == "claim":
            return svc.claim_migration(msg["mid"])
        if kind == "claimed":
            return svc.migration_claimed(msg["mid"])
        if kind == "ps_read":
            return svc.persist_read(msg["name"])
        if kind == "ps_update":
            svc.persist_update(msg["name"], RecordUpdate.from_wire(msg))
            return None
        if kind == "ps_txn":
            changes = msg["changes"]
            if not all(isinstance(c, dict) and isinstance(c.get("name"), str) for c in changes):
                raise ProtocolError("a record transaction is malformed")
            svc.persist_transaction(
                [(c["name"], RecordUpdate.from_wire(c)) for c in changes], claim=msg["claim"]
            )
            return None
        raise ProtocolError(f"unexpected request {kind!r} from an enclave")
