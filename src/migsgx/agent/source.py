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
import os
import resource
import secrets
import shutil
import signal
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from .._net import keep_alive
from ..containers import ContainerSettings, Driver, DumpPlan, HostConfig, Source, make_driver
from ..containers.postcopy import check_pipe_max_size
from ..containers.runc_lazy import free_port
from ..core.rounds import StopRules
from ..criu import Criu, DumpCancel
from ..datapath.engine import EnclaveLink, OutgoingEnclave
from ..datapath.pagerelay import PageRelay, local_pair, relay_keys
from ..errors import (
    ConfigError,
    CriuError,
    InDoubtError,
    LostAfterCommitError,
    MigrationError,
    MigSGXError,
    PageStreamError,
    PostCopyUnavailableError,
    ProtocolError,
    SourceGoneError,
    SourceLostError,
)
from ..host.appctl import info_to_wire
from ..system import niceness as nice
from ..system.process import is_pidns_init, process_state, stop_tree, tree_pids
from . import early, precopy, preflight
from .applink import AppLink, HandedEnclave
from .ckpt_journal import start_time
from .control import CONNECT_TIMEOUT, AgentConnection
from .datalink import open_data
from .dumpdirs import dump_dir_path, make_dump_dir, sweep_dump_dirs
from .faults import (
    connection_fault,
    dying,
    fault,
    firewall_drop,
    flipping_relay,
    kill_dead,
    socket_owner,
)
from .guardian import Guardian
from .handback import abort_enclave
from .journal import Journal
from .lazy import LazyDump
from .precopy import RoundReport
from .protocol import (
    IMAGE_CHUNK,
    VERSION,
    RefusedError,
    plain_stats,
)
from .redeliver import HeldEnclave
from .tls import AgentIdentity

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

#: The guardian's notes that say how to give a container back (kept in the journal too).
UNDO_NOTES: Final = frozenset({"criu", "netup", "thaw"})

#: Files of the dump directory that stay on the source.
_LOCAL_ONLY: Final = frozenset({"dump.log"})

Progress = Callable[[str], None]


@dataclass
class MigrateOptions:
    pid: int  # the root of the tree (driver "pid"); 0 with a container ``target``
    to: tuple[str, int]
    identity: AgentIdentity
    criu: Criu = field(default_factory=Criu)
    driver: str = "pid"  # what migrates: a name of migsgx.containers.DRIVERS
    target: str | None = None  # the driver's name for it (a container id); default: pid
    containers: ContainerSettings = field(default_factory=ContainerSettings)
    work_dir: Path | None = None  # default: a fresh directory in /dev/shm
    keep_images: bool = False
    prepare_timeout: float = 30.0
    io_timeout: float = 300.0
    chunk_size: int | None = None
    mode: str = "pipelined"
    tcp_close: bool = True
    #: Keep established TCP connections open across the move: None = wherever the
    #: workload owns an address that moves with it; True = required (else an error).
    tcp_established: bool | None = None
    shell_job: bool = False
    progress: Progress | None = None
    # Live migration (agent/precopy.py): pre-copy rounds before the freeze.
    live: bool = False
    stop_rules: StopRules | None = None
    round_report: RoundReport | None = None
    # Post-copy (agent/lazy.py): the process's private memory follows after the commit.
    post_copy: bool = False
    lazy_port: int = 0  # where the source's CRIU serves it (0: a port the kernel picks)
    # Stop-and-copy: the destination enclaves launch and attest before the freeze.
    early_handshake: bool = True
    #: The pid driver's pages through the sealed relay (``docs/spec/pagestream.md``);
    #: False: in CRIU's own TLS (GnuTLS), the slower path kept for comparison.
    page_relay: bool = True
    #: CRIU's dump (with its page stream: the page relay's source end too) this much
    #: nicer than the tool's other threads, the enclave streams beside it (negative:
    #: less nice).
    criu_nice: int = 0


@dataclass
class MigrationOutcome:
    stats: dict[str, Any]
    restored_pid: int
    images_dir: Path | None


@dataclass
class _Transfer:
    handed: HandedEnclave
    outgoing: OutgoingEnclave | None = None
    peer: socket.socket | None = None
    stats: dict[str, Any] = field(default_factory=dict)
    error: BaseException | None = None


class _Migration:
    def __init__(self, opts: MigrateOptions) -> None:
        self.opts = opts
        self.t: dict[str, float] = {"start": time.monotonic()}
        self.stats: dict[str, Any] = {}
        self.transfers: list[_Transfer] = []
        self.link: AppLink | None = None
        self.guardian: Guardian | None = None
        self.control: AgentConnection | None = None
        self.fenced: list[int] = []
        self.committed = False
        self.lost_after_commit: LostAfterCommitError | None = None
        self.resume_sent = False
        self.hand_back_failed = False
        self.restored_pid = 0
        self.image_bytes = 0
        self.page_bytes = 0
        self.driver: Driver = make_driver(opts.driver, HostConfig(opts.criu, opts.containers))
        self.source: Source | None = None
        self.tcp_keep = False
        self.page_server = False
        self.page_relay: PageRelay | None = None
        self.session_id = b""
        # The migration group of the source enclaves (``__mig_group``): fresh, never
        # the session id, which the destination, journals and logs carry.  Whoever
        # knows a group id can record a decision in it from an enclave of their own.
        self.group_id = secrets.token_bytes(16)
        self.journal: Journal | None = None
        self.in_doubt = False
        self.data_key = b""
        self._journal_lock = threading.Lock()
        self.lazy: LazyDump | None = None
        self.plan: DumpPlan | None = None
        #: The tool's own images directory (removed by whoever outlives a killed tool).
        self.scratch: Path | None = None
        self.window_seconds: float | None = None
        #: A failed enclave stream stops CRIU's dump at once (the source runs again).
        self.cancel = DumpCancel()

    def note(self, phase: str) -> None:
        self.t[phase] = time.monotonic()
        if self.opts.progress is not None:
            self.opts.progress(phase)

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
        # Pages travel only integrity-protected: TLS to a page server, or the TLS channel
        # (post-copy: CRIU's own TLS from the source's lazy server).
        self.page_server = self.driver.uses_page_server(True) and not opts.post_copy
        self.control = control = AgentConnection(opts.to, opts.identity, opts.io_timeout)
        try:
            control.call({"t": "hello", "version": VERSION, "host_id": _host_id(opts)}, "welcome")
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
                self._inject(self._fault("tool.after-prepare"))
                begin = self._begin(pids, pidns) if ready is None else None
                self.journal = Journal.start(
                    opts.identity.directory, self.session_id, opts.to,
                    link.pid if link else pid, link.name if link else "-",
                )  # fmt: skip
                self._guardian_note(f"journal {self.journal.path}")
                if self.scratch is not None:
                    self.journal.update(dump_dir=str(self.scratch))
                self._guardian_enclaves(handed)
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
                self._join_enclaves()
                undecided = not self.committed and not self.resume_sent
                gone = undecided and not _alive(pid)
                if undecided:
                    self._roll_back(exc, source_gone=gone)
                elif self.committed and not isinstance(exc, SourceLostError):
                    self.in_doubt = True
                if gone and isinstance(exc, Exception):
                    # Whatever failed first, the reason is that the application ended.
                    raise SourceGoneError(
                        f"the source {source.label} (pid {pid}) ended during the migration: "
                        f"nothing moved, and its enclaves ended with it ({type(exc).__name__})"
                    ) from exc
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
                else:
                    self.guardian.release()
            for transfer in self.transfers:
                if transfer.peer is not None:
                    transfer.peer.close()
                transfer.handed.sock.close()

    def _begin(self, pids: list[int], pidns: bool) -> dict[str, Any]:
        assert self.source is not None
        self.session_id = secrets.token_bytes(16)
        begin: dict[str, Any] = {
            "t": "begin",
            "session_id": self.session_id,
            "enclaves": [{"info": info_to_wire(t.handed.info)} for t in self.transfers],
            "pids": pids,
            "pidns": pidns,
            "tcp_close": self.opts.tcp_close and not self.tcp_keep,
            # Pages sealed by the agents' relay, or in CRIU's TLS (post-copy too).
            "page_tls": (self.page_server and not self._relays_pages()) or self.opts.post_copy,
        }
        if self._relays_pages():
            begin["page_relay"] = True
        if self.driver.name != "pid":
            begin.update(driver=self.driver.name, target=self.source.target)
        begin.update(preflight.announce(self.driver.name, self.source, pids))
        if not self.page_server:
            begin["page_server"] = False
        if self.opts.post_copy:
            begin["post_copy"] = True
        return begin

    # --- enclaves ----------------------------------------------------------------------------
    def _precopy(self, pids: list[int], pidns: bool) -> dict[str, Any]:
        """Live: side channels, ``begin``, every enclave's rounds; the application runs on."""

        assert self.link is not None and self.control is not None
        self.note("precopy")
        self.transfers = [_Transfer(h) for h in self.link.side()]
        ready = self.control.call(self._begin(pids, pidns), "ready")

        def connect(index: int) -> socket.socket:
            peer = socket.create_connection(
                (self.opts.to[0], int(ready["data_port"])), timeout=CONNECT_TIMEOUT
            )
            peer.settimeout(None)
            open_data(peer, ready["data_key"], self.session_id, index)
            return peer

        try:
            precopy.run_precopy(
                self.transfers, connect, rules=self.opts.stop_rules,
                chunk_size=self.opts.chunk_size, report=self.opts.round_report,
            )  # fmt: skip
        except BaseException as exc:
            with contextlib.suppress(MigSGXError):
                self.control.call({"t": "abort", "reason": f"pre-copy failed: {exc}"}, "aborted")
            raise
        self.note("precopied")
        return ready

    def _handshake_early(self, pids: list[int], pidns: bool) -> dict[str, Any] | None:
        """Before the freeze: ``begin`` and every enclave's handshake (:mod:`.early`).

        ``None`` (and nothing begun) for an application without enclaves.
        """

        assert self.link is not None and self.control is not None
        sides = self.link.side()
        if not sides:
            return None
        self.note("handshake")
        self.transfers = [_Transfer(h) for h in sides]
        try:
            ready = self.control.call(self._begin(pids, pidns), "ready")
        except BaseException:
            early.abandon(self.transfers, "begin failed")
            raise
        try:
            early.handshake_all(
                self.transfers, lambda index: self._connect(index, ready),
                mode=self.opts.mode, chunk_size=self.opts.chunk_size,
            )  # fmt: skip
        except BaseException as exc:
            with contextlib.suppress(MigSGXError):
                self.control.call({"t": "abort", "reason": str(exc)[:500]}, "aborted")
            raise
        self.note("handshaken")
        self._inject(self._fault("tool.after-handshake"))
        return ready

    def _adopt(self, handed: list[HandedEnclave]) -> None:
        try:
            early.adopt(self.transfers, handed)
        except ProtocolError:
            assert self.link is not None
            with contextlib.suppress(MigSGXError):
                self.link.resume([h.sock for h in handed])  # the application's, back to it
            raise

    def _connect(self, index: int, ready: dict[str, Any]) -> tuple[socket.socket, socket.socket]:
        """Enclave ``index``'s authenticated data connection to the destination agent,
        and what the enclave's transfer uses (itself, or a fault's relay in front of it)."""

        peer = socket.create_connection((self.opts.to[0], int(ready["data_port"])),
                                        timeout=CONNECT_TIMEOUT)  # fmt: skip
        peer.settimeout(None)
        open_data(peer, ready["data_key"], self.session_id, index)
        action = fault("tool.enclave-stream")
        if action is not None and action.startswith("flip-byte="):
            return peer, flipping_relay(peer, int(action.partition("=")[2]))
        if action is not None and action.startswith("flip-byte-in-dump="):
            # The damaged byte goes on once CRIU wrote 1 MiB of pages: mid-dump.
            return peer, flipping_relay(peer, int(action.partition("=")[2]), self._pages_written)
        return peer, peer

    def _pages_written(self) -> bool:
        """Fault injection: whether this dump's CRIU wrote 1 MiB of pages already."""

        if self.plan is None:
            return False
        with contextlib.suppress(OSError):
            for path in self.plan.images.glob("pages-*.img"):
                if path.stat().st_size >= 1 << 20:
                    return True
        return False

    def _start_enclaves(self, ready: dict[str, Any]) -> None:
        self._threads: list[threading.Thread] = []
        if not self.transfers:
            return
        kwargs: dict[str, Any] = {"mode": self.opts.mode}
        if self.opts.chunk_size is not None:
            kwargs["chunk_size"] = self.opts.chunk_size
        for position, transfer in enumerate(self.transfers):
            h = transfer.handed
            if transfer.outgoing is None:  # (live: made for the pre-copy)
                transfer.outgoing = OutgoingEnclave(h.sock, h.info, h.image_files, **kwargs)
            transfer.outgoing.on_handshake = self._journal_enclave
            transfer.outgoing.link.before_ring_fds = lambda: self._inject(
                self._fault("tool.ring-handover")
            )
            transfer.outgoing.index = position
            if transfer.outgoing.migration_id is not None:  # (live: its handshake is done)
                self._journal_enclave(position, transfer.outgoing.migration_id)
        self.note("enclaves")
        self._threads = [
            threading.Thread(
                target=self._transfer, args=(t, ready), name=f"migsgx-enclave-{i}", daemon=True
            )
            for i, t in enumerate(self.transfers)
        ]
        for thread in self._threads:
            thread.start()

    def _journal_enclave(self, index: int, migration_id: bytes) -> None:
        """Before its dump starts, an enclave's own migration id goes to the journal."""

        if self.journal is None:
            return
        with self._journal_lock:
            mids = list(self.journal.data["enclave_mids"]) or [""] * len(self.transfers)
            mids[index] = migration_id.hex()
            self.journal.update(enclave_mids=mids)

    def _join_enclaves(self) -> None:
        for thread in getattr(self, "_threads", []):
            thread.join()

    def _finish_enclaves(self) -> None:
        """Every enclave LOADED at the destination (or the migration fails here)."""

        if not self.transfers:
            self.control_call({"t": "enclaves_done"}, "enclaves_ready")
            return
        self._join_enclaves()
        for transfer in self.transfers:
            if transfer.error is not None:
                err = transfer.error
                raise MigrationError(
                    f"enclave {transfer.handed.index} did not migrate: {type(err).__name__}: {err}"
                ) from err
        self.note("enclaves_sent")
        reply = self.control_call({"t": "enclaves_done"}, "enclaves_ready")
        self.stats["enclaves_destination"] = reply["stats"]

    def _transfer(self, transfer: _Transfer, ready: dict[str, Any]) -> None:
        if self.opts.live and transfer.peer is not None:
            try:
                transfer.stats = precopy.finish(transfer)
            except BaseException as exc:
                transfer.error = exc
                self._enclave_failed(transfer, exc)
            return
        try:
            peer = transfer.peer  # (an early handshake connected it, and uses its own)
            if peer is None:
                transfer.peer, peer = self._connect(transfer.handed.index, ready)
            t0 = time.monotonic()
            assert transfer.outgoing is not None
            stats = transfer.outgoing.transfer(peer)
            transfer.stats = {**plain_stats(stats), "timeline": stats.get("timeline", {})}
            transfer.stats["tool_seconds"] = time.monotonic() - t0
        except BaseException as exc:
            transfer.error = exc
            self._enclave_failed(transfer, exc)

    def _enclave_failed(self, transfer: _Transfer, exc: BaseException) -> None:
        """An enclave stream failed, so the migration will not happen: stop the dump now.

        Waiting for CRIU to finish a dump whose result is thrown away keeps the
        source frozen for seconds; cancelled, CRIU resumes the tree at once.
        """

        if not self.committed:
            self.cancel.cancel(f"enclave {transfer.handed.index}: {type(exc).__name__}: {exc}")

    def control_call(self, msg: Mapping[str, Any], expect: str) -> dict[str, Any]:
        assert self.control is not None
        return self.control.call(msg, expect)

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
            if not self.cancel.cancelled:
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

    def _relays_pages(self) -> bool:
        return self.page_server and self.driver.name == "pid" and self.opts.page_relay

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
        self._guardian_note("criu " + " ".join(map(str, lazy.criu_pids())))
        # (CRIU logs the port only when the kernel picked it)
        assert plan.page_server is not None
        port = plan.page_server[1] or lazy.port(timeout=self.opts.io_timeout)
        self._fault("tool.before-restore")
        self._restore({"t": "restore", "lazy_port": port})
        self._inject(self._fault("tool.before-commit"))
        if lazy.error is not None:
            # The only server of the tree's memory is gone: nothing may commit.
            raise MigrationError(f"the source's CRIU stopped serving pages: {lazy.error}")
        self._commit()  # (notes "resumed" once the destination runs)
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

    def _source_lost(self, exc: MigSGXError) -> None:
        self._end_source()
        raise SourceLostError(
            "the source stopped serving process pages inside the post-copy window, after "
            f"the commit point ({exc}); the destination killed its tree: the application "
            "is lost"
        ) from exc

    def _end_source(self) -> None:
        """Committed: the source tree (stopped since the fence) never runs again."""

        assert self.lazy is not None
        if not self.lazy.finish(5.0):
            self.lazy.stop()
        for pid in self.fenced:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self._settle(True)

    def _settle(self, committed: bool) -> None:
        """Post-copy: a driver whose source outlived its dump removes or resumes it."""

        settle = self.plan.settle if self.plan is not None else None
        if settle is None:
            return
        try:
            settle(committed)
        except MigSGXError as exc:
            what = "removed" if committed else "resumed"
            label = self.source.label if self.source is not None else "?"
            log.error("the source %s could not be %s: %s", label, what, exc)

    def _fault(self, point: str) -> str | None:
        """A fault point of the tool; ``kill-source`` there SIGKILLs the source application.

        Returns the action, for the fault points that also kill other parties
        (:meth:`_inject`).
        """

        action = fault(point)
        if action == "kill-source" and self.source is not None:
            root = self.source.root
            with contextlib.suppress(ProcessLookupError):
                os.kill(root, signal.SIGKILL)
            while not dying(root):  # SIGKILL cannot be ignored
                time.sleep(0.01)
        return action

    def _guardian_enclaves(self, handed: Sequence[HandedEnclave]) -> None:
        """What the guardian needs to deliver a committed enclave's state again (W2)."""

        if self.guardian is None or self.journal is None:
            return
        described = []
        for position, h in enumerate(handed):
            held = HeldEnclave(h.sock, h.info, dict(h.image_files), self.opts.mode)
            described.append(held.describe())
            self.guardian.note(f"enclave {position} {described[-1]}")
        # Each enclave keeps a duplicate of this end of its connection: should this
        # tool and its guardian both die, it keeps its state (committed: the state to
        # deliver again; undecided: the application's writes) instead of ending, and
        # ``migsgx recover`` takes the duplicate back (``recover.HeldSource``).
        holders = [self._hold(h) for h in handed]
        self.journal.update(guardian_pid=self.guardian.proc.pid, enclaves=described,
                            holders=holders)  # fmt: skip

    def _hold(self, h: HandedEnclave) -> list[object]:
        """``[pid, fd, start]`` of the duplicate enclave ``h`` now holds; [] if it holds none."""

        links = [t.outgoing.link for t in self.transfers if t.handed is h and t.outgoing]
        link = next((k for k in links if k.sock is h.sock), None) or EnclaveLink(h.sock)
        try:
            return [h.info.pid, link.hold(), start_time(h.info.pid)]
        except (MigSGXError, OSError) as exc:
            log.warning("enclave %d keeps no duplicate of its connection: %s", h.index, exc)
            return []

    def _guardian_note(self, line: str) -> None:
        if self.guardian is not None:
            self.guardian.note(line)
        if self.journal is not None and line.split(" ", 1)[0] in UNDO_NOTES:
            # ``migsgx recover`` gives the source back the same way if the guardian is gone.
            # (a driver notes from its dump's thread too)
            with self._journal_lock:
                self.journal.update(undo=[*self.journal.undo, line])

    def _on_dumped(self, dump_dir: Path) -> None:
        """The source is frozen and its images complete: move, restore, fence, commit."""

        self.note("dumped")
        if self.page_relay is not None:
            # CRIU closed its page connection: both directions must have ended
            # with their last frame, or nothing of this dump may be used.
            self.page_relay.wait(self.opts.io_timeout)
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
            self.journal.update(fenced=self.fenced, phase="fenced")

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

    def _commit(self) -> None:
        if self.transfers:
            self._commit_enclaves()
            self.note("committed")
            self._inject(fault("tool.after-commit"))
            # The tokens go on the data connections, and again with ``resume`` over
            # the agents' TLS channel: a dropped data connection loses nothing.
            for transfer in self.transfers:
                try:
                    assert transfer.outgoing is not None
                    transfer.outgoing.deliver(_token_fault(transfer, fault("tool.before-token")))
                except MigSGXError as exc:
                    log.warning("enclave %d: %s", transfer.handed.index, exc)
                    self._redeliver(transfer)
            tokens = [(t.outgoing.token if t.outgoing else None) or b"" for t in self.transfers]
            try:
                reply = self.control_call({"t": "resume", "tokens": tokens}, "resumed")
            except MigSGXError as exc:
                if self.lazy is not None and exc.context.get("remote_code") == SourceLostError.code:
                    self._source_lost(exc)
                if exc.context.get("remote_code") != LostAfterCommitError.code:
                    raise InDoubtError(
                        "the source enclaves committed, but the destination did not confirm "
                        f"that it runs ({exc}); the source stays stopped: run migsgx recover"
                    ) from exc
                # Decided and claimed, then lost (W3): nothing is in doubt and nothing
                # can bring the state back; the source goes as after a success.
                self.lost_after_commit = LostAfterCommitError(
                    f"lost after the commit: {exc}", remote_code=LostAfterCommitError.code
                )
                reply = {"attach_seconds": 0.0}
            # The destination runs (or its copy was lost after the claim): the
            # downtime ends here, and the committed source enclaves may go (their
            # wipe is no part of it).
            self.note("resumed")
            if self.journal is not None:
                self.journal.update(phase="done")
            # (the committed source enclaves still hold their state and a duplicate of
            # their connection: ``migsgx recover`` releases them if nobody else does)
            self._inject(self._fault("tool.before-release"))
            released = 0
            for transfer in self.transfers:
                try:
                    assert transfer.outgoing is not None
                    transfer.outgoing.release()
                    released += 1
                except MigSGXError as exc:
                    log.warning("enclave %d: release: %s", transfer.handed.index, exc)
            if self.journal is not None and released == len(self.transfers):
                self.journal.update(holders=[])  # (they wiped and exited: none holds any)
        else:
            self.resume_sent = True
            if self.guardian is not None:
                self.guardian.note("resume-sent")
            self.note("committed")
            fault("tool.after-commit")
            try:
                reply = self.control_call({"t": "resume"}, "resumed")
            except RefusedError:
                self.resume_sent = False  # the destination refused, and killed what it held
                raise
            self.note("resumed")
        self.stats["attach"] = float(reply["attach_seconds"])

    def _redeliver(self, transfer: _Transfer) -> None:
        """The token did not reach a copy: if that copy is gone, deliver the state again.

        Window W2 (``docs/spec/commit.md``): the destination enclave died after
        the decision, before it claimed the migration id.  The committed source
        enclave still holds the state; the agent launches a fresh enclave and
        the state goes again, attested and keyed anew, same migration id.  A
        failure here changes nothing: ``resume`` then tells the outcome.
        """

        assert transfer.outgoing is not None
        index = transfer.handed.index
        try:
            reply = self.control_call({"t": "redeliver", "index": index}, "redelivery")
            port = int(reply["data_port"])
            if not port:
                return  # that copy still waits: the token goes again with ``resume``
            peer = socket.create_connection((self.opts.to[0], port), timeout=CONNECT_TIMEOUT)
            if transfer.peer is not None:
                transfer.peer.close()
            transfer.peer = peer
            peer.settimeout(None)
            open_data(peer, self.data_key, self.session_id, index)
            transfer.outgoing.redeliver(peer)
            self.stats["redelivered"] = int(self.stats.get("redelivered", 0)) + 1
            log.warning("enclave %d: the state was delivered again to a fresh enclave", index)
        except (MigSGXError, OSError) as exc:
            log.warning("enclave %d: delivering the state again failed: %s", index, exc)

    def _inject(self, action: str | None) -> None:
        """Fault injection that kills another party of this host (the fault matrix)."""

        if action in ("kill-guardian", "kill-guardian-and-tool") and self.guardian is not None:
            kill_dead([self.guardian.proc.pid])
            if action == "kill-guardian-and-tool":
                os.kill(os.getpid(), signal.SIGKILL)
        elif action == "kill-source-enclave":
            kill_dead([t.handed.info.pid for t in self.transfers])
        elif action == "kill-criu" and self.lazy is not None:
            self.lazy.stop()  # post-copy: the only server of the pages still missing dies
        elif action == "kill-source-platform":
            kill_dead([socket_owner(self.opts.identity.directory.parent / "enclave.sock")])
        elif action is not None and action.endswith("-control") and self.control is not None:
            # A network fault of the control connection (no process dies).
            connection_fault(self.control.sock, action.removesuffix("-control"))
        elif action is not None and action.endswith("-data"):
            # The same, of every enclave's data connection.
            for transfer in self.transfers:
                if transfer.peer is not None:
                    connection_fault(transfer.peer, action.removesuffix("-data"))

    def _commit_enclaves(self) -> None:
        """Every source enclave decides COMMIT; the first one that does is the commit point.

        First every enclave learns the migration's group (a fresh id): from
        the first COMMIT on, the source host's platform store refuses an abort of
        any of them, so that whoever finishes a migration cut between two commits
        (the guardian, an enclave whose driver died) commits the rest.
        """

        for transfer in self.transfers:
            assert transfer.outgoing is not None
            transfer.outgoing.join_group(self.group_id)
        for transfer in self.transfers:
            if self.committed:
                self._inject(self._fault("tool.between-commits"))
            try:
                assert transfer.outgoing is not None
                transfer.outgoing.decide()
            except MigSGXError as exc:
                if not self.committed:
                    raise  # nothing was decided: roll back
                # Some enclaves committed, this one did not: neither way is whole.
                raise InDoubtError(
                    f"enclave {transfer.handed.index} did not commit after others did ({exc}): "
                    "the tree is left held on the destination and stopped here"
                ) from exc
            self.committed = True
            if self.journal is not None:
                self.journal.update(phase="committed")

    # --- roll back -----------------------------------------------------------------------------
    def _roll_back(self, cause: BaseException, *, source_gone: bool = False) -> None:
        reason = f"{type(cause).__name__}: {cause}"[:500]
        log.warning("migration aborted: %s", reason)
        # The source enclaves decide ABORT first; their frames go on the data
        # connections and again with the agent's ``abort``, since a destination
        # enclave that sent LOADED ends only on one of them.
        socks: list[socket.socket] = []
        frames: list[bytes] = []
        for transfer in self.transfers:
            sock = transfer.handed.sock
            if transfer.outgoing is not None:
                try:
                    # Nothing committed here (else this is no roll-back): the
                    # enclaves abort even with their platform service gone.
                    sock = transfer.outgoing.abort(reason, none_committed=not self.committed)
                except Exception as exc:
                    log.warning("enclave %d: abort failed: %s", transfer.handed.index, exc)
            else:
                abort_enclave(sock)  # (no migration began: it only lets its duplicate go)
            socks.append(sock)
            frames.append(getattr(transfer.outgoing, "abort_frame", b"") or b"")
        if self.journal is not None:
            self.journal.update(phase="aborted")
        fault("tool.after-abort")
        if self.control is not None:
            with contextlib.suppress(MigSGXError):
                abort: dict[str, Any] = {"t": "abort", "reason": reason}
                if self.transfers:
                    abort["frames"] = frames
                reply = self.control.call(abort, "aborted")
                if not reply.get("held") and self.journal is not None:
                    self.journal.update(phase="done")  # the destination kept nothing
        if self.lazy is not None:
            self.lazy.stop()  # CRIU lets go of the tree before it is thawed
        for pid in self.fenced:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        self._settle(False)
        if source_gone:
            # Nobody to hand the enclaves back to: closing their connections ends them.
            log.warning("the source application is gone; its enclaves end with it")
            return
        if self.link is not None and socks:
            try:
                self.link.resume(socks)
            except MigSGXError as exc:
                log.error("the enclaves could not be handed back (the guardian retries): %s", exc)
                self.hand_back_failed = True

    # --- figures -----------------------------------------------------------------------------
    def _figures(self) -> dict[str, Any]:
        t = self.t

        def span(a: str, b: str) -> float:
            return max(0.0, t[b] - t[a]) if a in t and b in t else 0.0

        dest = self.stats.get("enclaves_destination", [])
        enclave_bytes = sum(int(s.get("bytes", 0)) for s in (x.stats for x in self.transfers))
        load = max((float(s.get("agent_seconds", 0.0)) for s in dest), default=0.0)
        figures: dict[str, Any] = {
            "freeze": span("prepare", "prepared"),
            "enclave_dump": span("enclaves", "enclaves_sent"),
            "criu_dump": span("dump", "dumped"),
            "transfer": span("dumped", "images_sent"),
            "restore": self.stats.get("restore", span("images_sent", "restored")),
            "enclave_load": load,
            "total": span("start", "end"),
            "downtime": span("prepare" if self.transfers else "dump", "resumed"),
            "bytes": enclave_bytes + self.page_bytes + self.image_bytes,
        }
        if self.opts.live:
            figures["precopy"] = span("precopy", "precopied")
        if self.opts.post_copy:
            # From the destination tree's start to its last page: it needs the source.
            figures["post_copy_window"] = self.window_seconds
        figures["details"] = {
            "commit": span("restored", "committed"),
            "resume": span("committed", "resumed"),
            "attach": self.stats.get("attach", 0.0),
            "process_downtime": span("dump", "resumed"),
            # Before the freeze: begin, connections, launches, attested handshakes.
            "early_handshake": span("handshake", "handshaken"),
            "enclaves": len(self.transfers),
            "enclave_bytes": enclave_bytes,
            "page_bytes": self.page_bytes,
            # How CRIU's pages travelled: "relay" (sealed frames), "criu-tls", or "none".
            "page_path": (
                ("relay" if self._relays_pages() else "criu-tls") if self.page_server else "none"
            ),
            "page_relay_bytes": self.page_relay.sent if self.page_relay is not None else 0,
            "image_bytes": self.image_bytes,
            "restored_pid": self.restored_pid,
            "enclave_stats": [x.stats for x in self.transfers],
            "enclave_destination_stats": [plain_stats(s) for s in dest],
            "driver": self.driver.name,
            "workload": self.source.label if self.source is not None else "",
            "tcp_established": self.tcp_keep,
            # CPU of this process (its enclave streams' ends, the control channel)
            # and of its reaped children (CRIU's dump, with its page stream).
            "tool_cpu_seconds": time.process_time(),
            "tool_children_cpu_seconds": _children_cpu(),
        }
        if "resume_warning" in self.stats:
            figures["details"]["warning"] = self.stats["resume_warning"]
        figures["timeline"] = self._timeline(dest)
        return figures

    def _timeline(self, dest: list[dict[str, Any]]) -> dict[str, Any]:
        """Phases per process as absolute CLOCK_MONOTONIC spans, with their origin.

        One clock serves every process of the machine, so the tool's phases, the
        enclave streams' (both hosts of a testbed share the kernel) line up.
        """

        t = self.t
        tool = {
            name: [t[a], t[b]]
            for name, a, b in (
                ("early_handshake", "handshake", "handshaken"),
                ("freeze", "prepare", "prepared"),
                ("criu_dump", "dump", "dumped"),
                ("join_enclaves", "dumped", "enclaves_sent"),
                ("images", "enclaves_sent", "images_sent"),
                ("restore", "images_sent", "restored"),
                ("commit", "restored", "committed"),
                ("resume", "committed", "resumed"),
            )
            if a in t and b in t
        }
        spans: dict[str, Any] = {"tool": tool}
        for i, x in enumerate(self.transfers):
            for proc, phases in x.stats.get("timeline", {}).items():
                spans[f"enclave{i}.{proc}"] = phases
        for i, s in enumerate(dest):
            for proc, phases in s.get("timeline", {}).items():
                spans[f"enclave{i}.{proc}"] = phases
        return {"origin": t["start"], "spans": spans}


def _token_fault(transfer: _Transfer, action: str | None) -> bytes | None:
    """Fault injection on the data connection right before a token goes (a network
    fault, no process dies): ``drop`` shuts it down, ``stall`` has this host's
    firewall drop its packets both ways from now on, ``corrupt`` flips one bit of
    the token sent (returned: what to send instead)."""

    peer, token = transfer.peer, transfer.outgoing.token if transfer.outgoing else None
    if peer is None or token is None or action is None:
        return None
    if action == "drop":
        peer.shutdown(socket.SHUT_RDWR)
    elif action == "stall":
        firewall_drop(int(peer.getsockname()[1]))
    elif action == "corrupt":
        damaged = bytearray(token)
        damaged[len(damaged) // 2] ^= 0x01
        return bytes(damaged)
    return None


def keeps_tcp(wanted: bool | None, source: Source) -> bool:
    """Whether established connections move open (``MigrateOptions.tcp_established``).

    Only a workload whose address moves with it can keep them: elsewhere CRIU would
    restore a connection from an address the destination does not answer for.
    """

    if wanted and source.no_tcp_keep:
        raise ConfigError(f"--tcp-established cannot apply to {source.label}: {source.no_tcp_keep}")
    return source.no_tcp_keep == "" and wanted is not False


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _alive(pid: int) -> bool:
    return process_state(pid) not in ("", "Z", "X")


def _host_id(opts: MigrateOptions) -> str:
    try:
        return opts.identity.host_id()
    except (OSError, ValueError):
        return "unknown"


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
