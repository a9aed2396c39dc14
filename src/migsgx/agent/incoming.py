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
import socket
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cbor2

from ..containers import HostConfig, Restored, RestoreRequest, make_driver
from ..containers.postcopy import PostCopyRestore, check_pipe_max_size
from ..criu.pageserver import page_bytes
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
from ..system.process import wait_stopped
from ..wire import recv_frame, send_frame
from . import preflight
from .config import AgentHost
from .faults import armed, fault
from .held import HeldRecord, lost_detail, start_time
from .held import remove as remove_record
from .imageroom import fs_type, place_images
from .incoming_data import Reply, _corrupt_images, _Enclave, _inject
from .incoming_settle import DELIVER_WAIT, _SessionDecisions
from .lazy import Window
from .protocol import (
    CONTROL,
    CONTROL_FRAME_MAX,
    MAX_ENCLAVES,
    MAX_IMAGE_BYTES,
    MAX_IMAGE_FILES,
    AgentError,
    PastCommitError,
    SessionState,
    check_image_name,
)
from .refusal import refusable_note, serve_refusal
from .reservations import release_reservations
from .resumed import was_resumed
from .versions import (
    OVERLAPPED_ORDER,
    ProtocolVersionError,
    agent_choice,
    check_version,
    for_version,
)

__all__ = ["IncomingMigration"]

log = logging.getLogger("migsgx.agent")

#: The states of the overlapped order (version 2 on).
_OVERLAPPED = frozenset(
    {SessionState.EARLY_IMAGES, SessionState.EARLY_IMAGES_COMPLETE, SessionState.HELD_LOADING}
)


class IncomingMigration(_SessionDecisions):
    def __init__(self, agent: AgentHost, tls: ssl.SSLSocket | socket.socket, peer: str) -> None:
        super().__init__(agent, tls, peer)
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
            "refuse": self._refuse_request,
        }

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
        session.session_dir = directory  # (its images went with the dead agent: swept)
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
                check_version(msg, self.version)  # strict: no field of a newer version
                if self.version < OVERLAPPED_ORDER and self.machine.state in _OVERLAPPED:
                    raise ProtocolError(
                        f"{kind!r} before enclaves_done is not in control protocol version "
                        f"{self.version}"
                    )
                reply = self.handlers[kind](msg)
            except MigSGXError as exc:
                log.warning("migration %s: %s failed: %s", self.tag, kind, exc)
                decided = self.no_return and not self.enclaves and self.window is None
                if kind == "resume" and decided:
                    # Past the recorded resume (the commit point of a tree without
                    # enclaves; not post-copy's, whose tree runs only with its window):
                    # the tree runs, and the tool must not give its source back.
                    self._continue_decided()
                    exc = PastCommitError(
                        f"the resume was recorded (the commit point), then: {exc.message}"
                    )
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
                # A tool of an older version reads only the fields it knows.
                send_frame(self.tls, for_version(reply, self.version), max_size=CONTROL_FRAME_MAX)
            except (MigSGXError, OSError) as exc:
                self._lost(exc)
                return
            finally:
                self._discard_pending()

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
        # The older of the tool's offer and this agent's newest; a tool older than
        # ``--min-protocol`` is refused here, before anything of it is looked at.
        try:
            self.version = agent_choice(msg["version"], self.config.min_protocol)
        except ProtocolVersionError:
            self.agent.metrics.greeted(None)
            raise
        self.agent.metrics.greeted(self.version)
        log.info(
            "tool of host %s connected from %s, control protocol version %d (offered %d)",
            str(msg["host_id"])[:64], self.peer, self.version, msg["version"],
        )  # fmt: skip
        self.source_host = str(msg["host_id"])[:64]
        return {"t": "welcome", "version": self.version, "host_id": self.agent.host_id}

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
        self.session_dir = self.agent.session_dir(session_id)
        memory = msg.get("memory_bytes")  # (None: a tool of version 1 announces nothing)
        self.images_dir = place_images(
            self.session_dir,
            memory if isinstance(memory, int) and not isinstance(memory, bool) else None,
            enclave_bytes=sum(e.source_info.memory_size for e in self.enclaves),
            in_ram=self.config.images_in_ram and not self.config.keep_images,
            tag=self.tag,
        )
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
        t0 = time.monotonic()
        deadline = t0 + self.config.io_timeout
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
        if self.machine.state is SessionState.HELD:
            self._held_after_loading(time.monotonic() - t0)
        return {"t": "enclaves_ready", "stats": [e.stats for e in self.enclaves]}

    def _held_after_loading(self, waited: float) -> None:
        """Overlapped: the tree was restored while the enclaves loaded; now they all
        did.  The record names every loaded copy and is answered (fsync'd) only
        after the liveness check, right before ``enclaves_ready``: from then on
        the source may commit, and a restarted agent adopts the tree."""

        assert self.restored is not None
        _inject(fault("agent.enclaves-loaded"), self)
        record = self._held_record(self.restored)
        record.write(self._records())  # (the arrivals and the enclaves' processes)
        # Right before the source may commit: every loaded copy must still be there.
        self._check_enclaves_alive()
        # What a restarted agent adopts (W2), or finishes by the resume marker (a tree
        # without enclaves), if this one dies holding the tree.
        record.answered = True
        record.write(self._records())
        log.info(
            "migration %s: every enclave loaded beside the restore (%.3f s waited): held",
            self.tag, waited,
        )  # fmt: skip

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
        return {
            "t": "images_ok",
            "page_bytes": pages,
            "seconds": seconds,
            "images_fs": fs_type(self.images_dir),
        }

    def _restore(self, msg: dict[str, Any]) -> Reply:
        assert self.images_dir is not None and self.driver is not None
        action = fault("agent.before-restore")
        _inject(action, self)
        corrupt = action == "corrupt"
        t0 = time.monotonic()
        # What a restarted agent removes if this one dies inside the restore.
        self._intent_record().write(self._records())
        try:
            if self.post_copy:
                restored = self._restore_lazy(msg.get("lazy_port"), corrupt)
            else:
                restored = self.driver.restore(
                    RestoreRequest(
                        images=self.images_dir,
                        target=self.target,
                        tcp_close=self.tcp_close,
                        before=_corrupt_images if corrupt else None,
                        owner=self.session_id.hex(),
                        made=(lambda: _inject(fault("agent.in-restore"), self))
                        if self.driver.name != "pid" or armed("agent.in-restore")
                        else None,
                        made_tree=self._record_made_tree,
                        spend_images=self.config.spend_images and not self.config.keep_images,
                    )
                )
        except BaseException:
            remove_record(self.session_dir)  # (the driver removed what it made)
            raise
        self.restored = restored
        pid = self.root = restored.pid
        for adopted in (pid, *restored.adopt):
            self.agent.adopt(adopted)
        wait_stopped(pid)
        # What a restarted agent removes if this one dies before it answers.
        record = self._held_record(restored)
        record.write(self._records())
        _inject(fault("agent.after-restore"), self)
        loading = self.machine.state is SessionState.HELD_LOADING
        if not loading:
            # Right before the source may commit: every loaded copy must still be there.
            self._check_enclaves_alive()
            # What a restarted agent adopts (W2), or finishes by the resume marker (a tree
            # without enclaves: :mod:`.adoption`), if this one dies holding the tree.
            record.answered = True
            record.write(self._records())
        if self.window is not None and not self.window.post.serving:
            raise AgentError("the source stopped serving process pages before the commit point")
        seconds = time.monotonic() - t0
        self.agent.metrics.observe_phase("restore", seconds)
        log.info(
            "migration %s: restored %s (pid %d), held%s, in %.3f s",
            self.tag, restored.label, pid, " (enclaves still loading)" if loading else "",
            seconds,
        )  # fmt: skip
        return {"t": "restored", "pid": pid, "seconds": seconds}

    def _intent_record(self) -> HeldRecord:
        """The record of a restore not yet returned (:mod:`.held`): a container's
        name; a process tree's root once CRIU made it (:meth:`_record_made_tree`)."""

        assert self.driver is not None
        return HeldRecord(
            self.session_id.hex(), 0, 0, self.driver.name, self.peer, self.local_address, [],
            handle={k: str(self.target[k]) for k in ("id", "name") if k in self.target},
            answered=False, restoring=True, lazy_pages=self._lazy_pages(),
        )  # fmt: skip

    def _record_made_tree(self, root: int) -> None:
        """CRIU restored every task of the process tree, rooted at ``root`` (its pid
        here, the images' pids being those inside its pid namespace), and waits for
        this answer before it lets them go: the intent names the tree from now on
        (pid and start time), so that a restarted agent kills exactly it."""

        record = self._intent_record()
        record.root, record.start = root, start_time(root)
        record.write(self._records())

    def _held_record(self, restored: Restored) -> HeldRecord:
        """The record of the restored tree (:mod:`.held`), not yet answered."""

        assert self.driver is not None
        pid = restored.pid
        return HeldRecord(
            self.session_id.hex(), pid, start_time(pid), self.driver.name, self.peer,
            self.local_address,
            [cbor2.dumps(info_to_wire(e.source_info)).hex() for e in self.enclaves],
            [e.engine.migration_id.hex() if e.engine else "" for e in self.enclaves],
            {k: str(v) for k, v in restored.handle.items()},
            [[p, start_time(p)] for p in self.enclave_pids()],
            answered=False, lazy_pages=self._lazy_pages(),
        )  # fmt: skip

    def _lazy_pages(self) -> list[int]:
        """The post-copy window's ``criu lazy-pages`` daemon as [pid, start time]."""

        if self.window is None:
            return []
        pid = self.window.post.daemon.pid
        return [pid, start_time(pid)]

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
            self._intent_record().write(self._records())  # (now with the daemon: :mod:`.held`)

            def notify(script: str, root: int) -> None:
                if script == "post-restore" and root > 0:
                    self._record_made_tree(root)

            pid = post.restore(notify, run=False, file_locks=True, tcp_close=self.tcp_close)
            return Restored(pid=pid, label=f"process {pid}")
        # A container: its engine restores (``restore --lazy-pages``, held), and a
        # tree killed in the window goes with its container.
        made: list[Restored] = []

        def by_engine() -> int:
            made.append(driver.restore(RestoreRequest(
                images=images, target=self.target, tcp_close=self.tcp_close, lazy_pages=True,
                owner=self.session_id.hex(),
            )))  # fmt: skip
            return made[0].pid

        def lost() -> None:
            with contextlib.suppress(MigSGXError):
                driver.discard(made[0])

        self.window = Window(post, self.config.io_timeout, self.tag, on_lost=lost)
        self._intent_record().write(self._records())  # (now with the daemon: :mod:`.held`)
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
        else:
            try:
                self._check_activated(None)
            except LostAfterCommitError:
                # Post-copy: the tree runs without its enclave (W3).  Its pages still
                # come, so that it is not left faulting; then the tool hears the loss
                # (exit 10) instead of ``resumed`` (before: exit 0).
                with contextlib.suppress(MigSGXError):
                    self.window.wait()
                self._cleanup()
                raise
        log.info("migration %s: resumed pid %d", self.tag, self.root)
        _inject(fault("agent.after-resume"), self)
        self.agent.metrics.observe_phase("resume", time.monotonic() - t0)
        resumed = {
            "t": "resumed",
            "seconds": time.monotonic() - t0,
            "attach_seconds": attach_seconds,
            "pid": self.root,
        }
        if self.window is None:
            self._cleanup(after_reply=True)
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

    def _refuse_request(self, msg: dict[str, Any]) -> Reply:
        """A fresh enclave refuses the id of a post-copy session that ended here (2.2).

        Only for a session whose tree a restarted agent killed after it had
        answered ``restored`` (:mod:`.refusal`), and only from the host that
        began it.  The store refuses an id some enclave claimed, whatever this.
        """

        note = refusable_note(self.config.work_dir, msg["session_id"])
        if note is None:
            raise AgentError("no post-copy session of this migration ended here")
        if note["peer"] != self.peer:
            raise AgentError("a refusal comes only from the host that began the session")
        port, key = serve_refusal(
            note, msg["index"], msg["session_id"], self.config.platform_socket
        )
        return {"t": "redelivery", "data_port": port, "data_key": key}

    def _abort_request(self, msg: dict[str, Any]) -> Reply:
        log.info("migration %s: aborted by the tool (%s)", self.tag, msg["reason"][:200])
        frames = msg.get("frames")
        self._pass_on(frames)
        # Only an enclave that got an ABORT frame can be judged: one whose source
        # enclave died has none, and waiting for it only kept the tool (and the
        # source tree it thaws after this answer) waiting DELIVER_WAIT.
        judged = [e for e, f in zip(self.enclaves, frames or [], strict=False) if f]
        # One whose source enclave died before it was asked to decide can never
        # get a frame (``source_lost``, its index): it ends, and the tree with it.
        lost = msg.get("source_lost") or []
        if not isinstance(lost, list) or not all(
            isinstance(i, int) and 0 <= i < len(self.enclaves) for i in lost
        ):
            raise ProtocolError("source_lost: indices of this session's enclaves")
        for enclave in (self.enclaves[i] for i in set(lost)):
            if enclave.engine is not None and not enclave.decided.is_set():
                log.warning("migration %s: enclave %d: its source enclave died undecided, "
                            "no decision can come: the copy ends",
                            self.tag, enclave.index)  # fmt: skip
                enclave.engine.source_gone()
                judged.append(enclave)
        if judged:
            self._wait_decided(DELIVER_WAIT, judged)
        self.abort("aborted by the tool")
        # (this session stays registered while its tool's connection is open: only
        # one kept in doubt for a decision is held)
        return {"t": "aborted", "held": self.session_id in self.agent.in_doubt()}

    def _deliver_request(self, msg: dict[str, Any]) -> Reply:
        """A decision delivered again, on a connection of its own (``migsgx recover``)."""

        target = self.agent.find_session(msg["session_id"], besides=self)
        aborted = msg.get("decision") == "abort"
        if target is not None:
            if aborted and target.peer != self.peer:
                raise AgentError("an abort comes only from the host that began the session")
            lost = msg.get("source_lost") or [] if aborted else []
            return {
                "t": "delivered",
                **target.deliver(msg["frames"], source_aborted=aborted, lost=lost),
            }
        # No such session (it ended): a restarted agent found its tree with the ids
        # claimed (W3), or this host's platform store (its claims) says whether it ran.
        lost = lost_detail(self.config.work_dir, msg["session_id"])
        if lost is not None:
            return {"t": "delivered", "outcome": LostAfterCommitError.code, "pid": 0}
        if refusable_note(self.config.work_dir, msg["session_id"]) is not None:
            # A post-copy tree killed after it was held: no copy of it can ever run here;
            # the source may revoke its commit on a refusal (``refuse``, commit.md 2.2).
            return {"t": "delivered", "outcome": "refusable", "pid": 0}
        mids = msg.get("enclave_mids") or []
        if not mids:
            # A tree without enclaves: this agent's resume was its commit point.
            resumed = was_resumed(self.config.work_dir, msg["session_id"])
            return {"t": "delivered", "outcome": "resumed" if resumed else "unknown", "pid": 0}
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
