"""What a restarted agent does with the trees a former agent left (:mod:`.held`).

Before the agent listens, it reads every record in its work directory: a held
tree that is still the recorded one is adopted into a session held in doubt;
a tree whose enclave ids were claimed is resumed with the enclaves, whose
duplicates of the former agent's end are taken back (W3); anything else
recorded (a restore that never returned, a tree never reported held, a
post-copy tree, a claimed tree whose enclaves cannot all be taken back) is
removed, a container by its engine, and the log says exactly what remained.
"""

from __future__ import annotations

import logging
from pathlib import Path

import cbor2

from ..containers import HostConfig, make_driver
from ..errors import MigSGXError
from ..host.appctl import info_from_wire
from ..host.client import EnclaveInfo
from ..system.process import continue_tree, process_state
from .applink import AppLink
from .config import AgentHost
from .held import HeldRecord, claimed_count, held_records, mark_lost, start_time
from .holders import take_held
from .incoming import IncomingMigration
from .refusal import mark_refusable
from .resumed import forget_resumed, was_resumed

__all__ = ["Adoption"]

log = logging.getLogger("migsgx.agent")


class Adoption:
    """The start-up pass of one agent over its predecessors' records."""

    def __init__(self, agent: AgentHost) -> None:
        self.agent = agent

    def _host(self) -> HostConfig:
        config = self.agent.config
        return HostConfig(config.criu, config.containers, config.platform_socket, config.state)

    def _claimed(self, arrivals: list[str]) -> int:
        """How many of ``arrivals`` (hex migration ids) this host's claim store holds."""

        return claimed_count(self.agent.config.state, arrivals)

    def adopt_held(self) -> None:
        """Trees a former agent held when it died (window W2, :mod:`.held`).

        Still the recorded tree and stopped: adopted into a session held in
        doubt, which waits for the source to deliver the state again (a
        container only if its engine still knows it as that tree).  Anything
        else recorded is removed (a container by its engine where it can), and
        the log says exactly what remained.
        """

        for directory, record in held_records(self.agent.config.work_dir):
            if record is None:
                log.error(
                    "%s: an unreadable held-tree record: nothing adopted, nothing resumed; "
                    "the tree it names (if any) stays as it is, for an operator", directory,
                )  # fmt: skip
                continue
            tag = record.session_id[:8]
            window = record.window(self.agent.config.state)
            if window == "post-copy":
                self._end_post_copy(directory, record)
                continue
            if window == "restoring":
                # Died inside the restore: nothing ran, the source cannot have decided.
                if record.driver == "pid":
                    what, removed = "a process tree", self.remove_restored(record)
                else:
                    what = f"{record.driver} {record.handle}"
                    removed = self._remove_made(record, keep_running=False) or "nothing"
                log.warning(
                    "migration %s: a former agent died restoring %s: removed %s", tag, what,
                    removed,
                )  # fmt: skip
                self.agent.discard(directory)
                continue
            if window == "gone-or-running":
                left = ""
                if record.driver != "pid":
                    left = self._remove_made(record, keep_running=True)
                log.warning(
                    "migration %s: the tree a former agent held (pid %d) is gone or runs: "
                    "nothing to adopt%s", tag, record.root, f"; removed {left}" if left else "",
                )  # fmt: skip
                self.agent.discard(directory)
                continue
            if window == "unanswered":
                # Restored, never reported held: the source cannot have decided.
                self._remove_held(record)
                log.warning(
                    "migration %s: the tree a former agent restored (pid %d, %s) was never "
                    "reported held, so never decided on: removed", tag, record.root,
                    record.driver,
                )  # fmt: skip
                self.agent.discard(directory)
                continue
            if window == "no-enclaves":
                self._finish_by_marker(directory, record)
                continue
            running = record.enclaves_running()
            if running:
                log.warning(
                    "migration %s: enclave process(es) %s of the held tree still run; the "
                    "claim store lets one copy per migration id activate", tag, running,
                )  # fmt: skip
            if window == "claimed" and self._resume_claimed(directory, record):
                continue
            if window == "claimed":
                claimed = self._claimed(record.arrivals)
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
                session = IncomingMigration.adopt_held(self.agent, directory, record)
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
                self.agent.discard(directory)
                continue
            log.warning(
                "migration %s: adopted the tree a former agent held (pid %d, %s%s), %d "
                "enclave(s) lost: held in doubt for the state to come again", tag, record.root,
                session.restored.label if session.restored else record.driver,
                ", paused: thawed only by a COMMIT" if record.frozen() else "",
                len(session.enclaves),
            )  # fmt: skip

    def take_over_claimed(self, directory: Path, record: HeldRecord) -> bool:
        """The W3 step of this pass alone, for ``migsgx recover`` on a host whose agent
        is down (:mod:`.recover_dest`, which holds the agent's lock meanwhile): a
        record that :meth:`adopt_held` would resume as claimed is resumed so; whether
        it was.  Anything else, and a claimed tree whose duplicates cannot all be
        taken back, is left unchanged for the agent's own pass."""

        if record.window(self.agent.config.state) != "claimed":
            return False
        return self._resume_claimed(directory, record)

    def _resume_claimed(self, directory: Path, record: HeldRecord) -> bool:
        """A held tree whose enclaves claimed their ids, the former agent died before
        it resumed the tree (window W3): resumed with its enclaves; whether it was.

        Each enclave kept a duplicate of that agent's end of its connection from
        right before its claim (``holders``, :meth:`.incoming_tree._TreeSteps.
        _hold_before_claim`): it lives on with the only copy of the state.  The
        duplicates are taken back (``pidfd_getfd``, nonce checked: :func:`.holders.
        take_held`), the tree continues (a container through its engine) and the
        application is attached to them, as the former agent would have; the
        application lets the duplicates go.  The session's directory goes: a
        delivery for it is answered from the claim store (``resumed``), and the
        source's ``recover`` ends the source (``moved``).  False, with nothing
        changed, unless every enclave's duplicate is taken back: the caller
        removes the tree as lost (the taken-back enclaves end with it).
        """

        tag = record.session_id[:8]
        count = len(record.enclaves)
        if not count or len(record.holders) != count or len(record.holder_infos) != count:
            return False
        taken = take_held(record.holders)
        try:
            if len(taken) != count:
                log.error("migration %s: only %d of %d claimed enclaves kept their duplicate "
                          "(the others died): the state cannot be resumed", tag, len(taken),
                          count)  # fmt: skip
                return False
            try:
                infos = [EnclaveInfo(**info_from_wire(cbor2.loads(bytes.fromhex(i))))
                         for i in record.holder_infos]  # fmt: skip
                pid = self._reclaim(record)
            except (MigSGXError, ValueError, TypeError, KeyError, OSError) as exc:
                log.error("migration %s: the claimed tree (pid %d) cannot be resumed: %s",
                          tag, record.root, exc)  # fmt: skip
                return False
            continue_tree(pid)
            try:
                link = AppLink.find(pid)
                if link is None:
                    raise MigSGXError(f"the restored process {pid} has no migration control")
                link.attach([taken[i] for i in range(count)], infos)
            except MigSGXError as exc:
                detail = (f"the claimed tree (pid {pid}) was resumed but its enclaves "
                          f"could not be attached ({exc}): it runs without them; the "
                          "state is lost")  # fmt: skip
                log.error("migration %s: %s", tag, detail)
                mark_lost(directory, detail)
                return True
        finally:
            for sock in taken.values():
                sock.close()
        log.warning(
            "migration %s: a former agent died after the claim (W3): the %d enclave(s) kept "
            "their state, their duplicates were taken back and the tree (pid %d, %s) resumed "
            "with them", tag, count, pid, record.driver,
        )  # fmt: skip
        self.agent.discard(directory)
        return True

    def _reclaim(self, record: HeldRecord) -> int:
        """The held tree's root, ready to continue: a container is taken over from its
        engine (and readied, as before a resume); a process tree is its root."""

        if record.driver == "pid":
            return record.root
        restored = make_driver(record.driver, self._host()).reclaim(record.handle, record.root)
        if restored.before_resume is not None:
            restored.before_resume()
        return restored.pid

    def _finish_by_marker(self, directory: Path, record: HeldRecord) -> None:
        """A held tree without enclaves: the resume marker (:mod:`.resumed`) decides.

        Its commit point is the destination's resume, recorded by the marker
        before the tree continues: with the marker, ``recover`` (and the
        guardian) end the source, so the tree is continued here (a container
        through its engine: thawed, its address up); without it, nobody ever
        resumed it and the source is given back, so it is killed and removed (a
        container by its engine).  Adoption runs before the agent listens: no
        ``deliver`` is answered from a marker while this decides.
        """

        tag = record.session_id[:8]
        if not was_resumed(self.agent.config.work_dir, bytes.fromhex(record.session_id)):
            self._remove_held(record)
            log.warning(
                "migration %s: a former agent held a tree without enclaves (pid %d, %s) and "
                "never resumed it: removed; the source runs on", tag, record.root,
                record.driver,
            )  # fmt: skip
            self.agent.discard(directory)
            return
        try:
            continue_tree(self._reclaim(record))
        except (MigSGXError, ValueError, TypeError, KeyError, OSError) as exc:
            log.error(
                "migration %s: a former agent resumed a tree without enclaves (pid %d, %s) "
                "but died before it ran, and it cannot be continued here (%s): left as it "
                "is, for an operator", tag, record.root, record.driver, exc,
            )  # fmt: skip
            return
        log.warning(
            "migration %s: a former agent resumed a tree without enclaves (pid %d, %s) and "
            "died before it ran: continued", tag, record.root, record.driver,
        )  # fmt: skip
        self.agent.discard(directory)

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
            serving = start_time(pid) == start and process_state(pid) not in ("", "Z", "X")
            log.warning(
                "migration %s: a former agent's post-copy tree (pid %d) runs in its page "
                "window; its lazy-pages daemon (pid %d) %s", tag, record.root, pid,
                "serves on: both left as they are" if serving else "has ended",
            )  # fmt: skip
            if not serving:
                self.agent.discard(directory)
            return
        if record.restoring:
            if record.driver == "pid":
                removed = self.remove_restored(record)
            else:
                removed = self._remove_made(record, keep_running=False) or "nothing"
        elif record.still_held():
            self._remove_held(record)
            removed = f"the tree (pid {record.root}, {record.driver})"
            if not record.enclaves:
                # Killed before it ever ran: a resume marker written before its window
                # opened says nothing true any more, and recover gives the source back.
                forget_resumed(self.agent.config.work_dir, bytes.fromhex(record.session_id))
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
            else "an ABORT: the source runs on; a COMMIT: recover refuses the migration "
            "id here and the source runs on",
        )  # fmt: skip
        if record.answered and record.enclaves:
            # The source may have committed: a fresh enclave may refuse the ids here.
            mark_refusable(directory, record)
            return
        # (no enclaves: no id to refuse; a delivery is answered from the resume marker)
        self.agent.discard(directory)

    @staticmethod
    def remove_restored(record: HeldRecord) -> str:
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

        try:
            driver = make_driver(record.driver, self._host())
            return driver.remove_made(record.handle, record.session_id, keep_running=keep_running)
        except (MigSGXError, ValueError, TypeError, KeyError) as exc:
            log.error("migration %s: %s %s not removed by its engine: %s",
                      record.session_id[:8], record.driver, record.handle, exc)  # fmt: skip
            return ""

    def _remove_held(self, record: HeldRecord) -> None:
        """Remove a recorded held tree that must never run: a container by its engine
        (container, bundle, pod namespace) if it still knows it as that tree."""

        if record.driver != "pid":
            try:
                driver = make_driver(record.driver, self._host())
                driver.discard(driver.reclaim(record.handle, record.root))
                return
            except (MigSGXError, ValueError, TypeError, KeyError) as exc:
                log.error("migration %s: %s %s not removed by its engine: %s",
                          record.session_id[:8], record.driver, record.handle, exc)  # fmt: skip
        record.kill()
