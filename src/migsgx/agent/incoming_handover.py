"""How an incoming migration's held tree is handed over or undone: the checks
right before the source may commit (every loaded copy alive) and right before
``resumed`` (the activated enclaves still there, window W3), the tree let run
with its enclaves attached, and the session's end (what it made discarded, its
directories removed).

:mod:`.incoming_settle` decides on top of this when that happens.
"""

from __future__ import annotations

import contextlib
import logging
import time

from .. import _proc
from ..errors import LostAfterCommitError, MigSGXError
from ..sgx.listener import platform_socket_alive
from ..system.process import continue_tree
from .applink import AppLink
from .faults import fault
from .held import remove as remove_record
from .incoming_data import _inject, _SessionState, _shutdown
from .lost_enclaves import hung_up
from .protocol import AgentError, SessionState
from .reservations import release_reservations
from .resumed import mark_resumed

__all__: list[str] = []

log = logging.getLogger("migsgx.agent")


class _Handover(_SessionState):
    """Check, let run, attach, or undo: the held tree's way out, either way."""

    def _check_enclaves_alive(self) -> None:
        """Each incoming enclave answers, and so does the platform that must claim its id.

        The source commits only after ``restored``: a copy that died before is
        found here, and the migration aborts with the source running on.
        """

        if not self.enclaves:
            return
        if not platform_socket_alive(self.config.platform_socket):
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
            or (e.ecall_sock is not None and hung_up(e.ecall_sock))
        ]
        if not gone and self.enclaves and not platform_socket_alive(self.config.platform_socket):
            # Every enclave claimed its id, lives and holds its state: a platform
            # service that died after the claims strands nothing (its enclaves
            # attach to the next one, as after any restart), so this is no loss.
            log.warning("migration %s: the platform service ended after the claims; the "
                        "enclaves run and attach to it again once it is back",
                        self.tag)  # fmt: skip
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
        if not self.enclaves and self.session_id:
            # The commit point of a tree without enclaves: written before it runs, so
            # that a source host whose tool died learns it (``migsgx recover``); one
            # that cannot be written refuses the resume (the tree is discarded, the
            # source runs on).
            try:
                mark_resumed(self.config.work_dir, self.session_id)
            except OSError as exc:
                raise AgentError(f"the resume cannot be recorded: {exc}") from exc
            self.no_return = True  # (recorded: decided, whatever fails from here)
            _inject(fault("agent.resume-marked"), self)
        self.no_return = True
        self._let_run()
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
        self.hung_up = [e.index for e in self.enclaves if hung_up(e.ecall_sock)]
        for sock in socks:
            sock.close()
        return time.monotonic() - t0

    def _let_run(self) -> None:
        """The held tree continues: the driver's step before it (a container's address,
        its gate), then SIGCONT, or, post-copy, its page window opens (its missing
        pages come from the source from then on)."""

        assert self.root is not None
        if self.restored is not None and self.restored.before_resume is not None:
            self.restored.before_resume()
        if self.window is not None:
            self.window.run()
        else:
            continue_tree(self.root)
        self.tree_continued = True

    def _continue_decided(self) -> None:
        """A tree without enclaves whose resume was recorded runs, if it can.

        The record is the commit point (``docs/spec/commit.md`` 4.3): the
        source is ended once anyone asks, so a step that failed before the tree
        ran must not leave it stopped.  Best effort: what still fails is logged,
        the tree stays held as it is (a restarted agent continues it by the record).
        """

        if self.tree_continued or self.window is not None or self.root is None:
            return
        try:
            self._let_run()
        except (MigSGXError, OSError) as exc:
            log.error("migration %s: the decided tree (pid %d) was not continued: %s",
                      self.tag, self.root, exc)  # fmt: skip

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

    def _cleanup(self, *, after_reply: bool = False) -> None:
        """The session ends; ``after_reply``: its directories go once the answer is out
        (a migration's last answer, ``resumed``, ends its downtime: removing a
        gigabyte of images is no part of it)."""

        with self._lock:
            self._finished = True
        self._teardown(after_reply=after_reply)
        if self.machine.state is SessionState.RESUMED:
            self.decided_outcome = "resumed"
        self.settled.set()

    def _teardown(self, *, after_reply: bool = False) -> None:
        if self.window is not None:
            self.window.close()  # (a running tree's window closes on its own)
        for sock in self._listeners:
            with contextlib.suppress(OSError):
                sock.close()
        self._stop_pages()
        self._close_files()
        remove_record(self.session_dir)
        for path in dict.fromkeys(p for p in (self.images_dir, self.session_dir) if p):
            if after_reply:
                self._discard_after_reply.append(path)
            else:
                self.agent.discard(path)

    def _discard_pending(self) -> None:
        """Remove what :meth:`_cleanup` left for after the answer (see there)."""

        while self._discard_after_reply:
            self.agent.discard(self._discard_after_reply.pop())


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie does not).

    The enclave's pid as it reported it: the agent and its platform service share
    a pid namespace (as the fault hooks assume).  Its connection alone does not
    tell at once: the sandbox launcher may hold a copy for a moment after it died.
    """

    return pid > 0 and _proc.alive(pid)
