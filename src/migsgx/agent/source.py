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
a process tree with CRIU, a runc or a podman container); this module drives
any of them through the same :class:`~migsgx.containers.Driver` seam, whose
``dump`` calls back (:meth:`_Migration._on_dumped`) with the source frozen.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import shutil
import socket
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, Final

from .._net import keep_alive
from .._trace import step
from ..containers import DumpPlan
from ..containers.postcopy import check_pipe_max_size, uncork
from ..containers.runc_lazy import free_port
from ..datapath.pagerelay import PageRelay, local_pair, relay_keys
from ..errors import (
    CriuError,
    EnclaveError,
    InDoubtError,
    MigrationError,
    MigSGXError,
    PageStreamError,
    PostCopyUnavailableError,
    SourceGoneError,
    SourceLostError,
)
from ..system import niceness as nice
from ..system.process import is_pidns_init, stop_tree, tree_pids
from . import early, precopy
from .applink import AppLink
from .ckpt_journal import start_time
from .control import CONNECT_TIMEOUT, AgentConnection
from .dumpdirs import dump_dir_path, make_dump_dir, sweep_dump_dirs
from .guardian import Guardian
from .journal import Journal
from .lazy import LazyDump
from .postcopy_choice import choose
from .protocol import IMAGE_CHUNK
from .source_commit import _DecisionSteps
from .source_state import MigrateOptions, MigrationOutcome, _alive, _host_id, _Transfer, keeps_tcp
from .versions import OVERLAPPED_ORDER

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

#: Files of the dump directory that stay on the source.
_LOCAL_ONLY: Final = frozenset({"dump.log"})


class _Migration(_DecisionSteps):
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
                    self.transfers = []
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

    # --- the checkpoint ------------------------------------------------------------------------
    def _dump(self, dump_dir: Path, ready: dict[str, Any]) -> None:
        opts = self.opts
        ident = opts.identity
        assert self.source is not None
        plan = DumpPlan(
            images=dump_dir,
            page_server=(
                (opts.to[0], int(ready["page_port"]))
                if self.page_server
                else self._lazy_address()
                if opts.post_copy
                else None
            ),
            page_tls=(ident.ca, ident.cert, ident.key),
            tcp_close=opts.tcp_close and not self.tcp_keep,
            tcp_keep=self.tcp_keep,
            shell_job=opts.shell_job,
            note=self._guardian_note,
            may_resume=lambda: not self.committed and not self.resume_sent,
            lazy=opts.post_copy,
            cancel=self.cancel,
            scratch_images=opts.work_dir is None and not opts.keep_images,
        )
        self.plan = plan
        self.note("dump")
        try:
            if opts.post_copy:
                self._dump_lazy(dump_dir, plan)
            else:
                # CRIU starts from this thread and keeps its niceness; the steps
                # after the dump (called back on this thread) run at the tool's own.
                own = nice.current()

                def dumped() -> None:
                    with nice.nice_at(own):
                        self._on_dumped(dump_dir)

                with nice.niceness(opts.criu_nice):
                    if self._relays_pages():
                        # Its threads start here, at CRIU's niceness: they carry its pages.
                        plan.page_fd = self._open_page_relay(ready)
                    self.driver.dump(self.source, plan, dumped)
        except MigSGXError as exc:
            relay = self.page_relay
            if relay is not None and relay.error is not None and not self.cancel.cancelled:
                # CRIU saw only a closed socket: the relay knows why (CRIU resumed the tree).
                why = PageStreamError(
                    f"CRIU's page stream failed ({relay.error}); the destination refuses "
                    "a stream that does not authenticate"
                )
                why.__cause__ = exc
                raise CriuError(str(why), action="dump") from why
            if not self.cancel.cancelled or self.post_dump_error is not None:
                raise
            # The dump failed because an enclave did: that is the cause to report.
            if self.cancel.stopped_early:
                how = (
                    "its page connection shut down" if self.cancel.broken
                    else "its page relay shut down" if self.cancel.cut and self.page_relay
                    else "its image directory filled up" if self.cancel.cut
                    else "step refused"
                )  # fmt: skip
                log.warning("CRIU's dump was stopped early (%s): an enclave stream failed", how)
            self._join_enclaves()
            for transfer in self.transfers:
                if transfer.error is not None:
                    err = transfer.error
                    raise MigrationError(
                        f"enclave {transfer.handed.index} did not migrate: "
                        f"{type(err).__name__}: {err}"
                    ) from exc
            raise
        finally:
            if self.page_relay is not None:
                self.cancel.remove_stop(self._stop_page_relay)
                self.page_relay.dispose()
        self.note("end")

    def _open_page_relay(self, ready: Mapping[str, Any]) -> int:
        """Connect to the destination's page port; CRIU's end of the local pair (its to close)."""

        try:
            wire = socket.create_connection(
                (self.opts.to[0], int(ready["page_port"])), timeout=CONNECT_TIMEOUT
            )
        except OSError as exc:
            raise MigrationError(f"cannot reach the destination's page port: {exc}") from exc
        wire.settimeout(None)
        # A stalled network must fail the relay (and CRIU's next page write) in
        # seconds: without it the frozen source waited for TCP to give up.
        keep_alive(wire)
        ours, theirs = local_pair()
        keys = relay_keys(self.data_key, self.session_id, source=True)
        self.page_relay = PageRelay(ours, wire, **keys).start()
        self.cancel.add_stop(self._stop_page_relay)
        return theirs.detach()

    def _stop_page_relay(self) -> int:
        """The cancel's stop: CRIU's next page write fails, and it resumes the tree."""

        if self.page_relay is None:
            return 0
        self.page_relay.abort("the dump was cancelled")
        return 1

    def _lazy_address(self) -> tuple[str, int]:
        """Where the source's CRIU serves lazy pages.

        The pid driver's CRIU listens on any address and may let the kernel
        pick the port (it logs it); runc wants both named: this host's address
        toward the destination, and a port free now.
        """

        if self.driver.name == "pid":
            return ("", self.opts.lazy_port)
        assert self.control is not None
        local = str(self.control.sock.getsockname()[0])
        return (local, self.opts.lazy_port or free_port())

    def _dump_lazy(self, dump_dir: Path, plan: DumpPlan) -> None:
        """Post-copy (agent/lazy.py): restore and commit after ``post-dump``, pages last."""

        source = self.source
        assert source is not None
        self.lazy = lazy = LazyDump(
            lambda on_dumped: self.driver.dump(source, plan, on_dumped),
            lambda: self._on_dumped(dump_dir),
            dump_dir,
        )
        lazy.wait_dumped()  # (a failure there: CRIU resumed the tree, still fenced by nobody)
        if plan.lazy_pids is not None:
            lazy.serving = plan.lazy_pids  # (a container engine's own CRIU)
        # If this tool dies before the commit point, the guardian ends the CRIU
        # that holds the tree (it may wait for a destination that never comes).
        serving = lazy.criu_pids()
        self._guardian_note("criu " + " ".join(map(str, serving)))
        # (CRIU logs the port only when the kernel picked it)
        assert plan.page_server is not None
        port = plan.page_server[1] or lazy.port(timeout=self.opts.io_timeout)
        self._inject(self._fault("tool.before-restore"))
        self._restore({"t": "restore", "lazy_port": port})
        for pid in serving:
            uncork(pid)  # (its answer to the destination's close request goes out at once)
        self._inject(self._fault("tool.before-commit"))
        if lazy.error is not None:
            # The only server of the tree's memory is gone: nothing may commit.
            raise MigrationError(f"the source's CRIU stopped serving pages: {lazy.error}")
        self._commit()  # (notes "resumed" once the destination runs)
        if self.lost_after_commit is not None:
            self._end_source()  # (the destination waited for its window to close)
            return
        self._window()

    def _window(self) -> None:
        """Until the destination has every page: its word, not CRIU's, ends the migration."""

        assert self.control is not None and self.lazy is not None and self.source is not None
        # The destination bounds the window itself (its I/O timeout) and always
        # answers; a dead peer is found by TCP keep-alive, not by a time limit here.
        self.control.sock.settimeout(None)
        try:
            reply = self.control.receive("resume", "window")
        except MigSGXError as exc:
            if exc.context.get("remote_code") == SourceLostError.code:
                self._source_lost(exc)
            self._end_source()
            raise InDoubtError(
                "the source enclaves committed and the destination tree ran, but the "
                f"destination did not report its process pages complete ({exc}); "
                "the source tree was killed"
            ) from exc
        self.window_seconds = float(reply["seconds"])
        self._end_source()

    def _on_dumped(self, dump_dir: Path) -> None:
        """The source is frozen and its images complete: move, restore, fence, commit."""

        self.note("dumped")
        if self.page_relay is not None:
            # CRIU closed its page connection: both directions must have ended
            # with their last frame, or nothing of this dump may be used.
            self.page_relay.wait(self.opts.io_timeout)
        if self._may_overlap():
            self._overlapped(dump_dir)
            return
        self._finish_enclaves()
        self._inject(self._fault("tool.before-images"))
        self._stream_images(dump_dir)
        self.note("images_sent")
        if self.opts.post_copy:
            # CRIU serves the pages once this returns, and may then resume the
            # tree on an error: the fence keeps it stopped until decided.
            self._fence()
            return
        self._restore({"t": "restore"})
        self._fence()
        self._inject(self._fault("tool.before-commit"))
        self._commit()  # (notes "resumed" once the destination runs)

    def _may_overlap(self) -> bool:
        """Whether the restore may run beside the enclave streams' end.

        Only once every enclave's attested handshake is done (the early
        handshake's default, a live migration's pre-copy): the destination
        restores nothing of a migration whose enclaves have not yet proved
        themselves to each other.
        """

        return (
            self.opts.overlap_restore
            # (an agent of version 1 knows only the sequential order)
            and self.control is not None
            and self.control.version >= OVERLAPPED_ORDER
            and bool(self.transfers)
            and not self.opts.post_copy
            and all(t.outgoing is not None and t.outgoing.migration_id for t in self.transfers)
        )

    def _overlapped(self, dump_dir: Path) -> None:
        """Images and restore while the enclave streams still load, then the join.

        The destination holds the tree stopped, its record not answered (a
        restarted agent removes it), until ``enclaves_ready``: the commit point
        stays after both answers, and nothing runs before COMMIT.
        """

        try:
            self._inject(self._fault("tool.before-images"))
            self._stream_images(dump_dir)
            self.note("images_sent")
            self.restore_asked.set()
            self._restore({"t": "restore"})
            self._inject(self._fault("tool.restored-loading"))
        except BaseException as exc:
            # The destination ends the session on this failure, and with it the
            # enclave streams: their errors follow from this one, reported instead.
            self.post_dump_error = exc
            raise
        finally:
            self.restore_asked.set()
            self.restore_answered.set()  # (a held enclave stream goes on, either way)
        self._finish_enclaves()
        self._fence()
        self._inject(self._fault("tool.before-commit"))
        self._commit()  # (notes "resumed" once the destination runs)

    def _restore(self, request: dict[str, Any]) -> None:
        restored = self.control_call(request, "restored")
        self.restored_pid = int(restored["pid"])
        self.stats["restore"] = float(restored["seconds"])
        self.note("restored")

    def _fence(self) -> None:
        """From here on the source never runs again unless rolled back."""

        assert self.source is not None
        self.fenced = tree_pids(self.source.root)
        stop_tree(self.fenced)
        if self.guardian is not None:
            self.guardian.note("fence " + " ".join(map(str, self.fenced)))
        if self.journal is not None:
            starts = [start_time(p) for p in self.fenced]
            self.journal.update(fenced=self.fenced, fenced_starts=starts, phase="fenced")

    def _stream_images(self, dump_dir: Path) -> None:
        files = sorted(p for p in dump_dir.iterdir() if p.is_file() and p.name not in _LOCAL_ONLY)
        assert self.control is not None
        for path in files:
            with path.open("rb") as src:
                first = True
                while True:
                    chunk = src.read(IMAGE_CHUNK)
                    if not chunk and not first:
                        break
                    self.control.send({"t": "image", "name": path.name, "data": chunk})
                    self.image_bytes += len(chunk)
                    first = False
                    if len(chunk) < IMAGE_CHUNK:
                        break
        reply = self.control_call(
            {"t": "images_done", "files": len(files), "bytes": self.image_bytes}, "images_ok"
        )
        # Without the page server, the pages came as images (counted there already).
        self.page_bytes = int(reply["page_bytes"]) if self.page_server else 0
        self.destination_images_fs = str(reply.get("images_fs") or "")


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
