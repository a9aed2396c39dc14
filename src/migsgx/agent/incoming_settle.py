"""How an incoming migration is decided: decisions delivered (again), a session
held in doubt and settled, a lost copy replaced by a fresh enclave (window W2),
or everything undone.  :mod:`.incoming_handover` below it hands the held tree
over (let run, enclaves attached) or discards it.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Sequence
from typing import Any, Final

from ..errors import LostAfterCommitError, MigSGXError, ProtocolError
from .incoming_data import _Enclave, _shutdown
from .incoming_handover import _Handover
from .protocol import AgentError, SessionState

__all__: list[str] = []

log = logging.getLogger("migsgx.agent")

#: How long a delivered decision may take to be judged and carried out before
#: the deliverer hears "waiting" (and may deliver again).
DELIVER_WAIT: Final = 20.0
#: How long a fresh copy's listener waits for the state to come again.
REDELIVER_ACCEPT: Final = 30.0


class _SessionDecisions(_Handover):
    """Decide, hold, settle or undo one incoming migration."""

    def redeliver(self, index: int) -> int:
        """Replace enclave ``index``'s lost copy by a fresh listener; its port (0: none).

        Only a copy that is gone is replaced: its enclave process ended (asked
        of the process: ``IncomingEnclave.lives``), never one that only did
        not answer in time (a claim in flight waits for a restarted platform
        service, and a call behind it would wait as long).  A live copy waits
        for its service (W2 (c)); its token goes again with ``resume`` or a
        delivery.
        """

        if not 0 <= index < len(self.enclaves):
            raise ProtocolError("no such enclave")
        # Only a committed source is asked to deliver its state again: from now on a
        # failed step never ends this session while the state can come again.
        self.source_committed = True
        old = self.enclaves[index]
        engine = old.engine
        if old.ecall_sock is not None or (engine is not None and engine.decided):
            return 0  # it runs, or a decision ended it
        if not old.decided.is_set() and (engine is None or not engine.awaiting):
            return 0  # still arriving (or waiting for this host's platform service)
        if engine is not None and engine.lives():
            return 0  # a live copy is never replaced
        log.warning(
            "migration %s: enclave %d lost its copy before the claim: a fresh one receives "
            "the state again", self.tag, index,
        )  # fmt: skip
        _shutdown(old.conn)
        self.enclaves[index] = _Enclave(index, old.source_info, again=True)
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

    def _arriving_again(self) -> bool:
        """Whether the state comes again to a fresh copy that has not decided yet
        (it loads, or waits for this host's platform service): kept, not undone."""

        return self.keep_lost and any(e.again and not e.decided.is_set() for e in self.enclaves)

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

    # --- undone ------------------------------------------------------------------------------
    def abort(self, reason: str, *, keep_lost: bool = False) -> None:
        """Undo everything this session made; idempotent.

        Held instead while an enclave past LOADED waits for its decision, and,
        with ``keep_lost`` (or once the source said it committed: its tokens
        in ``resume``, a re-delivery asked), while the tree waits for a lost
        copy's state again: a step that failed (a re-delivery that could not
        launch its enclave, the ``resume`` that found no copy claimed) is no
        decision, and the source's committed enclaves still hold the state.
        """

        with self._lock:
            if self._finished:
                return
            self._finished = True
        if self.no_return:
            log.error("migration %s: not aborting (%s): past the commit point", self.tag, reason)
            self._teardown()
            return
        self.keep_lost = keep_lost or self.source_committed
        if self._awaiting() or self._copies_lost() or self._arriving_again():
            self._hold(reason)
            return
        log.info("migration %s: aborting: %s", self.tag, reason)
        self._discard_all()
        self._teardown()
        self.decided_outcome = "aborted"
        self.settled.set()
