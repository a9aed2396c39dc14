"""One incoming migration on the destination agent (see :mod:`.protocol`).

What is restored, and how, is the business of the driver that ``begin`` names
(:mod:`migsgx.containers`: ``pid``, ``runc``, ``podman``); holding, committing
and resuming are the same for all of them.

Decision rule when the tool goes away: before the tree is held, abort; once it
is held, the enclaves decide.  If the source's COMMIT token reached them, the
source has given up its enclaves for good, so the agent rolls forward (resumes
the tree and attaches the enclaves); otherwise it aborts (kills the held tree,
aborts the incoming enclaves) and the source carries on.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import select
import signal
import socket
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Final

import cbor2

from .._net import keep_alive
from ..containers import Driver, HostConfig, Restored, RestoreRequest, make_driver
from ..containers.postcopy import PostCopyRestore, check_pipe_max_size
from ..criu.pageserver import PageServer, page_bytes
from ..datapath.engine import IncomingEnclave
from ..datapath.pagerelay import PageRelay, local_pair, relay_keys
from ..errors import (
    ConnectionClosedError,
    FrameError,
    LostAfterCommitError,
    MigSGXError,
    ProtocolError,
)
from ..host.appctl import info_from_wire, info_to_wire
from ..host.client import EnclaveInfo
from ..sgx.counters import CounterStore
from ..sgx.platform import COUNTERS
from ..system.process import continue_tree, wait_stopped
from ..wire import recv_frame, send_frame
from . import preflight
from .applink import AppLink
from .config import AgentHost
from .datalink import KEY_SIZE, accept_data, check_pinned
from .faults import (
    cutting_relay,
    fault,
    firewall_drop,
    kill_dead,
    socket_owner,
    tampering_relay,
)
from .held import HeldRecord, lost_detail, start_time
from .held import remove as remove_record
from .lazy import Window
from .protocol import (
    CONTROL,
    CONTROL_FRAME_MAX,
    MAX_ENCLAVES,
    MAX_IMAGE_BYTES,
    MAX_IMAGE_FILES,
    VERSION,
    AgentError,
    SessionMachine,
    SessionState,
    check_image_name,
    plain_stats,
)
from .reservations import release_reservations

__all__ = ["IncomingMigration"]

log = logging.getLogger("migsgx.agent")

DATA_HELLO_TIMEOUT: Final = 10.0
MAX_DATA_OPENINGS: Final = 2 * MAX_ENCLAVES
#: How long a delivered decision may take to be judged and carried out before
#: the deliverer hears "waiting" (and may deliver again).
DELIVER_WAIT: Final = 20.0
#: How long a fresh copy's listener waits for the state to come again.
REDELIVER_ACCEPT: Final = 30.0
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


def _shutdown(sock: socket.socket | None) -> None:
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()


class IncomingMigration:
    def __init__(self, agent: AgentHost, tls: ssl.SSLSocket | socket.socket, peer: str) -> None:
        self.agent = agent
        self.config = agent.config
        self.tls = tls
        self.peer = peer
        self.machine = SessionMachine()
        self.data_key = secrets.token_bytes(KEY_SIZE)
        self.session_id = b""
        self.images_dir: Path | None = None
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
        #: Enclaves whose connection was closed at the far end right after the attach.
        self.hung_up: list[int] = []
        self.source_host = ""
        self.handlers: dict[str, Callable[[dict[str, Any]], Reply]] = {
            "hello": self._hello,
            "begin": self._begin,
            "enclaves_done": self._enclaves_done,
            "image": self._image,
            "images_done": self._images_done,
            "restore": self._restore,
            "resume": self._resume,
            "redeliver": self._redeliver,
            "abort": self._abort_request,
            "deliver": self._deliver_request,
        }
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
        #: This end's address of the control connection (data listeners bind to it).
        self.local_address = ""

    @classmethod
    def adopt_held(cls, agent: AgentHost, directory: Path, record: HeldRecord) -> IncomingMigration:
        """A tree held by a dead agent, taken into a session held in doubt (:mod:`.held`).

        Its loaded copies ended with that agent: every enclave counts as lost
        before its decision, and the session waits for the state again from the
        source host (``redeliver`` on a connection of its own).  No tool will
        come back to it; an authentic decision that reaches a fresh copy ends
        it as usual.  A container is taken over from its engine (the driver's
        ``reclaim``: a :class:`ContainerError` unless the engine still knows it
        as the recorded tree), and then resumed or discarded by it as usual.
        """

        driver = make_driver(
            record.driver,
            HostConfig(agent.config.criu, agent.config.containers,
                       agent.config.platform_socket, agent.config.state),
        )  # fmt: skip
        restored = driver.reclaim(record.handle, record.root)
        session = cls(agent, socket.socket(), record.peer)  # no control connection
        session.tls.close()
        session.session_id = bytes.fromhex(record.session_id)
        session.images_dir = directory
        session.local_address = record.local
        session.enclaves = [
            _Enclave(i, EnclaveInfo(**info_from_wire(cbor2.loads(bytes.fromhex(item)))))
            for i, item in enumerate(record.enclaves)
        ]
        for enclave in session.enclaves:
            enclave.loaded.set()
            enclave.decided.set()  # (no copy: lost)
        session.driver = driver
        session.restored = restored
        session.root = record.root
        session._claim_fault_done = True  # the fault points are for the first agent
        session.machine.state = SessionState.HELD
        session.abort("adopted after the agent restarted", keep_lost=True)
        return session

    @property
    def tag(self) -> str:
        return self.session_id[:4].hex() or "-"

    # --- the request loop ------------------------------------------------------------------
    def run(self) -> None:
        self.tls.settimeout(self.config.io_timeout)
        while not self.machine.finished:
            try:
                msg = recv_frame(self.tls, CONTROL, max_size=CONTROL_FRAME_MAX)
            except (ConnectionClosedError, FrameError, OSError) as exc:
                self._lost(exc)
                return
            kind = msg["t"]
            try:
                self.machine.advance(kind)
                reply = self.handlers[kind](msg)
            except MigSGXError as exc:
                log.warning("migration %s: %s failed: %s", self.tag, kind, exc)
                if self.no_return:
                    # Committed enclaves or a running tree: never kill what may be the only copy.
                    self.machine.state = SessionState.RESUMED
                    self._cleanup()
                else:
                    self.machine.fail()
                    self.abort(f"{kind} failed")
                reply = {"t": "err", "code": exc.code, "message": exc.message}
            if reply is None:
                continue
            try:
                send_frame(self.tls, reply, max_size=CONTROL_FRAME_MAX)
            except (MigSGXError, OSError) as exc:
                self._lost(exc)
                return

    def give_up(self, reason: str) -> None:
        """End the session without the tool: the same rule as a lost connection."""

        self._lost(MigSGXError(reason))
        with contextlib.suppress(OSError):
            self.tls.close()

    def _lost(self, exc: BaseException) -> None:
        with self._decide_lock:
            self._decide_without_tool(exc)

    def _decide_without_tool(self, exc: BaseException) -> None:
        state = self.machine.state
        if state in (SessionState.RESUMED, SessionState.ABORTED):
            return
        log.warning("migration %s: the tool went away in state %s (%s)", self.tag, state.value, exc)
        if state == SessionState.HELD and self.enclaves and self._any_committed():
            log.warning("migration %s: the enclaves were committed: rolling forward", self.tag)
            self.rolled_forward = True
            try:
                self._resume_tree(self.config.commit_grace)
            except MigSGXError as err:
                log.error("migration %s: rolling forward failed: %s", self.tag, err)
            self.machine.state = SessionState.RESUMED
            self._cleanup()
            return
        self.machine.fail()
        # A loaded copy that died undecided may be one the source committed: the
        # tree is kept for the state to come again (the tool's own abort ends it).
        self.abort("the control connection was lost", keep_lost=state == SessionState.HELD)

    def outcome(self) -> str | None:
        """How the session ended, for the metrics; None for one that never began."""

        state = self.machine.state
        if state == SessionState.RESUMED:
            return "rolled_forward" if self.rolled_forward else "committed"
        if state == SessionState.ABORTED:
            return "aborted" if self.session_id else None
        return "failed" if self.session_id else None

    # --- requests ---------------------------------------------------------------------------
    def _hello(self, msg: dict[str, Any]) -> Reply:
        if msg["version"] != VERSION:
            raise ProtocolError(f"protocol version {msg['version']} is not {VERSION}")
        log.info("tool of host %s connected from %s", msg["host_id"], self.peer)
        self.source_host = str(msg["host_id"])[:64]
        return {"t": "welcome", "version": VERSION, "host_id": self.agent.host_id}

    def _begin(self, msg: dict[str, Any]) -> Reply:
        session_id = msg["session_id"]
        if not 16 <= len(session_id) <= 64:
            raise ProtocolError("a session id has 16 to 64 bytes")
        items = msg["enclaves"]
        if len(items) > MAX_ENCLAVES:
            raise ProtocolError(f"at most {MAX_ENCLAVES} enclaves per migration")
        for index, item in enumerate(items):
            if not isinstance(item, dict) or set(item) != {"info"}:
                raise ProtocolError("an enclave entry is {'info': ...}")
            self.enclaves.append(_Enclave(index, EnclaveInfo(**info_from_wire(item["info"]))))
        driver = msg.get("driver") or "pid"
        if not isinstance(driver, str) or len(driver) > 32:
            raise ProtocolError("bad driver name")
        config = self.config
        self.driver = make_driver(
            driver,
            HostConfig(config.criu, config.containers, config.platform_socket, config.state),
        )
        self.target = self.driver.check_target(msg.get("target") or {})
        # before the source freezes anything
        preflight.admit(self.driver, self.target, msg, config.containers.netns)
        if not msg["pidns"]:
            self._check_pids_free(msg["pids"])
        self.tcp_close = bool(msg["tcp_close"])
        self.page_tls = bool(msg["page_tls"])
        self.page_server = msg.get("page_server") is not False
        self.page_relay = bool(msg.get("page_relay")) and self.page_server
        if self.page_server and not (self.page_tls or self.page_relay):
            # An unauthenticated page stream could change the process's memory unseen.
            raise ProtocolError(
                "pages travel only integrity-protected (sealed relay or TLS): "
                "a plain page server is refused"
            )
        if self.page_relay and (self.page_tls or driver != "pid"):
            raise ProtocolError("the sealed page relay is for the pid driver, without CRIU's TLS")
        self.post_copy = bool(msg.get("post_copy"))
        if self.post_copy:
            if driver not in ("pid", "runc") or self.page_server or not self.page_tls:
                raise ProtocolError(
                    "post-copy is for the pid and runc drivers, in TLS, without a page server"
                )
            check_pipe_max_size()  # before the source freezes anything
        self.session_id = session_id
        self.images_dir = self.agent.session_dir(session_id)
        local = self.local_address = str(self.tls.getsockname()[0])
        page = self._listen(local)
        if self.page_server:
            self._page_thread = self._start(self._accept_page_server, page, "migsgx-agent-pages")
        data = self._listen(local)
        if self.enclaves:
            self._start(self._accept_data, data, "migsgx-agent-data")
        log.info(
            "migration %s from %s: %s, %d enclave(s)",
            self.tag, self.peer, driver, len(self.enclaves),
        )  # fmt: skip
        return {
            "t": "ready",
            "data_port": data.getsockname()[1],
            "page_port": page.getsockname()[1],
            "data_key": self.data_key,
        }

    def _enclaves_done(self, msg: dict[str, Any]) -> Reply:
        deadline = time.monotonic() + self.config.io_timeout
        for enclave in self.enclaves:
            if not enclave.loaded.wait(max(0.0, deadline - time.monotonic())):
                raise AgentError(f"enclave {enclave.index}: no load within the time limit")
            if enclave.error is not None:
                err = enclave.error
                raise AgentError(
                    f"enclave {enclave.index}: the load failed: {type(err).__name__}: {err}"
                ) from err
        metrics = self.agent.metrics
        for enclave in self.enclaves:
            metrics.observe_phase("enclave_receive", float(enclave.stats.get("agent_seconds", 0)))
            metrics.bytes.labels("enclave").inc(int(enclave.stats.get("bytes", 0)))
        if self.enclaves:
            metrics.enclaves_received.labels(self.source_host or "?").inc(len(self.enclaves))
        return {"t": "enclaves_ready", "stats": [e.stats for e in self.enclaves]}

    def _image(self, msg: dict[str, Any]) -> Reply:
        assert self.images_dir is not None
        name = check_image_name(msg["name"])
        if not self._files:
            self._images_t0 = time.monotonic()
        out = self._files.get(name)
        if out is None:
            if len(self._files) >= MAX_IMAGE_FILES:
                raise ProtocolError("too many image files")
            fd = os.open(
                self.images_dir / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600
            )
            out = self._files[name] = os.fdopen(fd, "wb")
        self._image_bytes += len(msg["data"])
        if self._image_bytes > MAX_IMAGE_BYTES:
            raise ProtocolError("the images exceed the size cap")
        out.write(msg["data"])
        return None

    def _images_done(self, msg: dict[str, Any]) -> Reply:
        assert self.images_dir is not None
        files = self._close_files()
        if msg["files"] != files or msg["bytes"] != self._image_bytes:
            raise ProtocolError(
                f"image stream incomplete: {files} files / {self._image_bytes} bytes received, "
                f"{msg['files']} / {msg['bytes']} announced"
            )
        if self.page_server:
            assert self._page_thread is not None
            self._page_thread.join(self.config.io_timeout)
            if self._page_error is not None:
                raise AgentError(f"page server: {self._page_error}") from self._page_error
            if self._page_server is None:
                raise AgentError("the source never connected to the page server")
            self._page_server.wait(self.config.io_timeout)
            if self._relay is not None:
                # Every page frame opened, the last one came: else nothing of it counts.
                self._relay.finish(self.config.io_timeout)
        pages = page_bytes(self.images_dir)
        seconds = time.monotonic() - (self._images_t0 or time.monotonic())
        self.agent.metrics.observe_phase("images", seconds)
        self.agent.metrics.bytes.labels("images").inc(self._image_bytes + pages)
        return {"t": "images_ok", "page_bytes": pages, "seconds": seconds}

    def _restore(self, msg: dict[str, Any]) -> Reply:
        assert self.images_dir is not None and self.driver is not None
        action = fault("agent.before-restore")
        _inject(action, self)
        corrupt = action == "corrupt"
        t0 = time.monotonic()
        if self.post_copy:
            restored = self._restore_lazy(msg.get("lazy_port"), corrupt)
        else:
            restored = self.driver.restore(
                RestoreRequest(
                    images=self.images_dir,
                    target=self.target,
                    tcp_close=self.tcp_close,
                    before=_corrupt_images if corrupt else None,
                )
            )
        self.restored = restored
        pid = self.root = restored.pid
        for adopted in (pid, *restored.adopt):
            self.agent.adopt(adopted)
        wait_stopped(pid)
        _inject(fault("agent.after-restore"), self)
        # Right before the source may commit: every loaded copy must still be there.
        self._check_enclaves_alive()
        if self.enclaves and self.window is None:
            # What a restarted agent adopts if this one dies holding the tree (W2).
            HeldRecord(
                self.session_id.hex(), pid, start_time(pid), self.driver.name, self.peer,
                self.local_address,
                [cbor2.dumps(info_to_wire(e.source_info)).hex() for e in self.enclaves],
                [e.engine.migration_id.hex() if e.engine else "" for e in self.enclaves],
                {k: str(v) for k, v in restored.handle.items()},
                [[p, start_time(p)] for p in self.enclave_pids()],
            ).write(self.images_dir)  # fmt: skip
        if self.window is not None and not self.window.post.serving:
            raise AgentError("the source stopped serving process pages before the commit point")
        seconds = time.monotonic() - t0
        self.agent.metrics.observe_phase("restore", seconds)
        log.info(
            "migration %s: restored %s (pid %d), held, in %.3f s",
            self.tag, restored.label, pid, seconds,
        )  # fmt: skip
        return {"t": "restored", "pid": pid, "seconds": seconds}

    def _restore_lazy(self, port: Any, corrupt: bool) -> Restored:
        """The tree from the images, held; its private memory stays on the source."""

        assert self.images_dir is not None
        if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
            raise ProtocolError("post-copy: restore names the port the source serves pages on")
        if corrupt:
            _corrupt_images(self.images_dir)
        ident = self.config.identity
        # Pages come only from the authenticated peer of this session, in TLS.
        post = PostCopyRestore(
            self.config.criu, self.images_dir, (self.peer, port),
            tls=(ident.ca, ident.cert, ident.key),
        )  # fmt: skip
        driver, images = self.driver, self.images_dir
        assert driver is not None
        if driver.name == "pid":
            self.window = Window(post, self.config.io_timeout, self.tag)
            pid = post.restore(run=False, file_locks=True, tcp_close=self.tcp_close)
            return Restored(pid=pid, label=f"process {pid}")
        # A container: its engine restores (``restore --lazy-pages``, held), and a
        # tree killed in the window goes with its container.
        made: list[Restored] = []

        def by_engine() -> int:
            made.append(driver.restore(RestoreRequest(
                images=images, target=self.target, tcp_close=self.tcp_close, lazy_pages=True,
            )))  # fmt: skip
            return made[0].pid

        def lost() -> None:
            with contextlib.suppress(MigSGXError):
                driver.discard(made[0])

        self.window = Window(post, self.config.io_timeout, self.tag, on_lost=lost)
        post.restore(run=False, by=by_engine)
        return made[0]

    def _resume(self, msg: dict[str, Any]) -> Reply:
        t0 = time.monotonic()
        _inject(fault("agent.before-resume"), self)
        self._pass_on(msg.get("tokens"))
        self._wait_judged(self.config.io_timeout)
        try:
            attach_seconds = self._resume_tree(self.config.io_timeout)
        except MigSGXError as exc:
            if self.window is not None and self.window.watching:
                self.window.wait()  # a tree that died of a lost source: say so
            if self.window is None and self.no_return:
                self._check_activated(exc)
            raise
        assert self.root is not None
        if self.window is None:
            self._check_activated(None)
        log.info("migration %s: resumed pid %d", self.tag, self.root)
        self.agent.metrics.observe_phase("resume", time.monotonic() - t0)
        resumed = {
            "t": "resumed",
            "seconds": time.monotonic() - t0,
            "attach_seconds": attach_seconds,
            "pid": self.root,
        }
        if self.window is None:
            self._cleanup()
            return resumed
        # Post-copy: the tool hears "resumed" at once, then whether the window closed.
        try:
            send_frame(self.tls, resumed, max_size=CONTROL_FRAME_MAX)
        except (MigSGXError, OSError) as exc:  # the tree runs and its window is watched
            log.warning("migration %s: the tool did not hear resumed: %s", self.tag, exc)
        try:
            report = self.window.wait()
        finally:
            self._cleanup()
        self.agent.metrics.observe_phase("post_copy_window", report.window_seconds)
        return {"t": "window", "seconds": report.window_seconds}

    def _redeliver(self, msg: dict[str, Any]) -> Reply:
        """A fresh enclave for one whose copy was lost after LOADED, before its claim.

        Window W2 (``docs/spec/commit.md``): the source committed, the tree is
        held here, and the enclave that loaded the state died (or its link
        did).  The committed source enclave still holds the state; it comes
        again, authenticated and attested like the first time, on a new data
        connection, to a fresh enclave launched by the same code path.  The
        claim store of this host lets the migration id activate once, so a copy
        that is in fact alive (and then claims) makes the fresh one a refused
        replay, never a second copy.  An enclave that still answers is not
        replaced (port 0): the token reaches it with ``resume``.
        """

        if msg.get("session_id") is not None:
            return self._redeliver_request(msg)
        return {"t": "redelivery", "data_port": self.redeliver(msg["index"])}

    def _redeliver_request(self, msg: dict[str, Any]) -> Reply:
        """The same, on a connection of its own: the source's guardian, no tool.

        Only for a session held in doubt, and only from the host that began it
        (the data key of that session goes back on this mutual-TLS connection,
        as it went to the tool in ``ready``).
        """

        target = self.agent.find_session(msg["session_id"], besides=self)
        if target is None or target.session_id not in self.agent.in_doubt():
            raise AgentError("no session held in doubt for this migration")
        if target.peer != self.peer:
            raise AgentError("the state comes again only from the host that began the session")
        port = target.redeliver(msg["index"])
        return {"t": "redelivery", "data_port": port, "data_key": target.data_key}

    def redeliver(self, index: int) -> int:
        """Replace enclave ``index``'s lost copy by a fresh listener; its port (0: none)."""

        if not 0 <= index < len(self.enclaves):
            raise ProtocolError("no such enclave")
        old = self.enclaves[index]
        engine = old.engine
        if old.ecall_sock is not None or (engine is not None and engine.decided):
            return 0  # it runs, or a decision ended it
        if engine is not None and _answers(engine):
            return 0  # a live copy is never replaced
        if engine is None and not old.decided.is_set():
            return 0  # still arriving
        log.warning(
            "migration %s: enclave %d lost its copy before the claim: a fresh one receives "
            "the state again", self.tag, index,
        )  # fmt: skip
        _shutdown(old.conn)
        self.enclaves[index] = _Enclave(index, old.source_info)
        self._refilled.set()
        listener = self._listen(self.local_address)
        listener.settimeout(REDELIVER_ACCEPT)
        threading.Thread(
            target=self._accept_data, args=(listener, {index}),
            name="migsgx-agent-data", daemon=True,
        ).start()  # fmt: skip
        return int(listener.getsockname()[1])

    def _wait_judged(self, seconds: float) -> None:
        """Until every enclave decided; an error at once if the undecided ones wait for
        their platform service (the session is then held in doubt: ``abort`` holds it)."""

        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            waiting = [e for e in self.enclaves if not e.decided.is_set()]
            if not waiting:
                return
            if all(e.engine is not None and e.engine.platform_blocked for e in waiting):
                raise AgentError(
                    "the platform service of this host is gone: the loaded copies cannot "
                    "claim their migration; held in doubt until it is back (migsgx recover)"
                )
            time.sleep(0.02)

    def _abort_request(self, msg: dict[str, Any]) -> Reply:
        log.info("migration %s: aborted by the tool (%s)", self.tag, msg["reason"][:200])
        frames = msg.get("frames")
        self._pass_on(frames)
        # Only an enclave that got an ABORT frame can be judged: one whose source
        # enclave died has none, and waiting for it only kept the tool (and the
        # source tree it thaws after this answer) waiting DELIVER_WAIT.
        judged = [e for e, f in zip(self.enclaves, frames or [], strict=False) if f]
        if judged:
            self._wait_decided(DELIVER_WAIT, judged)
        self.abort("aborted by the tool")
        return {"t": "aborted", "held": self.agent.find_session(self.session_id) is self}

    def _deliver_request(self, msg: dict[str, Any]) -> Reply:
        """A decision delivered again, on a connection of its own (``migsgx recover``)."""

        target = self.agent.find_session(msg["session_id"], besides=self)
        aborted = msg.get("decision") == "abort"
        if target is not None:
            if aborted and target.peer != self.peer:
                raise AgentError("an abort comes only from the host that began the session")
            return {"t": "delivered", **target.deliver(msg["frames"], source_aborted=aborted)}
        # No such session (it ended): a restarted agent found its tree with the ids
        # claimed (W3), or this host's platform store (its claims) says whether it ran.
        lost = lost_detail(self.config.work_dir, msg["session_id"])
        if lost is not None:
            return {"t": "delivered", "outcome": LostAfterCommitError.code, "pid": 0}
        mids = msg.get("enclave_mids") or []
        store = self.config.state / COUNTERS
        if not store.exists():  # (opening it would create it)
            return {"t": "delivered", "outcome": "unknown", "pid": 0}
        claims = CounterStore(store)
        if mids and all(isinstance(m, bytes) and claims.claimed_by_any(m) for m in mids):
            return {"t": "delivered", "outcome": "resumed", "pid": 0}
        # No session of this agent holds these arrivals: a name their dead enclaves
        # reserved must not refuse later arrivals.
        live = self.agent.live_arrivals()
        unclaimed = [m for m in mids if isinstance(m, bytes) and not claims.claimed_by_any(m)]
        with contextlib.suppress(MigSGXError, OSError):
            release_reservations(self.config.state, [m for m in unclaimed if m not in live])
        return {"t": "delivered", "outcome": "unknown", "pid": 0}

    # --- decisions delivered again ---------------------------------------------------------
    def _pass_on(self, frames: Any) -> None:
        """Hand decision frames (one per enclave, b"" for none) to the waiting enclaves."""

        if frames is None:
            return
        if len(frames) != len(self.enclaves) or not all(isinstance(f, bytes) for f in frames):
            raise ProtocolError("one decision frame (bytes) per enclave")
        for enclave, frame in zip(self.enclaves, frames, strict=True):
            if frame and enclave.engine is not None and not enclave.decided.is_set():
                enclave.engine.deliver(frame)

    def _wait_decided(self, seconds: float, enclaves: Sequence[_Enclave] | None = None) -> bool:
        deadline = time.monotonic() + seconds
        return all(
            e.decided.wait(max(0.0, deadline - time.monotonic()))
            for e in (self.enclaves if enclaves is None else enclaves)
        )

    def deliver(self, frames: Any, *, source_aborted: bool = False) -> dict[str, Any]:
        """Judge delivered frames; the outcome once carried out (or ``waiting``).

        ``source_aborted``: the source host's store holds ABORT decisions (the
        caller checked that this comes from the host that began the session).
        A live copy still judges its frame itself; a copy that died undecided
        can judge nothing, and no state will come again for it: the tree held
        for it is discarded (rather than left stopped for an operator).
        """

        if source_aborted and not self.source_aborted:
            log.info("migration %s: the source host aborted it: a lost copy keeps nothing",
                     self.tag)  # fmt: skip
            self.source_aborted = True
            self._refilled.set()  # (a settle waiting for the state again looks once more)
        self._pass_on(frames)
        deadline = time.monotonic() + DELIVER_WAIT
        with contextlib.suppress(AgentError):  # (its platform service is gone: "waiting")
            self._wait_judged(DELIVER_WAIT)
        if self._copies_lost():
            return {"outcome": "copy-lost", "pid": self.root or 0}
        if all(e.decided.is_set() for e in self.enclaves):
            self.settled.wait(max(0.0, deadline - time.monotonic()))
        return {"outcome": self.decided_outcome or "waiting", "pid": self.root or 0}

    def _awaiting(self) -> list[_Enclave]:
        """Enclaves past LOADED without a decision: each may hold the only copy."""

        return [
            e
            for e in self.enclaves
            if e.engine is not None and e.engine.awaiting and not e.decided.is_set()
        ]

    def _hold(self, reason: str) -> None:
        """Keep everything (held tree, enclaves) until the source's decision arrives."""

        log.warning(
            "migration %s: %s, but %d enclave(s) confirmed their load: kept in doubt until the "
            "source's decision is delivered (migsgx recover)",
            self.tag, reason, len(self._awaiting()),
        )  # fmt: skip
        self.agent.hold(self)
        for sock in self._listeners:
            with contextlib.suppress(OSError):
                sock.close()
        self._stop_pages()
        threading.Thread(target=self._settle, name="migsgx-agent-settle", daemon=True).start()

    def _copies_lost(self) -> bool:
        """Whether the held tree waits for its state again (window W2, no tool).

        Every enclave is done, none by an authentic ABORT (or a refused replay),
        and at least one loaded copy died without judging a decision: the source
        may have committed, and then its frozen enclave can deliver the state
        again (:meth:`redeliver`).  The death of a copy is not a decision, so
        the tree is kept; only when the tool went away (:attr:`keep_lost`): a
        tool that is there aborts by itself (and delivers again by itself).
        """

        enclaves = list(self.enclaves)
        if self.source_aborted or not self.keep_lost:
            return False
        if not all(e.decided.is_set() for e in enclaves):
            return False
        if any(e.engine is not None and e.engine.decided and e.ecall_sock is None
               for e in enclaves):  # fmt: skip
            return False
        return any(e.ecall_sock is None for e in enclaves) and self.root is not None

    def _settle(self) -> None:
        while True:
            enclaves = list(self.enclaves)
            for enclave in enclaves:
                enclave.decided.wait()
            if any(a is not b for a, b in zip(enclaves, self.enclaves, strict=True)):
                continue  # a lost copy was replaced meanwhile
            if not self._copies_lost():
                break
            log.warning(
                "migration %s: a loaded copy died before its decision: the tree stays held "
                "for the state to come again (migsgx recover on the source host)", self.tag,
            )  # fmt: skip
            self.decided_outcome = "copy-lost"
            self._refilled.wait()
            self._refilled.clear()
            self.decided_outcome = ""
        with self._decide_lock:
            committed = [e for e in self.enclaves if e.ecall_sock is not None]
            if committed:
                self.no_return = True
                if len(committed) == len(self.enclaves) and self.root is not None:
                    try:
                        self._resume_tree(self.config.io_timeout)
                        self.decided_outcome = "resumed"
                        if self.window is None:
                            self._check_activated(None)
                        log.info("migration %s: decision delivered: resumed", self.tag)
                    except LostAfterCommitError:
                        self.decided_outcome = LostAfterCommitError.code
                    except MigSGXError as exc:
                        self.decided_outcome = "failed"
                        log.error("migration %s: rolling forward failed: %s", self.tag, exc)
                else:
                    self.decided_outcome = "partial"
                    log.error("migration %s: only some enclaves committed: left held", self.tag)
            else:
                log.info("migration %s: decision delivered: aborted", self.tag)
                self._discard_all()
                self.decided_outcome = "aborted"
            self._teardown()
            self.machine.state = (
                SessionState.RESUMED
                if self.decided_outcome in ("resumed", LostAfterCommitError.code)
                else SessionState.ABORTED
            )
        self.settled.set()
        self.agent.unhold(self)

    def _check_enclaves_alive(self) -> None:
        """Each incoming enclave answers, and so does the platform that must claim its id.

        The source commits only after ``restored``: a copy that died before is
        found here, and the migration aborts with the source running on.
        """

        if not self.enclaves:
            return
        if not _platform_alive(self.config.platform_socket):
            raise AgentError("the platform service of this host is gone")
        for enclave in self.enclaves:
            link = getattr(enclave.engine, "link", None)
            try:
                if link is None or enclave.decided.is_set():
                    raise AgentError("no longer waiting for the decision")
                link.call("__mig_status")
            except MigSGXError as exc:
                raise AgentError(f"enclave {enclave.index} is gone: {exc}") from exc

    def _check_activated(self, cause: MigSGXError | None) -> None:
        """Right before ``resumed``: the activated enclaves and their platform still run.

        Window W3 (``docs/spec/commit.md``): an enclave that claimed the id and
        died before (or while) the tree was attached leaves the application
        running without it.  That is not success, and not in doubt either (the
        id was claimed: the state must never be delivered again): the tool hears
        ``lost-after-commit``.  The tree is left running, as after the crash of
        a live enclave.
        """

        gone = [
            f"enclave {e.index} (pid {pid})"
            for e, pid in zip(self.enclaves, self.enclave_pids(), strict=True)
            if not _pid_alive(pid)
            or e.index in self.hung_up
            or (e.ecall_sock is not None and _hung_up(e.ecall_sock))
        ]
        if self.enclaves and not _platform_alive(self.config.platform_socket):
            gone.append("this host's platform service")
        if not gone:
            return
        log.error("migration %s: lost after the commit: %s", self.tag, ", ".join(gone))
        raise LostAfterCommitError(
            f"committed and claimed, but {', '.join(gone)} ended before the tree was attached: "
            f"the application (pid {self.root}) runs without its enclave; the state is lost"
        ) from cause

    def arrivals(self) -> set[bytes]:
        """The migration ids this session's enclaves loaded (or are loading)."""

        return {e.engine.migration_id for e in self.enclaves if e.engine is not None} - {b""}

    def enclave_pids(self) -> list[int]:
        return [int(getattr(getattr(e.engine, "info", None), "pid", 0)) for e in self.enclaves]

    # --- the hand-over -----------------------------------------------------------------------
    def _any_committed(self) -> bool:
        deadline = time.monotonic() + self.config.commit_grace
        for enclave in self.enclaves:
            enclave.decided.wait(max(0.0, deadline - time.monotonic()))
        return any(e.ecall_sock is not None for e in self.enclaves)

    def _resume_tree(self, commit_timeout: float) -> float:
        """Enclaves active, tree running, enclaves attached; returns the attach time."""

        assert self.root is not None
        deadline = time.monotonic() + commit_timeout
        for enclave in self.enclaves:
            enclave.decided.wait(max(0.0, deadline - time.monotonic()))
        if any(e.ecall_sock is not None for e in self.enclaves):
            self.no_return = True
        for enclave in self.enclaves:
            if enclave.ecall_sock is None:
                cause = enclave.commit_error
                raise AgentError(f"enclave {enclave.index}: no commit: {cause}") from cause
        self.no_return = True
        if self.restored is not None and self.restored.before_resume is not None:
            self.restored.before_resume()
        if self.window is not None:
            self.window.run()  # its missing pages come from the source from now on
        else:
            continue_tree(self.root)
        t0 = time.monotonic()
        link = AppLink.find(self.root)
        if link is None:
            if self.enclaves:
                raise AgentError("the restored application has no migration control to attach to")
            return 0.0
        socks = [e.ecall_sock for e in self.enclaves if e.ecall_sock is not None]
        infos = [getattr(e.engine, "info", None) or e.source_info for e in self.enclaves]
        if self.enclaves:
            link.attach(socks, infos)
        # Whose enclave end is closed (the enclave died): read by _check_activated.
        self.hung_up = [e.index for e in self.enclaves if _hung_up(e.ecall_sock)]
        for sock in socks:
            sock.close()
        return time.monotonic() - t0

    def abort(self, reason: str, *, keep_lost: bool = False) -> None:
        """Undo everything this session made; idempotent.

        Held instead while an enclave past LOADED waits for its decision, and,
        with ``keep_lost``, while the tree waits for a lost copy's state again.
        """

        with self._lock:
            if self._finished:
                return
            self._finished = True
        if self.no_return:
            log.error("migration %s: not aborting (%s): past the commit point", self.tag, reason)
            self._teardown()
            return
        self.keep_lost = keep_lost
        if self._awaiting() or self._copies_lost():
            self._hold(reason)
            return
        log.info("migration %s: aborting: %s", self.tag, reason)
        self._discard_all()
        self._teardown()
        self.decided_outcome = "aborted"
        self.settled.set()

    def _discard_all(self) -> None:
        if self.restored is not None and self.driver is not None:
            try:
                self.driver.discard(self.restored)
            except MigSGXError as exc:
                log.error("migration %s: %s not removed: %s", self.tag, self.restored.label, exc)
        for enclave in self.enclaves:
            _shutdown(enclave.conn)
            if enclave.engine is not None:
                with contextlib.suppress(Exception):
                    enclave.engine.abort()
        # An enclave that died after LOADED could not release the name it reserved.
        mids = [e.engine.migration_id for e in self.enclaves if e.engine is not None]
        with contextlib.suppress(MigSGXError, OSError):
            release_reservations(self.config.state, mids)

    def _cleanup(self) -> None:
        with self._lock:
            self._finished = True
        self._teardown()
        if self.machine.state is SessionState.RESUMED:
            self.decided_outcome = "resumed"
        self.settled.set()

    def _teardown(self) -> None:
        if self.window is not None:
            self.window.close()  # (a running tree's window closes on its own)
        for sock in self._listeners:
            with contextlib.suppress(OSError):
                sock.close()
        self._stop_pages()
        self._close_files()
        remove_record(self.images_dir)
        self.agent.discard(self.images_dir)

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

    def _accept_page_server(self, listener: socket.socket) -> None:
        assert self.images_dir is not None
        try:
            while True:
                conn, addr = listener.accept()
                if addr[0] == self.peer:
                    break
                log.warning("migration %s: page connection from %s refused", self.tag, addr[0])
                conn.close()
            keep_alive(conn)  # a stalled network fails the page stream in seconds
            ident = self.config.identity
            tls = (ident.ca, ident.cert, ident.key) if self.page_tls else None
            action = fault("agent.page-stream")
            if action is not None and "-after-bytes=" in action:
                # ``drop-after-bytes=N``, ``stall-after-bytes=N``: mid-dump.
                kind, _, after = action.partition("-after-bytes=")
                conn = cutting_relay(conn, int(after), kind)
            elif action is not None:
                conn = tampering_relay(conn, action)
            if self.page_relay:
                ours, theirs = local_pair()
                with theirs:
                    self._page_server = PageServer(self.config.criu.binary, self.images_dir, theirs)
                keys = relay_keys(self.data_key, self.session_id, source=False)
                self._relay = PageRelay(ours, conn, **keys).start()
                return
            with conn:
                self._page_server = PageServer(
                    self.config.criu.binary, self.images_dir, conn, tls=tls
                )
        except (OSError, MigSGXError) as exc:
            self._page_error = exc

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
                offered = True
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
                    timeout=None, before_claim=self._before_claim, after_claim=self._after_claim
                )
            except BaseException as exc:
                enclave.commit_error = exc
        finally:
            enclave.decided.set()

    def _before_claim(self) -> None:
        """Fault injection at W2: a decision frame is about to be judged (once a session)."""

        if not self._claim_fault_done:
            self._claim_fault_done = True
            _inject(fault("agent.before-claim"), self)

    def _after_claim(self) -> None:
        """Fault injection at W3: an enclave claimed the id and runs, not yet attached."""

        _inject(fault("agent.after-claim"), self)

    def _close_files(self) -> int:
        count = len(self._files)
        for out in self._files.values():
            with contextlib.suppress(OSError):
                out.close()
        return count


def _platform_alive(path: Path) -> bool:
    """Whether the platform service that listens on ``path`` still runs.

    A connection alone does not tell: a child the service forked may still
    hold the listening socket for a moment after the service died, and the
    kernel then queues connections for nobody.  The process that listened
    (``SO_PEERCRED``) must be alive and not a zombie.
    """

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(2.0)
        sock.connect(str(path))
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
    except OSError:
        return False
    finally:
        sock.close()
    pid = int.from_bytes(creds[:4], "little")
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2 :][:1] not in ("Z", "X")


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie does not).

    The enclave's pid as it reported it: the agent and its platform service share
    a pid namespace (as the fault hooks assume).  Its connection alone does not
    tell at once: the sandbox launcher may hold a copy for a moment after it died.
    """

    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return pid > 0 and stat[stat.rindex(")") + 2 :][:1] not in ("Z", "X")


def _hung_up(sock: socket.socket | None) -> bool:
    """Whether the enclave at the other end of ``sock`` closed it (it died).

    Polled, never read: the application shares the connection.  Independent of
    pid namespaces (the enclave's pid may be another namespace's).
    """

    if sock is None or sock.fileno() < 0:
        return False
    poller = select.poll()
    poller.register(sock, select.POLLRDHUP | select.POLLHUP | select.POLLERR)
    return bool(poller.poll(0))


def _answers(engine: IncomingEnclave) -> bool:
    """Whether an incoming enclave's process still answers on its link."""

    link = engine.link
    if link is None:
        return False
    try:
        link.call("__mig_status")
    except MigSGXError:
        return False
    return True


def _inject(action: str | None, session: IncomingMigration) -> None:
    """Fault injection that kills another party of this host at a step (the fault matrix)."""

    if action == "stall":
        # A network stall of the control connection (no process dies): this
        # host's firewall drops its packets both ways from now on.
        firewall_drop(int(session.tls.getsockname()[1]))
        return
    if action == "kill-platform":
        kill_dead([socket_owner(session.config.platform_socket)])
    elif action == "kill-enclave":
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
