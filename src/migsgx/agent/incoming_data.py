"""An incoming migration's state, and its data: the page connection (page server
or sealed page relay, :mod:`.incoming_pages`) and each enclave's authenticated
data connection, received and then waiting for the source's decision; with the
destination's fault hooks.

:mod:`.incoming_settle` decides and ends a session on top of this, and
:mod:`.incoming` answers the tool's requests.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import signal
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Final

from ..containers import Driver, Restored
from ..criu.pageserver import PageServer
from ..datapath.incoming import IncomingEnclave
from ..datapath.pagerelay import PageRelay
from ..errors import MigSGXError, ProtocolError
from ..host.client import EnclaveInfo
from ..sgx.listener import platform_socket_alive
from .config import AgentHost
from .datalink import KEY_SIZE, accept_data, check_pinned
from .fault_relays import firewall_drop
from .faults import fault, kill_dead, socket_owner
from .guardian_log import RECOVER_PATIENCE
from .incoming_pages import _PageIntake
from .lazy import Window
from .lost_enclaves import hung_up
from .protocol import MAX_ENCLAVES, AgentError, SessionMachine, plain_stats

__all__: list[str] = []

log = logging.getLogger("migsgx.agent")

DATA_HELLO_TIMEOUT: Final = 10.0
MAX_DATA_OPENINGS: Final = 2 * MAX_ENCLAVES
#: How long the state delivered again (window W2) waits for this host's platform
#: service to be back before its fresh enclave is launched: the guardian's patience
#: (it keeps delivering a committed migration that long).
PLATFORM_WAIT: Final = RECOVER_PATIENCE
#: The longest pause between two looks for the platform service meanwhile.
PLATFORM_LOOK_MAX: Final = 1.0
Reply = dict[str, Any] | None


@dataclass
class _Enclave:
    """One incoming enclave: loaded (or failed), then committed (or aborted)."""

    index: int
    source_info: EnclaveInfo
    conn: socket.socket | None = None
    engine: IncomingEnclave | None = None
    thread: threading.Thread | None = None
    stats: dict[str, Any] = field(default_factory=dict)
    error: BaseException | None = None
    loaded: threading.Event = field(default_factory=threading.Event)
    decided: threading.Event = field(default_factory=threading.Event)
    ecall_sock: socket.socket | None = None
    commit_error: BaseException | None = None
    #: A fresh copy for the state delivered again (window W2): the source committed.
    again: bool = False
    #: Its enclave was given a duplicate of our end before its claim (``__mig_hold``).
    held: bool = False


def _shutdown(sock: socket.socket | None) -> None:
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()


class _SessionState(_PageIntake):
    """What one incoming migration holds, and how its data arrives (its pages:
    :class:`~.incoming_pages._PageIntake`)."""

    def __init__(self, agent: AgentHost, tls: ssl.SSLSocket | socket.socket, peer: str) -> None:
        self.agent = agent
        self.config = agent.config
        self.tls = tls
        self.peer = peer
        self.machine = SessionMachine()
        #: The control protocol version of this session (``hello``; :mod:`.versions`).
        self.version = 1
        self.data_key = secrets.token_bytes(KEY_SIZE)
        self.session_id = b""
        #: The session's directory in the work directory: its records (:mod:`.held`).
        self.session_dir: Path | None = None
        #: CRIU's images: RAM when it has room, else ``session_dir`` (:mod:`.imageroom`).
        self.images_dir: Path | None = None
        #: Removed once the answer that ends a migration went out (:meth:`_discard_later`).
        self._discard_after_reply: list[Path] = []
        self.enclaves: list[_Enclave] = []
        self.tcp_close = False
        self.page_tls = False
        self.page_server = True
        #: The pages come sealed through the agents' relay (docs/spec/pagestream.md).
        self.page_relay = False
        self._relay: PageRelay | None = None
        #: Post-copy: the tree is restored with CRIU lazy pages from the source.
        self.post_copy = False
        self.window: Window | None = None
        self.driver: Driver | None = None
        self.target: dict[str, Any] = {}
        self.restored: Restored | None = None
        self.root: int | None = None
        self._page_server: PageServer | None = None
        self._page_error: BaseException | None = None
        self._page_thread: threading.Thread | None = None
        self._page_listener: socket.socket | None = None
        self._page_accepted = threading.Event()
        self._listeners: list[socket.socket] = []
        self._files: dict[str, IO[bytes]] = {}
        self._image_bytes = 0
        self._images_t0 = 0.0
        self._lock = threading.Lock()
        self._decide_lock = threading.Lock()
        self._finished = False
        #: Set once an enclave committed or the tree was let run: no abort after that.
        self.no_return = False
        self.rolled_forward = False
        #: Set once the held tree was continued (its SIGCONT sent, or its page window run).
        self.tree_continued = False
        #: Enclaves whose connection was closed at the far end right after the attach.
        self.hung_up: list[int] = []
        self.source_host = ""
        #: Once held in doubt: set when every enclave got its decision and it was carried out.
        self.settled = threading.Event()
        self.decided_outcome = ""
        self._claim_fault_done = False
        #: Set when a lost copy was replaced by a fresh enclave (the held session waits on).
        self._refilled = threading.Event()
        #: Held without its tool (or adopted): a copy lost undecided keeps the tree.
        self.keep_lost = False
        #: The source host said ABORT (``deliver`` with ``decision: abort``, over mutual
        #: TLS from the address that began the session): no state comes again, so a
        #: copy lost undecided no longer keeps the tree.
        self.source_aborted = False
        #: The source said it committed (its tokens in ``resume``, a re-delivery asked):
        #: a failed step no longer ends the session while the state can come again.
        self.source_committed = False
        #: This end's address of the control connection (data listeners bind to it).
        self.local_address = ""

    @property
    def tag(self) -> str:
        return self.session_id[:4].hex() or "-"

    def _records(self) -> Path:
        """Where this session's records go (:mod:`.held`): its work directory's."""

        assert self.session_dir is not None
        return self.session_dir

    def enclave_pids(self) -> list[int]:
        return [int(getattr(getattr(e.engine, "info", None), "pid", 0)) for e in self.enclaves]

    # --- helpers ----------------------------------------------------------------------------
    def _stop_pages(self) -> None:
        if self._relay is not None:
            self._relay.close()
        if self._page_server is not None:
            self._page_server.kill()
        if self._relay is not None:
            self._relay.dispose()

    def _check_pids_free(self, pids: list[Any]) -> None:
        for pid in pids:
            if not isinstance(pid, int) or isinstance(pid, bool):
                raise ProtocolError("pids must be integers")
            if os.path.exists(f"/proc/{pid}"):
                raise AgentError(
                    f"pid {pid} of the application is in use on this host; start the "
                    "application in a pid namespace of its own (unshare --pid --fork)"
                )

    def _listen(self, address: str) -> socket.socket:
        sock = socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET)
        sock.bind((address, 0))
        sock.listen(MAX_ENCLAVES)
        sock.settimeout(self.config.io_timeout)
        self._listeners.append(sock)
        return sock

    def _start(
        self, target: Callable[[socket.socket], None], sock: socket.socket, name: str
    ) -> threading.Thread:
        thread = threading.Thread(target=target, args=(sock,), name=name, daemon=True)
        thread.start()
        return thread

    def _accept_data(self, listener: socket.socket, only: set[int] | None = None) -> None:
        """Accept data connections; each opening runs in a thread of its own, so a
        peer that connects and stays silent holds up no genuine connection."""

        pending = {e.index for e in self.enclaves} if only is None else set(only)
        lock = threading.Lock()
        openings = threading.BoundedSemaphore(MAX_DATA_OPENINGS)
        while True:
            with lock:
                if not pending:
                    return
            try:
                conn, _ = listener.accept()
            except OSError:
                if only is not None:
                    self._never_came(pending, lock)
                return
            if not openings.acquire(blocking=False):
                conn.close()  # more unauthenticated connections at once than enclaves need
                continue
            threading.Thread(
                target=self._open_data, args=(conn, pending, lock, openings),
                name="migsgx-agent-data-open", daemon=True,
            ).start()  # fmt: skip

    def _never_came(self, pending: set[int], lock: threading.Lock) -> None:
        """A fresh copy's state did not come in time: it counts as lost, so that a
        later attempt may replace it (else it would wait for ever)."""

        with lock:
            gone = [self.enclaves[i] for i in pending]
            pending.clear()
        for enclave in gone:
            if enclave.engine is None:
                log.warning("migration %s: enclave %d: the state did not come again in time",
                            self.tag, enclave.index)  # fmt: skip
                enclave.loaded.set()
                enclave.decided.set()

    def _open_data(
        self,
        conn: socket.socket,
        pending: set[int],
        lock: threading.Lock,
        openings: threading.BoundedSemaphore,
    ) -> None:
        try:
            try:
                # Fixed-size records keyed from the TLS session: nothing the peer
                # sends is parsed as a frame before it has proved the session key.
                conn.settimeout(DATA_HELLO_TIMEOUT)
                index = accept_data(conn, self.data_key, self.session_id)
                conn.settimeout(None)
            except (MigSGXError, OSError):
                log.warning("migration %s: a data connection did not authenticate", self.tag)
                conn.close()
                return
            with lock:
                fresh = index in pending
                pending.discard(index)
        finally:
            openings.release()
        if not fresh:
            log.warning("migration %s: a data connection was refused", self.tag)
            conn.close()
            return
        enclave = self.enclaves[index]
        enclave.conn = conn
        enclave.thread = threading.Thread(
            target=self._receive,
            args=(enclave, conn),
            name=f"migsgx-agent-enclave-{index}",
            daemon=True,
        )
        enclave.thread.start()

    def _receive(self, enclave: _Enclave, conn: socket.socket) -> None:
        """Load, then wait for the source's decision (COMMIT makes the enclave run)."""

        t0 = time.monotonic()
        try:
            offered = False
            try:
                action = fault("agent.enclave-receive")
                if action is not None and action.startswith("kill-after-bytes="):
                    _die_after_bytes(conn, int(action.partition("=")[2]))
                enclave.engine, offer = IncomingEnclave.accept_offer(
                    conn, self.config.platform_socket
                )
                # Nothing of the peer's runs unless it is the image begin announced.
                check_pinned(enclave.engine.image, enclave.source_info)
                enclave.engine.huge_pages = self.config.enclave_huge_pages
                offered = True
                if enclave.again:
                    self._platform_back(enclave, conn)
                stats = enclave.engine.receive(conn, offer)
                enclave.stats = {**plain_stats(stats), "timeline": stats.get("timeline", {})}
                enclave.stats["agent_seconds"] = time.monotonic() - t0
            except BaseException as exc:
                enclave.error = exc
                enclave.commit_error = exc
                if not offered:
                    # The offer refused (damaged, or not the image begin announced):
                    # nothing answers it, so hang up at once, and the source hears
                    # it now, not at its peer timeout.  (A failure after the offer
                    # sent the source an ``abort`` with the reason, which a hang-up
                    # could cut short.)
                    with contextlib.suppress(OSError):
                        conn.shutdown(socket.SHUT_RDWR)
                if enclave.engine is None or not enclave.engine.awaiting:
                    return
                # LOADED may have left: wait for the decision all the same.
            finally:
                enclave.loaded.set()
            try:
                enclave.ecall_sock = enclave.engine.wait_commit(
                    timeout=None, before_claim=lambda: self._before_claim(enclave),
                    after_claim=self._after_claim,
                    blocked=lambda: log.warning(
                        "migration %s: enclave %d lives but cannot claim: its platform service "
                        "is away; the copy waits for it (a failed claim is no decision)",
                        self.tag, enclave.index,
                    ),
                )  # fmt: skip
            except BaseException as exc:
                enclave.commit_error = exc
        finally:
            enclave.decided.set()

    def _platform_back(self, enclave: _Enclave, conn: socket.socket) -> None:
        """The state comes again (the source committed): wait for this host's platform
        service before the fresh enclave is launched, instead of failing at once.

        A committed migration whose copy died (window W2) can still move while
        its state can come again; a launch that fails because the service is
        away (being restarted) would end this attempt for nothing.  Bounded by
        :data:`PLATFORM_WAIT` (the guardian's patience), and by the source side,
        which may give the attempt up (its connection ends): then the fresh copy
        counts as lost, the session stays held, and a later attempt tries again.
        """

        path = self.config.platform_socket
        if platform_socket_alive(path):
            return
        log.warning(
            "migration %s: enclave %d: the platform service of this host is away: the state "
            "delivered again waits for it (up to %.0f s) before its fresh enclave launches",
            self.tag, enclave.index, PLATFORM_WAIT,
        )  # fmt: skip
        t0 = time.monotonic()
        pause = 0.05
        while not platform_socket_alive(path):
            why = ""
            if time.monotonic() - t0 > PLATFORM_WAIT:
                why = f"the platform service of this host was not back within {PLATFORM_WAIT:.0f} s"
            elif hung_up(conn):
                why = "the source gave this attempt up while the platform service was away"
            if why:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)  # (the source hears it now)
                raise AgentError(why)
            time.sleep(pause)
            pause = min(PLATFORM_LOOK_MAX, pause * 2)
        log.info("migration %s: enclave %d: the platform service is back after %.1f s",
                 self.tag, enclave.index, time.monotonic() - t0)  # fmt: skip

    def _before_claim(self, enclave: _Enclave) -> None:
        """A decision frame is about to be judged: fault injection at W2 (once a
        session), then the enclave's duplicate of our end (:meth:`_hold_before_claim`)."""

        if not self._claim_fault_done:
            self._claim_fault_done = True
            _inject(fault("agent.before-claim"), self)
        self._hold_before_claim(enclave)

    def _hold_before_claim(self, enclave: _Enclave) -> None:
        """Window W3: given by the session's tree steps (:mod:`.incoming_tree`)."""

    def _after_claim(self) -> None:
        """Fault injection at W3: an enclave claimed the id and runs, not yet attached."""

        _inject(fault("agent.after-claim"), self)

    def _close_files(self) -> int:
        count = len(self._files)
        for out in self._files.values():
            with contextlib.suppress(OSError):
                out.close()
        return count


def _inject(action: str | None, session: _SessionState) -> None:
    """Fault injection that kills another party of this host at a step (the fault matrix)."""

    if action == "stall":
        # A network stall of the control connection (no process dies): this
        # host's firewall drops its packets both ways from now on.
        firewall_drop(int(session.tls.getsockname()[1]))
        return
    if action in ("kill-platform", "kill-platform-and-enclave"):
        kill_dead([socket_owner(session.config.platform_socket)])
    if action in ("kill-enclave", "kill-platform-and-enclave"):
        kill_dead([pid for pid in session.enclave_pids() if pid > 0])


def _corrupt_images(images: Path) -> None:
    """Fault injection (``agent.before-restore:corrupt``): CRIU cannot read these images."""

    (images / "inventory.img").write_bytes(b"\0" * 16)


def _die_after_bytes(conn: socket.socket, limit: int) -> None:
    """Fault injection: SIGKILL this agent once ``conn`` has received ``limit`` bytes."""

    def watch() -> None:
        while True:
            try:
                info = conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
            except OSError:
                return
            # struct tcp_info: u64 tcpi_bytes_received at offset 128 (Linux >= 4.1).
            if len(info) >= 136 and int.from_bytes(info[128:136], "little") >= limit:
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(0.001)

    threading.Thread(target=watch, name="migsgx-fault", daemon=True).start()
