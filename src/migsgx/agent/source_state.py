"""What one ``migsgx migrate`` shares while it runs: its enclave transfers, the
state its steps share, the ``begin`` request, fault hooks and figures.

The steps live apart: the enclave streams in :mod:`.source_enclaves`, the
decision (commit, delivery of tokens, roll back) in :mod:`.source_commit`, and
the migration's driver (prepare, dump, post-dump, post-copy) in :mod:`.source`,
each a layer over the one before.  What the caller gives and gets back (options,
outcome) is :mod:`.source_options`, the arithmetic of the figures
:mod:`.source_figures`; both re-exported here.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import signal
import socket
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from .._trace import step
from ..containers import Driver, DumpPlan, HostConfig, Source, make_driver
from ..containers.engine_notes import ENGINE_NOTES
from ..criu import DumpCancel
from ..datapath.outgoing import OutgoingEnclave
from ..datapath.pagerelay import PageRelay
from ..errors import LostAfterCommitError, MigSGXError
from ..host.appctl import info_to_wire
from ..sgx.listener import default_socket
from ..system.process import process_state
from . import preflight
from .applink import AppLink, HandedEnclave
from .control import AgentConnection
from .fault_relays import connection_fault
from .faults import dying, fault, kill_dead, socket_owner
from .guardian import Guardian
from .imageroom import resident_bytes
from .journal import Journal
from .lazy import LazyDump
from .postcopy_choice import MemoryPath
from .protocol import plain_stats
from .source_figures import children_cpu, span, timeline
from .source_options import MigrateOptions, MigrationOutcome, keeps_tcp
from .source_options import _host_id as _host_id

__all__ = ["PREFAULT_TREE_MAX", "MigrateOptions", "MigrationOutcome", "keeps_tcp"]

log = logging.getLogger("migsgx.migrate")

#: The guardian's notes that say how to give a container back (kept in the journal too;
#: ``ungate``: the gate on its listeners, :mod:`migsgx.containers.gate`).
#: (``runc``, ``podman``, ``containerd``: the engine's record of the source, which a
#: committed source's end removes: :mod:`migsgx.containers.engine_notes`)
UNDO_NOTES: Final = frozenset({"criu", "netup", "thaw", "ungate"}) | ENGINE_NOTES

#: ``MigrateOptions.prefault_ahead`` unset: the destination enclaves fault the source's
#: memory in before the freeze for a container whose own resident memory is at most this.
PREFAULT_TREE_MAX: Final = 256 << 20


@dataclass
class _Transfer:
    handed: HandedEnclave
    outgoing: OutgoingEnclave | None = None
    peer: socket.socket | None = None
    stats: dict[str, Any] = field(default_factory=dict)
    error: BaseException | None = None
    #: ``__mig_commit`` was sent to it: it may have decided COMMIT (then died).
    asked_to_commit: bool = False


class _MigrationState:
    """The state every step of one migration shares, and its bookkeeping."""

    def __init__(self, opts: MigrateOptions) -> None:
        self.opts = opts
        #: ``opts.prefault_ahead``, decided by the tree's memory at ``begin`` when None.
        self.prefault_ahead = bool(opts.prefault_ahead)
        self.t: dict[str, float] = {"start": time.monotonic()}
        self.stats: dict[str, Any] = {}
        self.transfers: list[_Transfer] = []
        #: The early handshake's or pre-copy's transfers, given up when the freeze failed.
        self.abandoned: list[_Transfer] = []
        self.link: AppLink | None = None
        self.guardian: Guardian | None = None
        self.control: AgentConnection | None = None
        self.fenced: list[int] = []
        self.committed = False
        self.lost_after_commit: LostAfterCommitError | None = None
        self.resume_sent = False
        self.hand_back_failed = False
        #: The source enclaves (pids) dead when the roll-back handed the rest back.
        self.dead_at_hand_back: set[int] | None = None
        self.restored_pid = 0
        self.image_bytes = 0
        self.page_bytes = 0
        self.destination_images_fs = ""
        # The state directory: a container that arrived here runs from a bundle this
        # host's agent made there, which goes when it leaves (runc).
        host = HostConfig(opts.criu, opts.containers, state_dir=opts.identity.directory.parent)
        self.driver: Driver = make_driver(opts.driver, host)
        self.source: Source | None = None
        self.tcp_keep = False
        self.page_server = False
        self.page_relay: PageRelay | None = None
        self.session_id = b""
        self._begun = False
        # The migration group of the source enclaves (``__mig_group``): fresh, never
        # the session id, which the destination, journals and logs carry.  Whoever
        # knows a group id can record a decision in it from an enclave of their own.
        self.group_id = secrets.token_bytes(16)
        self.journal: Journal | None = None
        self.in_doubt = False
        #: No enclaves: the resume went and its answer was lost (the guardian asks).
        self.resume_in_doubt = False
        self.data_key = b""
        self._journal_lock = threading.Lock()
        #: Overlapped (``MigrateOptions.overlap_restore``): the restore was asked,
        #: and answered (or failed): what a fault's held enclave stream waits for.
        self.restore_asked = threading.Event()
        self.restore_answered = threading.Event()
        #: Overlapped: the images' or the restore's own failure (the cause to report).
        self.post_dump_error: BaseException | None = None
        self.lazy: LazyDump | None = None
        self.plan: DumpPlan | None = None
        #: The tool's own images directory (removed by whoever outlives a killed tool).
        self.scratch: Path | None = None
        self.window_seconds: float | None = None
        self.memory: MemoryPath | None = None
        #: A failed enclave stream stops CRIU's dump at once (the source runs again).
        self.cancel = DumpCancel()

    def note(self, phase: str) -> None:
        self.t[phase] = time.monotonic()
        step(phase)
        if self.opts.progress is not None:
            self.opts.progress(phase)

    def control_call(self, msg: Mapping[str, Any], expect: str) -> dict[str, Any]:
        assert self.control is not None
        return self.control.call(msg, expect)

    def _begin(self, pids: list[int], pidns: bool) -> dict[str, Any]:
        assert self.source is not None
        if self._begun or not self.session_id:
            self.session_id = secrets.token_bytes(16)  # (a migration id is accepted once)
        self._begun = True
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
        memory = begin["memory_bytes"] = resident_bytes(pids)
        if self.opts.prefault_ahead is None:  # (measured for containers: their default)
            self.prefault_ahead = self.driver.name != "pid" and memory <= PREFAULT_TREE_MAX
        if not self.page_server:
            begin["page_server"] = False
        if self.opts.post_copy:
            begin["post_copy"] = True
        return begin

    def _needs(self) -> list[str]:
        """What this migration needs of the destination agent (``versions.NEEDS``)."""

        needs = ["preflight", "process" if self.driver.name == "pid" else "containers"]
        if self._relays_pages():
            needs.append("page-relay")
        if self.opts.post_copy:
            needs.append("post-copy")
        return needs

    def _relays_pages(self) -> bool:
        return self.page_server and self.driver.name == "pid" and self.opts.page_relay

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

    def _inject(self, action: str | None) -> None:
        """Fault injection that kills another party of this host (the fault matrix)."""

        if action in ("kill-guardian", "kill-guardian-and-tool") and self.guardian is not None:
            kill_dead([self.guardian.proc.pid])
            if action == "kill-guardian-and-tool":
                os.kill(os.getpid(), signal.SIGKILL)
        elif action == "kill-source-enclave":
            kill_dead([t.handed.info.pid for t in self.transfers])
        elif action == "kill-first-source-enclave":
            # (the others live on: they go back to the application with their state)
            kill_dead([self.transfers[0].handed.info.pid] if self.transfers else [])
        elif action is not None and action.startswith(
            ("kill-first-source-enclave-", "stop-first-source-enclave-")
        ):
            # (``...-and-tool``, ``...-guardian-and-tool``; ``stop-``: SIGSTOP, a hung enclave)
            if action.endswith("-guardian-and-tool") and self.guardian is not None:
                kill_dead([self.guardian.proc.pid])
            first = [self.transfers[0].handed.info.pid] if self.transfers else []
            if action.startswith("stop-"):
                for pid in first:  # (it lives, its connection open, and answers nothing)
                    os.kill(pid, signal.SIGSTOP)
            else:
                kill_dead(first)
            os.kill(os.getpid(), signal.SIGKILL)
        elif action == "kill-criu" and self.lazy is not None:
            self.lazy.stop()  # post-copy: the only server of the pages still missing dies
        elif action in ("kill-source-platform", "kill-source-platform-and-tool"):
            kill_dead([socket_owner(default_socket(self.opts.identity.directory.parent))])
            if action == "kill-source-platform-and-tool":
                os.kill(os.getpid(), signal.SIGKILL)
        elif action is not None and action.endswith("-control") and self.control is not None:
            # A network fault of the control connection (no process dies).
            connection_fault(self.control.sock, action.removesuffix("-control"))
        elif action is not None and action.endswith("-data"):
            # The same, of every enclave's data connection.
            for transfer in self.transfers:
                if transfer.peer is not None:
                    connection_fault(transfer.peer, action.removesuffix("-data"))

    def _guardian_note(self, line: str) -> None:
        if self.guardian is not None:
            self.guardian.note(line)
        if self.journal is not None and line.split(" ", 1)[0] in UNDO_NOTES:
            # ``migsgx recover`` gives the source back the same way if the guardian is gone.
            # (a driver notes from its dump's thread too)
            with self._journal_lock:
                self.journal.update(undo=[*self.journal.undo, line])

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

    # --- figures -----------------------------------------------------------------------------
    def _figures(self) -> dict[str, Any]:
        t = self.t
        dest = self.stats.get("enclaves_destination", [])
        enclave_bytes = sum(int(s.get("bytes", 0)) for s in (x.stats for x in self.transfers))
        load = max((float(s.get("agent_seconds", 0.0)) for s in dest), default=0.0)
        figures: dict[str, Any] = {
            "freeze": span(t, "prepare", "prepared"),
            "enclave_dump": span(t, "enclaves", "enclaves_sent"),
            "criu_dump": span(t, "dump", "dumped"),
            "transfer": span(t, "dumped", "images_sent"),
            "restore": self.stats.get("restore", span(t, "images_sent", "restored")),
            "enclave_load": load,
            "total": span(t, "start", "end"),
            "downtime": span(t, "prepare" if self.transfers else "dump", "resumed"),
            "bytes": enclave_bytes + self.page_bytes + self.image_bytes,
        }
        if self.opts.live:
            figures["precopy"] = span(t, "precopy", "precopied")
        if self.opts.post_copy:
            # From the destination tree's start to its last page: it needs the source.
            figures["post_copy_window"] = self.window_seconds
        figures["details"] = {
            "commit": span(t, "restored", "committed"),
            "resume": span(t, "committed", "resumed"),
            "attach": self.stats.get("attach", 0.0),
            "process_downtime": span(t, "dump", "resumed"),
            # Before the freeze: begin, connections, launches, attested handshakes.
            "early_handshake": span(t, "handshake", "handshaken"),
            "enclaves": len(self.transfers),
            "enclave_bytes": enclave_bytes,
            "page_bytes": self.page_bytes,
            # How CRIU's pages travelled: "relay" (sealed frames), "criu-tls", or "none".
            "page_path": (
                ("relay" if self._relays_pages() else "criu-tls") if self.page_server else "none"
            ),
            "page_relay_bytes": self.page_relay.sent if self.page_relay is not None else 0,
            "image_bytes": self.image_bytes,
            # Where the destination received CRIU's images ("tmpfs": RAM; "" if unsaid).
            "destination_images_fs": self.destination_images_fs,
            "prefault_ahead": self.prefault_ahead,  # (decided at begin when not asked)
            "restored_pid": self.restored_pid,
            # The control protocol version the agent and this tool agreed on.
            "protocol_version": self.control.version if self.control is not None else 0,
            "enclave_stats": [x.stats for x in self.transfers],
            "enclave_destination_stats": [plain_stats(s) for s in dest],
            "driver": self.driver.name,
            "workload": self.source.label if self.source is not None else "",
            "tcp_established": self.tcp_keep,
            # CPU of this process (its enclave streams' ends, the control channel)
            # and of its reaped children (CRIU's dump, with its page stream).
            "tool_cpu_seconds": time.process_time(),
            "tool_children_cpu_seconds": children_cpu(),
        }
        if self.memory is not None:
            # How the tree's memory moved (post-copy or frozen), its size, the size rule.
            figures["details"]["memory"] = self.memory.describe()
        if "resume_warning" in self.stats:
            figures["details"]["warning"] = self.stats["resume_warning"]
        figures["timeline"] = timeline(t, [x.stats for x in self.transfers], dest)
        return figures


def _alive(pid: int) -> bool:
    return process_state(pid) not in ("", "Z", "X")
