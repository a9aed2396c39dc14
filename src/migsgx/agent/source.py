"""The source side of ``migsgx migrate``: enclaves first, then CRIU, commit last.

1. *prepare*: the application hands over its enclave connections (ECALLs
   wait; the rest of the application keeps running).
2. every enclave migrates (``OutgoingEnclave.transfer``) on a data connection
   of its own; the destination enclaves load and confirm, nothing commits.
3. CRIU dumps the tree; its pages go straight to the destination's page
   server.  In the ``post-dump`` callback, with the source frozen:
   the other images are streamed, the destination restores the tree and holds
   it stopped, the source tree is fenced (SIGSTOP queued while CRIU still
   freezes it), the enclaves commit (**the commit point**), the destination
   resumes the tree and attaches its enclaves.  Returning lets CRIU kill the
   source.
4. any failure before the commit point raises inside ``post-dump``: CRIU
   resumes the source, the enclaves abort, their connections go back to the
   application, the destination kills what it held.

With ``post_copy`` (:mod:`.lazy`) step 3 splits: ``post-dump`` only finishes
the enclaves, moves the images and fences the tree; CRIU then serves the
process's private memory, the destination restores (held) with lazy pages, the
enclaves commit, the tree runs there and pulls what is missing, and the
destination's ``window`` answer ends the migration (the source tree is killed
then: CRIU leaves it stopped, never killed, as the commit may still fail).

For a tree without enclaves the commit point is the ``resume`` request: once
it is sent, the source is never resumed by this tool (it stays stopped if the
answer is lost, to be resumed by hand only if the destination did not run).

What is checkpointed and how is a driver's business (:mod:`migsgx.containers`:
a process tree with CRIU, a runc or a podman container); the migration drives
any of them through the same :class:`~migsgx.containers.Driver` seam, whose
``dump`` calls back (:meth:`_Migration._on_dumped`) with the source frozen.

The layers: shared state (:mod:`.source_state`), the enclave streams
(:mod:`.source_enclaves`), the decision (:mod:`.source_commit`), the frozen part
(:mod:`.source_dump`: steps 3 and 4), and this module, which runs them in order
and names the outcome of a failure: 6 the source runs as before, 8 the
application ended, 7 in doubt, 11 a source enclave died before the decision and
its state is gone (:mod:`.enclave_loss`).
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Final

from .._trace import step
from ..containers.postcopy import check_pipe_max_size
from ..errors import (
    CriuError,
    EnclaveError,
    InDoubtError,
    LostAfterCommitError,
    MigrationError,
    MigSGXError,
    PostCopyUnavailableError,
    SourceGoneError,
    SourceLostError,
)
from ..system import cpugroups
from ..system.process import is_pidns_init, tree_pids
from . import early, precopy
from .applink import AppLink
from .control import AgentConnection
from .dumpdirs import dump_dir_path, make_dump_dir, sweep_dump_dirs
from .enclave_loss import LostEnclave, committed_in_store, dead, lost_error
from .guardian import Guardian
from .journal import Journal
from .postcopy_choice import choose
from .source_dump import _DumpSteps
from .source_state import MigrateOptions, MigrationOutcome, _alive, _host_id, _Transfer, keeps_tcp

__all__ = ["AgentConnection", "MigrateOptions", "MigrationOutcome", "keeps_tcp", "migrate"]

log = logging.getLogger("migsgx.migrate")

#: The drivers whose dump can leave private memory to CRIU's lazy pages.
POST_COPY_DRIVERS: Final = frozenset({"pid", "runc"})
#: Why the others cannot (their engines' checkpoint has no lazy-pages mode).
NO_LAZY_WHY: Final = {
    "podman": "podman's container checkpoint has no lazy-pages mode (its --export archive "
    "holds every page)",
    "containerd": "containerd's task checkpoint has no lazy-pages mode",
}
NO_LAZY: Final = "its engine's checkpoint has no lazy-pages mode"


class _Migration(_DumpSteps):
    """The driver: prepare, enclaves, dump, post-dump commit (or post-copy)."""

    # --- the whole migration -----------------------------------------------------------------
    def run(self, dump_dir: Path) -> MigrationOutcome:
        opts = self.opts
        self.source = source = self.driver.locate(
            opts.target if opts.target is not None else str(opts.pid)
        )
        self.tcp_keep = keeps_tcp(opts.tcp_established, source)
        pid = source.root
        pids = tree_pids(pid)
        if not pids:
            raise MigrationError(f"no process {pid} ({source.label})")
        pidns = is_pidns_init(pid)
        if opts.post_copy:
            if self.driver.name not in POST_COPY_DRIVERS:
                raise PostCopyUnavailableError(
                    f"post-copy is not supported for a {self.driver.name} container: "
                    f"{NO_LAZY_WHY.get(self.driver.name, NO_LAZY)}; "
                    "migrate it without --post-copy"
                )
            check_pipe_max_size()  # before anything is frozen
        self.memory = choose(pids, opts.post_copy, opts.post_copy_min)
        if opts.post_copy and not self.memory.post_copy:
            # Too small for post-copy to win: its memory moves while frozen.
            self.opts = opts = replace(opts, post_copy=False)
            if opts.notice is not None:
                opts.notice(self.memory.notice())
        # Pages travel only integrity-protected: TLS to a page server, or the TLS channel
        # (post-copy: CRIU's own TLS from the source's lazy server).
        self.page_server = self.driver.uses_page_server(True) and not opts.post_copy
        self.control = control = AgentConnection(opts.to, opts.identity, opts.io_timeout)
        control.on_dead(self._control_dead)  # (a dump under way stops at once)
        try:
            # Before anything is frozen: an agent too old for this migration is refused here.
            control.greet(_host_id(opts), self._needs())
            self.link = AppLink.find(pid)
            ready = self._precopy(pids, pidns) if opts.live and self.link is not None else None
            if ready is None and opts.early_handshake and self.link is not None:
                ready = self._handshake_early(pids, pidns)
            self.note("prepare")
            try:
                handed = self.link.prepare(opts.prepare_timeout) if self.link is not None else []
                if ready is not None and opts.live:
                    precopy.adopt(self.transfers, handed)
                elif ready is not None:
                    self._adopt(handed)
                else:
                    self.transfers = [_Transfer(h) for h in handed]
            except BaseException as exc:
                if ready is not None:
                    early.abandon(self.transfers, f"the freeze failed: {exc}")
                    with contextlib.suppress(MigSGXError):
                        self.control.call({"t": "abort", "reason": "the freeze failed"},
                                          "aborted")  # fmt: skip
                    self.abandoned, self.transfers = self.transfers, []
                if isinstance(exc, Exception) and not isinstance(exc, MigrationError):
                    # Nothing was frozen or moved: say so (exit 6, or 8 if the
                    # application itself ended), whatever the freeze tripped over
                    # (the application's namespace gone, an enclave dead).
                    if not _alive(pid):
                        raise SourceGoneError(
                            f"the source {source.label} (pid {pid}) ended before the freeze: "
                            f"nothing moved ({type(exc).__name__})"
                        ) from exc
                    raise MigrationError(f"the freeze failed, nothing moved: {exc}") from exc
                raise
            self.note("prepared")
            link = self.link
            try:
                self.guardian = Guardian(
                    link.pid if link else pid, link.name if link else "-", [h.sock for h in handed]
                )
                if self.scratch is not None:
                    self._guardian_note(f"scratch {self.scratch}")
                    self.scratch.mkdir(mode=0o700)
                # The journal and each enclave's duplicate of its connection come
                # first: from here on this tool and its guardian may both die and
                # ``migsgx recover`` still hands the enclaves back with their state.
                # (named by the session id: one of its own for a tree without
                # enclaves too, whose ``begin`` comes after the journal)
                self.session_id = self.session_id or secrets.token_bytes(16)
                self.journal = Journal.start(
                    opts.identity.directory, self.session_id, opts.to,
                    link.pid if link else pid, link.name if link else "-",
                )  # fmt: skip
                self._guardian_note(f"journal {self.journal.path}")
                if self.scratch is not None:
                    self.journal.update(dump_dir=str(self.scratch))
                self._guardian_enclaves(handed)
                self._inject(self._fault("tool.after-prepare"))
                begin = self._begin(pids, pidns) if ready is None else None
                if begin is not None:
                    ready = control.call(begin, "ready")
                assert ready is not None  # (live: the pre-copy's ``begin`` answered)
                self.data_key = bytes(ready["data_key"])
                # The enclaves stream while CRIU dumps the rest of the tree: the
                # application holds no enclave connection (prepare), so neither
                # waits for the other.  The post-dump step joins them.
                self._start_enclaves(ready)
                self._inject(self._fault("tool.before-dump"))
                self._dump(dump_dir, ready)
            except BaseException as exc:
                step("failed")
                self._join_enclaves()
                undecided = not self.committed and not self.resume_sent
                gone = undecided and not _alive(pid)
                if undecided:
                    self._roll_back(exc, source_gone=gone)
                elif self.committed and not isinstance(exc, SourceLostError):
                    self.in_doubt = True
                elif self.resume_sent:
                    # No enclaves, the resume's answer lost: the destination decides.
                    self.resume_in_doubt = True
                if gone and isinstance(exc, Exception):
                    # Whatever failed first, the reason is that the application ended.
                    raise SourceGoneError(
                        f"the source {source.label} (pid {pid}) ended during the migration: "
                        f"nothing moved, and its enclaves ended with it ({type(exc).__name__})"
                    ) from exc
                if undecided and isinstance(exc, EnclaveError):
                    # Rolled back: whatever an enclave call tripped over (its platform
                    # service gone, say), the source runs again; the status says that.
                    raise MigrationError(f"nothing moved, the source runs on: {exc}") from exc
                raise
            if self.lost_after_commit is not None:
                raise self.lost_after_commit
            return MigrationOutcome(self._figures(), self.restored_pid, dump_dir)
        except (MigSGXError, OSError) as exc:
            lost = self._lost_enclaves(exc)
            if lost:
                # Nothing moved, but "the source runs as before" is not true of it.
                raise lost_error(lost, "the migration", exc) from exc
            raise
        finally:
            control.close()
            if self.guardian is not None:
                if self.in_doubt:
                    self.guardian.note("in-doubt")  # it keeps delivering the decision
                    self.guardian.abandon()
                elif self.hand_back_failed:
                    self.guardian.abandon()  # it keeps trying to give the enclaves back
                elif self.resume_in_doubt:
                    self.guardian.abandon()  # it finds resume-sent and asks the destination
                else:
                    self.guardian.release()
            for transfer in self.transfers:
                if transfer.peer is not None:
                    transfer.peer.close()
                transfer.handed.sock.close()

    def _lost_enclaves(self, exc: BaseException) -> list[LostEnclave]:
        """The source enclaves that died before the decision, where nothing moved and
        the source application runs (:mod:`.enclave_loss`); [] otherwise.

        Not when the outcome is another: decided (committed, the resume sent, in
        doubt), lost after the commit, or the application itself ended (8).
        """

        decided = (InDoubtError, SourceGoneError, LostAfterCommitError, SourceLostError)
        if (
            self.committed or self.resume_sent or self.in_doubt
            or isinstance(exc, decided) or isinstance(exc.__cause__, InDoubtError)
            or self.source is None or not _alive(self.source.root)
        ):  # fmt: skip
            return []
        platform_state = self.opts.identity.directory.parent
        lost = []
        for transfer in [*self.abandoned, *self.transfers]:
            info = transfer.handed.info
            gone = self.dead_at_hand_back  # (read before the hand-back, if one came)
            if not (info.pid in gone if gone is not None else dead(info.pid)):
                continue
            mid = transfer.outgoing.migration_id if transfer.outgoing is not None else None
            if transfer.asked_to_commit and (
                not mid or committed_in_store(platform_state, mid, info.pid) is not False
            ):
                continue  # (it may have committed: that is no roll-back)
            lost.append(LostEnclave.of(transfer.handed.index, info, mid))
        return lost


def migrate(opts: MigrateOptions) -> MigrationOutcome:
    """Migrate the tree rooted at ``opts.pid`` to the agent at ``opts.to``.

    Raises :class:`~migsgx.errors.MigrationError` (or a subclass, or
    :class:`~migsgx.errors.CriuError`) when the migration did not happen;
    the source then runs on as before.
    """

    opts.identity.check()
    own_dir = opts.work_dir is None
    # Tools killed before us left their images in RAM: theirs go first (never a live one's).
    for path in sweep_dump_dirs():
        log.info("removed a dead tool's images directory %s", path)
    for group in cpugroups.sweep():  # (and their CPU cgroups: --criu-weight)
        log.info("removed a dead tool's CPU cgroup %s", group)
    migration = _Migration(opts)
    if own_dir and not opts.keep_images:
        # Made once the guardian knows its name (which it removes if this tool dies).
        dump_dir = migration.scratch = dump_dir_path()
    else:
        kept = make_dump_dir(keep=True) if own_dir else opts.work_dir
        assert kept is not None
        dump_dir = kept
        dump_dir.mkdir(parents=True, exist_ok=True)
    try:
        outcome = migration.run(dump_dir)
    except CriuError as exc:
        # CRIU failed before the commit point (a dump, a damaged page stream, a
        # restore): it resumed the source, and nothing runs on the destination.
        cause = exc.__cause__
        if isinstance(cause, InDoubtError):
            raise InDoubtError(str(cause)) from exc
        reason = cause if isinstance(cause, MigSGXError) else exc
        raise MigrationError(f"migration aborted, the source runs on: {reason}") from exc
    finally:
        if own_dir and not opts.keep_images:
            shutil.rmtree(dump_dir, ignore_errors=True)
    if own_dir and not opts.keep_images:
        outcome.images_dir = None
    return outcome
