"""The platform service of one host: ``migsgx platform serve``.

It plays the parts that, on real SGX, the CPU, the driver (``/dev/sgx_enclave``)
and the architectural enclaves (AESM: quoting, counters) play.  Applications
connect to its Unix socket (bind-mountable into containers, like the AESM
socket, and kept across a restart: :mod:`.listener`), send an enclave image,
and after EINIT succeeds get their connection handed to a new enclave process
that the service started.  Enclave processes
are children of the service, never of the application, so CRIU never dumps
enclave memory with the application.  Each enclave gets a private channel
back to the service, bound to the identity the service measured.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import _proc
from .._fds import take_descriptor
from ..channel import IMAGE_FRAME_MAX, LAUNCH, PLATFORM
from ..errors import ConnectionClosedError, LaunchError, MigSGXError, ProtocolError
from ..wire import recv_frame, send_frame
from . import syscalls
from .enclave_logs import open_instance_log, prune_logs
from .image import EnclaveImage
from .keepers import child_environment
from .listener import (
    KEEP_FOR,
    SOCKET_DIR,
    SOCKET_NAME,
    Listener,
    default_socket,
    make_socket_dir,
    notify_ready,
)
from .platform import EmulatedPlatform, LocalServices
from .sandbox import SandboxSpec, launcher_command, runtime_binds
from .service_requests import reply_to
from .structs import ReportBody

__all__ = ["SOCKET_DIR", "SOCKET_NAME", "EnclaveRecord", "PlatformService", "default_socket",
           "make_socket_dir"]  # fmt: skip

LAUNCH_TIMEOUT = 30.0


@dataclass
class EnclaveRecord:
    pid: int
    name: str
    identity: ReportBody
    process: subprocess.Popen[bytes] | None  # None: launched by an earlier service, taken back
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
        launch_control: bool = True,
        socket_group: int | None = None,
        sandbox: bool | None = None,
        keep_socket: float = KEEP_FOR,
    ) -> None:
        """``allowed_signers`` adds to the host's recorded allow list (``platform init``);
        ``launch_control=False`` lets any signer launch (development only);
        ``socket_group`` may use the socket besides the service's user; ``sandbox``
        defaults to on when the service runs as root (:mod:`.sandbox`); ``keep_socket``:
        seconds a keeper holds the socket after the service died (0: no keeper,
        :mod:`.listener`)."""

        self.platform = platform
        self.socket_path = Path(socket_path or default_socket(platform.state_dir))
        self.allowed_signers = set(platform.allowed_signers) | set(allowed_signers or ())
        self.launch_control = launch_control
        self.socket_group = socket_group
        self.allow_debug = allow_debug
        self.sandbox = os.geteuid() == 0 if sandbox is None else sandbox
        if self.sandbox and os.geteuid() != 0:
            raise LaunchError("the enclave sandbox needs the service to run as root")
        self._sandbox_root = platform.state_dir / "sandbox"
        self._binds = runtime_binds() if self.sandbox else []
        self._seccomp = self.sandbox and syscalls.available()
        self.log_dir = Path(log_dir or platform.state_dir / "logs")
        self.enclaves: dict[int, EnclaveRecord] = {}
        self._live_logs: dict[int, Path] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._listener: socket.socket | None = None
        self._socket = Listener(
            platform.state_dir, self.socket_path, group=socket_group, keep_for=keep_socket
        )
        self.warm_spare = warm_spare
        self._spare: tuple[subprocess.Popen[bytes], socket.socket] | None = None
        self._spare_lock = threading.Lock()

    # --- lifecycle -------------------------------------------------------------
    def bind(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        if self.sandbox:
            self._sandbox_root.mkdir(exist_ok=True, mode=0o700)
            if not self._seccomp:
                sys.stderr.write(
                    "platform: WARNING: libseccomp's Python binding is missing (run "
                    "`make setup`): enclaves run without their system-call filter\n"
                )
        else:
            sys.stderr.write(
                "platform: WARNING: not root, enclaves are not sandboxed (they run as "
                "this service's user)\n"
            )
        sock = self._socket.open()
        self._listener = sock
        self._take_back_enclaves()
        self._refill_spare()

    @property
    def socket_origin(self) -> str:
        """``bound`` (fresh), ``kept`` (taken back from a keeper) or ``systemd``."""

        return self._socket.origin

    def serve_forever(self) -> None:
        if self._listener is None:
            self.bind()
        assert self._listener is not None
        self._listener.settimeout(0.2)
        notify_ready()
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
        self._socket.close()
        spare = self._take_spare()
        if spare is not None:
            spare[1].close()
            spare[0].kill()
            spare[0].wait()
        if kill_enclaves:
            with self._lock:
                records = [r.process for r in self.enclaves.values() if r.process is not None]
            for proc in records:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
            for proc in records:
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()

    def _reap(self) -> None:
        with self._lock:
            for pid, rec in list(self.enclaves.items()):
                if rec.process is not None and rec.process.poll() is not None:
                    del self.enclaves[pid]
                    self._live_logs.pop(pid, None)

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
        if self.launch_control and identity.mr_signer not in self.allowed_signers:
            raise LaunchError(
                f"launch control: MRSIGNER {identity.mr_signer.hex()} is not allowed on this "
                "host (allow it with `migsgx platform allow-signer --state DIR MRSIGNER`)"
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
            proc, ours = self._start_runtime(conn)
            send_frame(ours, init, max_size=IMAGE_FRAME_MAX)
        # The proof of its identity, for a restarted service to take it back by.
        send_frame(ours, {"t": "ticket", "ticket": self.platform.reattach_ticket(identity)})
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

    # --- enclave processes ----------------------------------------------------------
    def _start_runtime(
        self, conn: socket.socket | None
    ) -> tuple[subprocess.Popen[bytes], socket.socket]:
        """Start an enclave runtime process; ``conn`` None makes a spare.

        Its log is a file of its own (:mod:`.enclave_logs`).
        """

        with self._lock:
            live = set(self._live_logs.values())
        prune_logs(self.log_dir, live)
        log_path, log = open_instance_log(self.log_dir)
        launcher, flags = self._sandbox_prefix()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        # The reserve channel: both ends stay in the enclave process (see take_back).
        reserve, reserve_peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        fds = [theirs.fileno(), reserve.fileno(), reserve_peer.fileno()]
        fds += [conn.fileno()] if conn is not None else []
        app_args = ["--app", str(conn.fileno())] if conn is not None else []
        app_args += ["--reserve", str(reserve.fileno()), "--reserve-peer",
                     str(reserve_peer.fileno()), "--platform-tag", self.platform_tag]  # fmt: skip
        try:
            proc = subprocess.Popen(
                [
                    *launcher,
                    sys.executable,
                    # -P: the working directory is not put on sys.path, so no file
                    # beside the service can be imported into the enclave unmeasured.
                    "-P",
                    "-m",
                    "migsgx.enclave.runtime",
                    "--channel",
                    str(theirs.fileno()),
                    *app_args,
                    *flags,
                ],
                pass_fds=tuple(fds),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
                close_fds=True,
                env=child_environment(),  # (no NOTIFY_SOCKET, no LISTEN_*)
            )
        except OSError as exc:
            ours.close()
            raise LaunchError(f"cannot start the enclave process: {exc}") from exc
        finally:
            theirs.close()
            reserve.close()
            reserve_peer.close()
            log.close()
        with self._lock:
            self._live_logs[proc.pid] = log_path
        return proc, ours

    def _take_spare(self) -> tuple[subprocess.Popen[bytes], socket.socket] | None:
        with self._spare_lock:
            spare, self._spare = self._spare, None
        if spare is not None and spare[0].poll() is not None:
            spare[1].close()
            with self._lock:
                self._live_logs.pop(spare[0].pid, None)
            return None
        return spare

    def _refill_spare(self) -> None:
        """Keep one runtime process warm (started, imported, self-tested) for the next launch."""

        if not self.warm_spare or self._stop.is_set():
            return

        def start() -> None:
            try:
                spare = self._start_runtime(None)
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

    def _sandbox_prefix(self) -> tuple[list[str], list[str]]:
        """The launcher command that puts the runtime in its sandbox, and runtime flags.

        Root builds the full sandbox (:mod:`.sandbox`).  Without root nothing of
        it can be built: the enclave runs as the service's user and the state
        directory's 0700 mode is the only barrier (said once, at bind time).
        """

        if not self.sandbox:
            return [], []
        spec = SandboxSpec.fresh(self._sandbox_root, self._binds, seccomp=self._seccomp)
        return launcher_command(spec, []), ["--sandboxed"]

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
                # (its store operations are refused once the enclave hung up: a COMMIT
                # it sent and died before it was written is never written afterwards)
                reply = reply_to(svc, msg, sock, rec.pid)
                try:
                    send_frame(sock, reply)
                except OSError:
                    break
        if rec.process is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                rec.process.wait(timeout=5)

    # --- enclaves of an earlier service (a restart) ----------------------------------
    @property
    def platform_tag(self) -> str:
        """Names this host's platform on its enclaves' command lines."""

        state = str(self.platform.state_dir.resolve()).encode()
        return hashlib.sha256(b"migsgx platform " + state).hexdigest()[:32]

    def _take_back_enclaves(self) -> None:
        """Enclave processes an earlier service of this platform left running.

        Each holds both ends of a reserve channel at the descriptor numbers on
        its command line; as root this service takes a duplicate of the peer end
        (``pidfd_getfd``), says hello, and serves the enclave again once its
        launch ticket verifies (on the enclave's next platform request).
        """

        for pid, peer_fd in _enclaves_of(self.platform_tag):
            with self._lock:
                if pid in self.enclaves:
                    continue
            try:
                sock = take_descriptor(pid, peer_fd)
            except OSError:
                continue  # gone, or not ours to take
            threading.Thread(
                target=self._take_back, args=(sock, pid), name="migsgx-take-back", daemon=True
            ).start()

    def _take_back(self, sock: socket.socket, pid: int) -> None:
        try:
            send_frame(sock, {"t": "hello"})
            msg = recv_frame(sock, PLATFORM)  # when the enclave next needs its platform
            if msg["t"] != "reattach":
                raise ProtocolError("expected a reattach request")
            identity = self.platform.reattach_identity(msg["identity"], msg["ticket"])
            if identity is None:
                raise LaunchError("the reattach ticket does not verify")
            fresh, fresh_peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                send_frame(sock, {"t": "reserve"})
                socket.send_fds(sock, [b"R"], [fresh.fileno(), fresh_peer.fileno()])
            finally:
                fresh.close()
                fresh_peer.close()
        except (MigSGXError, OSError, ValueError):
            with contextlib.suppress(OSError):
                send_frame(sock, {"t": "err", "code": "launch", "message": "not taken back"})
            sock.close()
            return
        rec = EnclaveRecord(pid, "taken back", identity, None)
        with self._lock:
            self.enclaves.setdefault(pid, rec)
        self._serve_enclave(sock, self.platform.services_for(identity), rec)


def _enclaves_of(tag: str) -> list[tuple[int, int]]:
    """(pid, reserve peer descriptor) of every enclave runtime naming ``tag``."""

    found = []
    for pid in _proc.pids():
        argv = _proc.argv(pid)
        if b"migsgx.enclave.runtime" not in argv or b"--platform-tag" not in argv:
            continue
        try:
            if argv[argv.index(b"--platform-tag") + 1].decode() != tag:
                continue
            peer = int(argv[argv.index(b"--reserve-peer") + 1])
        except (ValueError, IndexError):
            continue
        found.append((pid, peer))
    return found
