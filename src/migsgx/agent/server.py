"""The per-host agent: ``migsgx agent serve``, the destination of migrations.

It listens on TCP; every connection must complete a mutual-TLS handshake with
a certificate of the deployment CA (:mod:`.tls`) before a byte of the control
protocol (:mod:`.protocol`) is read.  One connection carries one migration
(:class:`IncomingMigration`); requests are dispatched through an explicit
table after :class:`~.protocol.SessionMachine` allowed them.

The agent is a child subreaper: restored trees become its children once CRIU
exits, and it reaps them when they end.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import shutil
import socket
import ssl
import threading
from pathlib import Path
from typing import Any, Final

from .._net import LivenessWatch, keep_alive
from ..errors import ConfigError
from .adoption import Adoption
from .config import AgentConfig
from .dumpdirs import sweep_dump_dirs
from .incoming import IncomingMigration
from .metrics import AgentMetrics
from .protocol import SessionState
from .recover_dest import serving_lock
from .tls import PeerCertificateError, server_context, wrap_server

__all__ = ["Agent", "AgentConfig"]

log = logging.getLogger("migsgx.agent")

HANDSHAKE_TIMEOUT: Final = 10.0
_PR_SET_CHILD_SUBREAPER: Final = 36


class Agent:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.context: ssl.SSLContext = server_context(config.identity)
        self.host_id = config.identity.host_id()
        self._listener: socket.socket | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._sessions: set[IncomingMigration] = set()
        self._in_doubt: dict[bytes, IncomingMigration] = {}
        self._adopted: set[int] = set()
        self._serving: int | None = None  # (the work directory's lock, :mod:`.recover_dest`)
        self.metrics = AgentMetrics(self.host_id)
        self.metrics.track(self._held_sessions, self._incoming_enclaves)
        self.metrics.in_progress.set_function(lambda: float(len(self._sessions)))

    def _held_sessions(self) -> int:
        with self._lock:
            return sum(1 for s in self._sessions if s.machine.state == SessionState.HELD)

    def _incoming_enclaves(self) -> int:
        with self._lock:
            return sum(len(s.enclaves) for s in self._sessions if not s.machine.finished)

    def serve_metrics(self, address: str, port: int) -> tuple[str, int]:
        """Serve the Prometheus metrics (:mod:`.metrics`) on ``address:port``."""

        try:
            return self.metrics.serve(address, port)
        except OSError as exc:
            raise ConfigError(f"metrics cannot listen on {address}:{port}: {exc}") from exc

    # --- lifetime -----------------------------------------------------------------------
    def bind(self) -> tuple[str, int]:
        self._own_work_dir()
        # Held for as long as this agent runs: migsgx recover leaves its records alone.
        self._serving = serving_lock(self.config.work_dir)
        host, port = self.config.listen
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            sock.close()
            raise ConfigError(f"the agent cannot listen on {host}:{port}: {exc}") from exc
        sock.listen(16)
        self._listener = sock
        Adoption(self).adopt_held()  # before anyone is told that this agent listens
        # The images a killed agent received into RAM (:mod:`.imageroom`).
        sweep_dump_dirs()
        bound = sock.getsockname()
        return str(bound[0]), int(bound[1])

    def _own_work_dir(self) -> None:
        """Make the work directory, or check the one there: the agent's own, writable by
        nobody else.  Its session directories hold held-tree records that a restarted
        agent acts on (kills, removes or adopts the trees they name): in a directory
        others could write, anyone could plant one."""

        path = self.config.work_dir
        try:
            path.mkdir(parents=True, exist_ok=True, mode=0o700)
            st = path.stat()
        except OSError as exc:
            raise ConfigError(f"the agent's work directory {path}: {exc}") from exc
        if st.st_uid != os.geteuid() or st.st_mode & 0o022:
            raise ConfigError(
                f"the agent's work directory {path} is owned by uid {st.st_uid} with mode "
                f"{st.st_mode & 0o7777:o}: it must be this agent's (uid {os.geteuid()}) and "
                "writable by nobody else"
            )

    def serve_forever(self) -> None:
        if self._listener is None:
            self.bind()
        assert self._listener is not None
        if self.config.subreaper:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
                log.warning("cannot become a child subreaper; restored trees go to init")
        self._listener.settimeout(0.2)
        while not self._stop.is_set():
            self._reap()
            try:
                conn, addr = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._stop.is_set():
                    break
                raise
            threading.Thread(
                target=self._connection, args=(conn, addr), name="migsgx-agent-conn", daemon=True
            ).start()

    def shutdown(self) -> None:
        self._stop.set()
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.close()
        with self._lock:
            sessions = list(self._sessions)
        for session in sessions:
            session.give_up("the agent is shutting down")
        self.metrics.close()

    # --- connections --------------------------------------------------------------------
    def _connection(self, conn: socket.socket, addr: Any) -> None:
        peer = str(addr[0])
        keep_alive(conn)
        try:
            tls = wrap_server(self.context, conn, HANDSHAKE_TIMEOUT)
        except PeerCertificateError as exc:
            log.warning("refused a connection from %s: %s", peer, exc)
            return
        session = IncomingMigration(self, tls, peer)
        with self._lock:
            self._sessions.add(session)
        # The tool's silence ends the session within the liveness bound also while
        # the agent is inside a long step that does not use the connection (a
        # restore): its next send or receive fails at once.
        watch = LivenessWatch(
            tls, lambda why: log.warning("the connection from %s failed: %s", peer, why)
        ).start()
        try:
            session.run()
        except Exception:
            log.exception("session from %s failed unexpectedly", peer)
            session.abort("internal error")
        finally:
            watch.stop()
            with contextlib.suppress(OSError):
                tls.close()
            with self._lock:
                self._sessions.discard(session)
            outcome = session.outcome()
            if outcome is not None:
                driver = session.driver.name if session.driver is not None else "pid"
                self.metrics.finished(outcome, driver)

    # --- migrations in doubt ---------------------------------------------------------------
    def hold(self, session: IncomingMigration) -> None:
        """Keep ``session`` reachable for a decision delivered after its tool went away."""

        with self._lock:
            self._in_doubt[session.session_id] = session

    def unhold(self, session: IncomingMigration) -> None:
        with self._lock:
            if self._in_doubt.get(session.session_id) is session:
                del self._in_doubt[session.session_id]

    def find_session(
        self, mid: bytes, besides: IncomingMigration | None = None
    ) -> IncomingMigration | None:
        """The session of migration ``mid`` (in doubt, or still with its tool), if any."""

        with self._lock:
            found = self._in_doubt.get(mid)
            if found is None:
                found = next(
                    (s for s in self._sessions if s.session_id == mid and s is not besides), None
                )
        return found

    def live_arrivals(self) -> set[bytes]:
        with self._lock:
            sessions = [*self._sessions, *self._in_doubt.values()]
        return set().union(*(s.arrivals() for s in sessions)) if sessions else set()

    def in_doubt(self) -> list[bytes]:
        with self._lock:
            return list(self._in_doubt)

    # --- restored trees -------------------------------------------------------------------
    def adopt(self, pid: int) -> None:
        with self._lock:
            self._adopted.add(pid)

    def _reap(self) -> None:
        with self._lock:
            pids = list(self._adopted)
        for pid in pids:
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done = pid if not os.path.exists(f"/proc/{pid}") else 0
            if done == pid:
                with self._lock:
                    self._adopted.discard(pid)

    # --- helpers for sessions -----------------------------------------------------------------
    def session_dir(self, session_id: bytes) -> Path:
        path = self.config.work_dir / session_id.hex()
        try:
            path.mkdir(mode=0o700)
        except FileExistsError as exc:
            raise ConfigError(f"session {session_id.hex()} was seen before on this agent") from exc
        return path

    def discard(self, path: Path | None) -> None:
        if path is not None and not self.config.keep_images:
            shutil.rmtree(path, ignore_errors=True)
