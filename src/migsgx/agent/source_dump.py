"""The frozen part of ``migsgx migrate``: CRIU's dump and the steps of its ``post-dump``.

CRIU dumps the tree, its pages straight to the destination (through the sealed
page relay, or CRIU's own TLS); in the ``post-dump`` callback, with the source
frozen, the other images go, the destination restores the tree and holds it
stopped, the source tree is fenced (SIGSTOP queued while CRIU still freezes
it) and the enclaves commit (:mod:`.source_commit`).  With ``post_copy``
(:mod:`.lazy`) the restore and the commit come after ``post-dump`` instead, and
the destination's ``window`` answer ends the migration.

What the whole migration does around it (prepare, guardian, journal, what a
failure is called) is :mod:`.source`'s; this layer sits between it and the
decision (:mod:`.source_commit`).
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

from .._net import keep_alive
from ..containers import DumpPlan
from ..containers.postcopy import uncork
from ..containers.runc_lazy import free_port
from ..datapath.pagerelay import PageRelay, local_pair, relay_keys
from ..errors import (
    CriuError,
    InDoubtError,
    MigrationError,
    MigSGXError,
    PageStreamError,
    SourceLostError,
)
from ..system import cpugroups
from ..system import niceness as nice
from ..system.process import stop_tree, tree_pids
from .ckpt_journal import start_time
from .control import CONNECT_TIMEOUT
from .lazy import LazyDump
from .protocol import IMAGE_CHUNK
from .source_commit import _DecisionSteps
from .versions import OVERLAPPED_ORDER

__all__: list[str] = []

log = logging.getLogger("migsgx.migrate")

#: Files of the dump directory that stay on the source.
_LOCAL_ONLY: Final = frozenset({"dump.log"})
#: How long a connection fault at ``tool.in-dump`` holds CRIU's dump at most: longer
#: than the liveness bound by far, so that only a stall noticed inside the dump ends it.
IN_DUMP_HOLD: Final = 20.0


class _DumpSteps(_DecisionSteps):
    """CRIU's dump, and what runs while it holds the source frozen."""

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
            frozen=self._in_dump,
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

                with nice.niceness(opts.criu_nice), cpugroups.weighted(opts.criu_weight):
                    if self._relays_pages():
                        # Its threads start here, at CRIU's niceness: they carry its pages.
                        plan.page_fd = self._open_page_relay(ready)
                    self.driver.dump(self.source, plan, dumped)
        except MigSGXError as exc:
            if self._control_cut is not None and self.cancel.reason == self._control_cut:
                raise MigrationError(
                    f"{self._control_cut}: CRIU's dump was stopped, the source runs on"
                ) from exc
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

    #: The cancel's reason when the control connection's failure stopped the dump.
    _control_cut: str | None = None

    def _control_dead(self, reason: str) -> None:
        """The control connection failed (its liveness watch): a dump under way stops at
        once, so the source runs again within the liveness bound of the fault, not that
        bound after the dump.  From ``dumped`` on the tool uses the connection itself
        (its send or receive fails at once) and may be past the commit point."""

        if "dumped" not in self.t:
            self._control_cut = f"the control connection to the destination failed ({reason})"
            self.cancel.cancel(self._control_cut)

    def _in_dump(self) -> None:
        """Fault injection at ``tool.in-dump``: CRIU froze the tree and waits for this
        answer.  A connection fault there (``stall-control``) is held in the dump
        until the tool gives the dump up (at most :data:`IN_DUMP_HOLD`): a long
        step of the engine, in which the stall must be noticed."""

        action = self._fault("tool.in-dump")
        if action is None or not action.endswith(("-control", "-data")):
            return
        self._inject(action)
        deadline = time.monotonic() + IN_DUMP_HOLD
        while not self.cancel.cancelled and time.monotonic() < deadline:
            time.sleep(0.01)
        self.cancel.check()

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
