"""The ``pid`` driver: a process tree, checkpointed and restored with CRIU directly.

The source is dumped with CRIU inside the tree's network and mount
namespaces, its pages to the destination's page server: through the
engine's sealed relay when the plan has a ``page_fd`` (the production path),
else straight, in CRIU's mutual TLS when asked.  ``on_dumped`` runs in CRIU's ``post-dump``
notification, with the tree frozen: if it raises, CRIU resumes the tree
(the veto); if it returns, CRIU kills it.  The tree's listeners are gated from
before the freeze until the dump ended (:func:`~.frozen.listeners_gated`): a
client connecting meanwhile waits, where its half-made connection would have
failed CRIU's dump ("In-flight connection").  The destination restores the tree
with ``leave_stopped``: CRIU queues a SIGSTOP to every task while it still
traces them.  With ``DumpPlan.lazy`` (post-copy) the dump keeps private memory
out of the images and serves it after ``on_dumped`` returned, then leaves the
tree stopped (the destination restores it with :mod:`.postcopy`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar

from ..criu import Criu, InTaskNamespaces
from ..errors import MigrationError, ProtocolError
from ..system.process import kill_tree, tree_pids
from .base import ContainerError, DumpPlan, HostConfig, Restored, RestoreRequest, Source
from .frozen import listeners_gated
from .postcopy import check_pipe_max_size

__all__ = ["PidDriver"]


class PidDriver:
    name: ClassVar[str] = "pid"

    def __init__(self, host: HostConfig) -> None:
        self.host = host

    def uses_page_server(self, page_tls: bool) -> bool:
        return True

    # --- source -------------------------------------------------------------------------
    def locate(self, target: str) -> Source:
        try:
            pid = int(target)
        except ValueError as exc:
            raise MigrationError(f"not a pid: {target!r}") from exc
        if pid <= 0 or not tree_pids(pid):
            raise MigrationError(f"no process {pid}")
        return Source(root=pid, target={}, label=f"process {pid}")

    def dump(self, source: Source, plan: DumpPlan, on_dumped: Callable[[], None]) -> None:
        extra: dict[str, bool | str] = {"tcp_close": True} if plan.tcp_close else {}
        page_fd = None if plan.lazy else plan.page_fd
        if plan.page_tls is not None and page_fd is None:
            ca, cert, key = plan.page_tls
            extra.update(tls=True, tls_cacert=str(ca), tls_cert=str(cert), tls_key=str(key))

        def notify(script: str, _pid: int) -> None:
            if script == "post-dump":
                on_dumped()
            elif script == "query-ext-files" and plan.frozen is not None:
                plan.frozen()  # (the tree frozen, nothing of it dumped yet)

        page_server = None if page_fd is not None else plan.page_server
        criu = self.host.criu
        if plan.lazy:
            check_pipe_max_size()
            # CRIU answers the dump only once every page was served: a time limit
            # there would end the only server of a committed tree's memory.
            criu = Criu(criu.binary, timeout=None, log_level=criu.log_level)
            # CRIU listens on the plan's port (0: the kernel picks one) at any
            # address of the tree's network namespace, and leaves the tree
            # stopped once served.
            page_server = plan.page_server or ("", 0)
            extra["leave_stopped"] = True
        # (the gate's undo is noted first: opened by the guardian, or by ``migsgx
        # recover`` from the journal, if this tool dies meanwhile)
        with listeners_gated(source, plan, None):
            criu.dump(
                source.root,
                plan.images,
                leave_running=False,
                shell_job=plan.shell_job,
                file_locks=True,  # held POSIX and flock locks (sqlite in WAL mode) move with it
                lazy_pages=plan.lazy,
                page_server=page_server,
                page_fd=page_fd,
                notify=notify,
                enter=InTaskNamespaces(source.root),
                extra=extra,
                cancel=plan.cancel,  # a failed enclave stream ends the dump at once
            )

    # --- destination ----------------------------------------------------------------------
    def check_target(self, target: Mapping[str, Any]) -> dict[str, Any]:
        if target:
            raise ProtocolError("the pid driver takes no target description")
        return {}

    def admit_spec(self, target: Mapping[str, Any], spec: Mapping[str, Any]) -> None:
        raise ProtocolError("a process tree has no container specification")

    def restore(self, request: RestoreRequest) -> Restored:
        if request.before is not None:
            request.before(request.images)
        extra: dict[str, bool] = {"leave_stopped": True}
        if request.tcp_close:
            extra["tcp_close"] = True
        if request.spend_images:
            extra["auto_dedup"] = True  # each block of pages punched out once restored
        made, made_tree = request.made, request.made_tree

        def notify(script: str, pid: int) -> None:
            # (CRIU aborts the restore, killing what it made, if a notification before
            # pre-resume is not answered; from pre-resume on, it completes regardless)
            if script == "post-restore" and made_tree is not None and pid > 0:
                made_tree(pid)
            elif script == "pre-resume" and made is not None:
                made()  # (every task restored, its SIGSTOP queued; CRIU not yet detached)

        wanted = made is not None or made_tree is not None
        pid = self.host.criu.restore(
            request.images,
            restore_detached=True,
            file_locks=True,
            log_file="restore.log",
            notify=notify if wanted else None,
            extra=extra,
        )
        return Restored(pid=pid, label=f"process {pid}")

    def discard(self, restored: Restored) -> None:
        kill_tree(restored.pid)

    def remove_made(self, handle: Mapping[str, Any], owner: str, *, keep_running: bool) -> str:
        raise ContainerError("a process tree has no engine entry to remove")

    def reclaim(self, handle: Mapping[str, Any], pid: int) -> Restored:
        # (the agent's record checked the tree: same pid, same start time, stopped)
        if handle or pid <= 0:
            raise ContainerError(f"a process tree is recorded by its pid alone, not {handle!r}")
        return Restored(pid=pid, label=f"process {pid}")
