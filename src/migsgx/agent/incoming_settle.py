"""How an incoming migration is decided and ended: decisions delivered (again),
a session held in doubt and settled, a lost copy replaced by a fresh enclave
(window W2), the held tree resumed with its enclaves attached, or everything
undone.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

from .. import _proc
from ..datapath.incoming import IncomingEnclave
from ..errors import LostAfterCommitError, MigSGXError, ProtocolError
from ..system.process import continue_tree
from .applink import AppLink
from .faults import fault
from .held import remove as remove_record
from .incoming_data import _Enclave, _inject, _SessionState, _shutdown
from .lost_enclaves import hung_up
from .protocol import AgentError, SessionState
from .reservations import release_reservations
from .resumed import mark_resumed

__all__: list[str] = []

log = logging.getLogger("migsgx.agent")

#: How long a delivered decision may take to be judged and carried out before
#: the deliverer hears "waiting" (and may deliver again).
DELIVER_WAIT: Final = 20.0
#: How long a fresh copy's listener waits for the state to come again.
REDELIVER_ACCEPT: Final = 30.0


class _SessionDecisions(_SessionState):
    """Decide, hold, settle, resume or undo one incoming migration."""

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

    def deliver(
        self, frames: Any, *, source_aborted: bool = False, lost: Any = ()
    ) -> dict[str, Any]:
        """Judge delivered frames; the outcome once carried out (or ``waiting``).

        ``source_aborted``: the source host's store holds ABORT decisions (the
        caller checked that this comes from the host that began the session).
        A live copy still judges its frame itself; a copy that died undecided
        can judge nothing, and no state will come again for it: the tree held
        for it is discarded (rather than left stopped for an operator).  ``lost``
        (only with ``source_aborted``): indices whose source enclave died
        undecided while the others aborted, so that no frame can ever come for
        them: their copies end, as with the tool's ``abort`` (``source_lost``).
        """

        if not isinstance(lost, list | tuple) or not all(
            isinstance(i, int) and not isinstance(i, bool) and 0 <= i < len(self.enclaves)
            for i in lost
        ):
            raise ProtocolError("source_lost: indices of this session's enclaves")
        for enclave in (self.enclaves[i] for i in set(lost) if source_aborted):
            if enclave.engine is not None and not enclave.decided.is_set():
                log.warning("migration %s: enclave %d: its source enclave died undecided, "
                            "no decision can come: the copy ends",
                            self.tag, enclave.index)  # fmt: skip
                enclave.engine.source_gone()

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
        if self.window is None and self.images_dir not in (None, self.session_dir):
            # The tree is restored: its images are spent, and may wait in RAM for
            # a decision for long.  (Post-copy: the lazy pages still read them.)
            self._close_files()
            self.agent.discard(self.images_dir)
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
            or (e.ecall_sock is not None and hung_up(e.ecall_sock))
        ]
        if not gone and self.enclaves and not _platform_alive(self.config.platform_socket):
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
    return _proc.alive(int.from_bytes(creds[:4], "little"))


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie does not).

    The enclave's pid as it reported it: the agent and its platform service share
    a pid namespace (as the fault hooks assume).  Its connection alone does not
    tell at once: the sandbox launcher may hold a copy for a moment after it died.
    """

    return pid > 0 and _proc.alive(pid)


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
