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

from ..containers import HostConfig, make_driver
from ..datapath.transport import keep_alive
from ..errors import ConfigError, MigSGXError
from ..sgx.counters import CounterStore
from ..sgx.platform import COUNTERS
from .config import AgentConfig
from .held import HeldRecord, held_records, mark_lost, start_time
from .incoming import IncomingMigration
from .metrics import AgentMetrics
from .protocol import SessionState
from .tls import PeerCertificateError, server_context, wrap_server

__all__ = ["Agent", "AgentConfig", "platform_socket_alive"]

log = logging.getLogger("migsgx.agent")

HANDSHAKE_TIMEOUT: Final = 10.0
_PR_SET_CHILD_SUBREAPER: Final = 36


def platform_socket_alive(path: Path) -> bool:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(2.0)
        sock.connect(str(path))
    except OSError:
        return False
    finally:
        sock.close()
    return True


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
        self._adopt_held()  # before anyone is told that this agent listens
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

    def _claimed(self, arrivals: list[str]) -> int:
        """How many of ``arrivals`` (hex migration ids) this host's claim store holds."""

        store = self.config.state / COUNTERS
        if not store.exists():  # (opening it would create it)
            return 0
        claims = CounterStore(store)
        return sum(1 for a in arrivals if a and claims.claimed_by_any(bytes.fromhex(a)))

    def _adopt_held(self) -> None:
        """Trees a former agent held when it died (window W2, :mod:`.held`).

        Still the recorded tree and stopped: adopted into a session held in
        doubt, which waits for the source to deliver the state again (a
        container only if its engine still knows it as that tree).  Anything
        else recorded is removed (a container by its engine where it can), and
        the log says exactly what remained.
        """

        for directory, record in held_records(self.config.work_dir):
            if record is None:
                log.error(
                    "%s: an unreadable held-tree record: nothing adopted, nothing resumed; "
                    "the tree it names (if any) stays as it is, for an operator", directory,
                )  # fmt: skip
                continue
            tag = record.session_id[:8]
            if record.lazy_pages:
                self._end_post_copy(directory, record)
                continue
            if record.restoring:
                # Died inside the restore: nothing ran, the source cannot have decided.
                if record.driver == "pid":
                    what, removed = "a process tree", self._remove_restored(record)
                else:
                    what = f"{record.driver} {record.handle}"
                    removed = self._remove_made(record, keep_running=False) or "nothing"
                log.warning(
                    "migration %s: a former agent died restoring %s: removed %s", tag, what,
                    removed,
                )  # fmt: skip
                self.discard(directory)
                continue
            if not record.still_held():
                left = ""
                if record.driver != "pid":
                    left = self._remove_made(record, keep_running=True)
                log.warning(
                    "migration %s: the tree a former agent held (pid %d) is gone or runs: "
                    "nothing to adopt%s", tag, record.root, f"; removed {left}" if left else "",
                )  # fmt: skip
                self.discard(directory)
                continue
            if not record.answered:
                # Restored, never reported held: the source cannot have decided.
                self._remove_held(record)
                log.warning(
                    "migration %s: the tree a former agent restored (pid %d, %s) was never "
                    "reported held, so never decided on: removed", tag, record.root,
                    record.driver,
                )  # fmt: skip
                self.discard(directory)
                continue
            running = record.enclaves_running()
            if running:
                log.warning(
                    "migration %s: enclave process(es) %s of the held tree still run; the "
                    "claim store lets one copy per migration id activate", tag, running,
                )  # fmt: skip
            claimed = self._claimed(record.arrivals)
            if claimed:
                self._remove_held(record)
                detail = (
                    f"the tree (pid {record.root}) was held with {claimed} enclave id(s) "
                    "already claimed: their state ran and ended with the former agent (W3); "
                    "the tree was killed, nothing can bring the state back"
                )
                log.error("migration %s: %s", tag, detail)
                mark_lost(directory, detail)
                continue
            try:
                session = IncomingMigration.adopt_held(self, directory, record)
            except (MigSGXError, ValueError, TypeError, KeyError) as exc:
                record.kill()  # (its engine does not know it as this tree)
                if record.driver != "pid":
                    # Its engine's entry too, if this agent's restore made it for the session.
                    left = self._remove_made(record, keep_running=False)
                    if left:
                        log.warning("migration %s: removed %s", tag, left)
                log.error(
                    "migration %s: the tree a former agent held (pid %d) cannot be adopted "
                    "(%s): killed. Its state stays only with the source's committed enclaves; "
                    "migsgx recover on the source host reports the migration lost",
                    tag, record.root, exc,
                )  # fmt: skip
                self.discard(directory)
                continue
            log.warning(
                "migration %s: adopted the tree a former agent held (pid %d, %s%s), %d "
                "enclave(s) lost: held in doubt for the state to come again", tag, record.root,
                session.restored.label if session.restored else record.driver,
                ", paused: thawed only by a COMMIT" if record.frozen() else "",
                len(session.enclaves),
            )  # fmt: skip

    def _end_post_copy(self, directory: Path, record: HeldRecord) -> None:
        """A post-copy tree a former agent restored (:mod:`.held`): never adopted.

        Its page window cannot be opened again, so it can never run: it is
        killed while stopped (never reading a missing page), then its lazy-pages
        daemon; a container is removed by its engine.  Which copy remains is
        the source's decision: before it, the source runs on; after a COMMIT the
        source's enclaves hold a state no tree can take, and ``recover`` there
        says it was lost (the redelivery is answered ``unknown``)."""

        tag = record.session_id[:8]
        runs = start_time(record.root) == record.start and not record.still_held()
        if not record.restoring and record.root > 0 and runs:
            # Resumed past the commit point (window W4): its daemon alone holds its
            # missing pages now, and ending it would make the tree read zeros.
            pid, start = record.lazy_pages
            serving = start_time(pid) == start
            log.warning(
                "migration %s: a former agent's post-copy tree (pid %d) runs in its page "
                "window; its lazy-pages daemon (pid %d) %s", tag, record.root, pid,
                "serves on: both left as they are" if serving else "has ended",
            )  # fmt: skip
            if not serving:
                self.discard(directory)
            return
        if record.restoring:
            if record.driver == "pid":
                removed = self._remove_restored(record)
            else:
                removed = self._remove_made(record, keep_running=False) or "nothing"
        elif record.still_held():
            self._remove_held(record)
            removed = f"the tree (pid {record.root}, {record.driver})"
        else:
            left = self._remove_made(record, keep_running=True) if record.driver != "pid" else ""
            removed = left or f"nothing (the tree, pid {record.root}, is gone)"
        daemon = "ended" if record.end_lazy_pages() else "gone"
        claimed = self._claimed(record.arrivals)
        if claimed:
            detail = (
                f"a post-copy tree (pid {record.root}) was held with {claimed} enclave id(s) "
                "already claimed: their state ran and ended with the former agent (W3); the "
                "tree was killed, nothing can bring the state back"
            )
            log.error("migration %s: %s", tag, detail)
            mark_lost(directory, detail)
            return
        log.warning(
            "migration %s: a former agent held a post-copy tree (its page window open): "
            "another agent cannot open that window again, so the tree can never run "
            "and is not adopted: removed %s; its lazy-pages daemon %s. The source's "
            "decision says what remains (%s)", tag, removed, daemon,
            "it was never reported held: the source runs on" if not record.answered
            else "an ABORT: the source runs on; a COMMIT: the state is lost, recover says so",
        )  # fmt: skip
        self.discard(directory)

    @staticmethod
    def _remove_restored(record: HeldRecord) -> str:
        """What was killed of the process tree a former agent's CRIU restored.

        The record names its root (pid and start time) once CRIU made every task
        (CRIU's ``post-restore``): that process only, and what it leads (its pid
        namespace, or its descendants), never a pid another process took since.
        Without a root, CRIU aborted the restore itself (a notification it sent
        before then went unanswered) and killed what it made.
        """

        if record.root <= 0:
            return "nothing (CRIU had made no tree yet: it ends the restore itself)"
        if start_time(record.root) != record.start:
            return f"nothing (the tree's root, pid {record.root}, is gone)"
        try:
            record.kill()
        except MigSGXError as exc:
            return f"not all of the tree (pid {record.root}): {exc}"
        return f"the restored process tree (pid {record.root})"

    def _remove_made(self, record: HeldRecord, *, keep_running: bool) -> str:
        """What the engine removed of a container a former agent's restore made
        for ``record``'s session (the driver checks that it made it); never raises."""

        host = HostConfig(self.config.criu, self.config.containers,
                          self.config.platform_socket, self.config.state)  # fmt: skip
        try:
            driver = make_driver(record.driver, host)
            return driver.remove_made(record.handle, record.session_id, keep_running=keep_running)
        except (MigSGXError, ValueError, TypeError, KeyError) as exc:
            log.error("migration %s: %s %s not removed by its engine: %s",
                      record.session_id[:8], record.driver, record.handle, exc)  # fmt: skip
            return ""

    def _remove_held(self, record: HeldRecord) -> None:
        """Remove a recorded held tree that must never run: a container by its engine
        (container, bundle, pod namespace) if it still knows it as that tree."""

        if record.driver != "pid":
            host = HostConfig(self.config.criu, self.config.containers,
                              self.config.platform_socket, self.config.state)  # fmt: skip
            try:
                driver = make_driver(record.driver, host)
                driver.discard(driver.reclaim(record.handle, record.root))
                return
            except (MigSGXError, ValueError, TypeError, KeyError) as exc:
                log.error("migration %s: %s %s not removed by its engine: %s",
                          record.session_id[:8], record.driver, record.handle, exc)  # fmt: skip
        record.kill()

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
        try:
            session.run()
        except Exception:
            log.exception("session from %s failed unexpectedly", peer)
            session.abort("internal error")
        finally:
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
