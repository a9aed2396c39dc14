"""One incoming migration on the destination agent (see :mod:`.protocol`).

What is restored, and how, is the business of the driver that ``begin`` names
(:mod:`migsgx.containers`: ``pid``, ``runc``, ``podman``); holding, committing
and resuming are the same for all of them.

Decision rule when the tool goes away: before the tree is held, abort; once it
is held, the enclaves decide.  If the source's COMMIT token reached them, the
source has given up its enclaves for good, so the agent rolls forward (resumes
the tree and attaches the enclaves); otherwise it aborts (kills the held tree,
aborts the incoming enclaves) and the source carries on.

The session is built in layers, each a subclass of the one before:
:mod:`.incoming_data` (its state, the page server, the enclaves' data
connections), :mod:`.incoming_handover` (the tree let run with its enclaves
attached, or discarded), :mod:`.incoming_settle` (decisions delivered, held in
doubt, settled), :mod:`.incoming_tree` (images, the held restore, its records),
:mod:`.incoming_recovery` (what the source host asks without the tool); this
module answers the tool's requests.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import time
from collections.abc import Callable
from typing import Any

from ..containers import HostConfig, make_driver
from ..containers.postcopy import check_pipe_max_size
from ..errors import (
    ConnectionClosedError,
    FrameError,
    LostAfterCommitError,
    MigSGXError,
    ProtocolError,
)
from ..host.appctl import info_from_wire
from ..host.client import EnclaveInfo
from ..wire import recv_frame, send_frame
from . import preflight
from .config import AgentHost
from .faults import fault
from .imageroom import place_images, restore_spends
from .incoming_data import Reply, _Enclave, _inject
from .incoming_pages import HungUp
from .incoming_recovery import _Recovery
from .incoming_settle import DELIVER_WAIT
from .protocol import (
    CONTROL,
    CONTROL_FRAME_MAX,
    MAX_ENCLAVES,
    AgentError,
    PastCommitError,
    SessionState,
    enclave_indices,
)
from .refusal import Refusal
from .resumed import forget_resumed
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


class IncomingMigration(_Recovery):
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
        self._refusals: list[Refusal] = []

    # --- the request loop ------------------------------------------------------------------
    def run(self) -> None:
        try:
            self._serve()
        finally:
            if self._refusals:
                self._until_hung_up()
            for refusal in self._refusals:
                refusal.end()

    def _serve(self) -> None:
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
            except HungUp as exc:  # a step's wait ended by the tool's hang-up
                self._lost(exc)
                return
            except MigSGXError as exc:
                log.warning("migration %s: %s failed: %s", self.tag, kind, exc)
                if kind == "resume" and self.no_return and not self.enclaves:
                    exc = self._resume_failed(exc)
                reply = {"t": "err", "code": exc.code, "message": exc.message}
                if self.no_return:
                    # Committed enclaves or a running tree: never kill what may be the only copy.
                    self.machine.state = SessionState.RESUMED
                    if isinstance(exc, PastCommitError) and self.window is not None:
                        reply = self._window_after(reply)
                    self._cleanup()
                else:
                    self.machine.fail()
                    self.abort(f"{kind} failed")
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

    def _resume_failed(self, exc: MigSGXError) -> MigSGXError:
        """A ``resume`` of a tree without enclaves that failed after it was recorded.

        The record is the commit point (``docs/spec/commit.md`` 4.3): the tree
        runs (continued here if it had not yet) and the tool, answered
        ``agent-past-commit``, must not give its source back.  A post-copy tree
        runs only with its page window, which no other agent can open: until
        that opened, the tree never ran, so the record is taken back and the
        answer stays a refusal (the tree is discarded, the source runs on).
        """

        if self.window is not None and not self.window.watching:
            forget_resumed(self.config.work_dir, self.session_id)
            self.no_return = False
            return exc
        self._continue_decided()
        return PastCommitError(f"the resume was recorded (the commit point), then: {exc.message}")

    def _window_after(self, first: dict[str, Any]) -> dict[str, Any]:
        """Post-copy: the ``agent-past-commit`` answer goes at once, and, as after
        ``resumed``, the window's report follows once every page came (the
        source's CRIU serves them until then): the last answer, returned."""

        assert self.window is not None
        try:
            send_frame(self.tls, for_version(first, self.version), max_size=CONTROL_FRAME_MAX)
        except (MigSGXError, OSError) as exc:  # the tree runs and its window is watched
            log.warning("migration %s: the tool did not hear the failure: %s", self.tag, exc)
        try:
            report = self.window.wait()
        except MigSGXError as exc:
            return {"t": "err", "code": exc.code, "message": exc.message}
        self.agent.metrics.observe_phase("post_copy_window", report.window_seconds)
        return {"t": "window", "seconds": report.window_seconds}

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
        spends = restore_spends(
            driver, len(msg["pids"]), spend_images=config.spend_images, post_copy=self.post_copy
        )
        self.images_dir = place_images(
            self.session_dir,
            memory if isinstance(memory, int) and not isinstance(memory, bool) else None,
            enclave_bytes=sum(e.source_info.memory_size for e in self.enclaves),
            in_ram=self.config.images_in_ram and not self.config.keep_images,
            tag=self.tag,
            driver=driver,
            spends=spends,
        )
        local = self.local_address = str(self.tls.getsockname()[0])
        page = self._page_listener = self._listen(local)
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

        def loaded(step: float) -> bool:
            waiting = [e for e in self.enclaves if not e.loaded.is_set()]
            return not waiting or (waiting[0].loaded.wait(step) and len(waiting) == 1)

        # Bounded, and ended at once by the control connection's hang-up (a load
        # past LOADED is held then: ``_lost``).
        self._until(loaded, self.config.io_timeout, "enclave load")
        for enclave in self.enclaves:
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

    def _resume(self, msg: dict[str, Any]) -> Reply:
        t0 = time.monotonic()
        _inject(fault("agent.before-resume"), self)
        if any(msg.get("tokens") or ()):
            self.source_committed = True  # (tokens exist only once the source committed)
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
        lost = enclave_indices(msg.get("source_lost") or [], len(self.enclaves))
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
