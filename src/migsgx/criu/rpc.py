"""Drive CRIU through its RPC: ``criu swrk FD`` over a SOCK_SEQPACKET pair.

One ``criu_req`` per message goes to CRIU, one ``criu_resp`` comes back. While a
request runs, CRIU may send NOTIFY messages (``pre-dump``, ``post-dump``,
``network-lock``, ``setup-namespaces``, ``post-restore``, ...); each goes to the
caller's callback and is answered with ``notify_success``. A callback that
raises is answered with ``notify_success=False``, which makes CRIU abort the
step: a vetoed ``post-dump`` makes CRIU resume the dumped tasks instead of
killing them, so the source stays alive until the migration commits. The
callback's exception then reaches the caller as the cause of a
:class:`~migsgx.errors.CriuError`.

Every request runs a fresh ``criu swrk`` process (so calls are independent and
thread-safe), optionally inside other namespaces (:class:`InNetns`,
:class:`InTaskNamespaces`). Messages are decoded only as the declared protobuf
schema; nothing received is evaluated.

This module is the client: one method a request, its options checked and put
into a ``criu_req``.  The ``criu swrk`` process that answers it, and the NOTIFY
dialogue, are :mod:`.swrk`; where it runs, :mod:`.enter`.

``$MIGSGX_CRIU_FEATURES_OFF`` (a comma-separated list of :meth:`Criu.features`
names) is a fault hook: those features read as missing, as on a kernel without
them, so the refusals that depend on them are reached on any kernel.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, Final

from migsgx.criu.cancel import DumpCancel
from migsgx.criu.enter import Enter
from migsgx.criu.locate import CriuVersion, find_criu
from migsgx.criu.swrk import NotifyCallback, Session
from migsgx.criu.workdir import workdir_held
from migsgx.errors import ConfigError, CriuError

__all__ = ["FEATURES_OFF_ENV", "Criu", "OptionValue"]

OptionValue = bool | int | str | Sequence[str]

FEATURES_OFF_ENV: Final = "MIGSGX_CRIU_FEATURES_OFF"


_pb_module: ModuleType | None = None


def _pb() -> Any:
    """The generated protobuf module (made by ``scripts/setup.sh``), imported on first use."""

    global _pb_module
    if _pb_module is None:
        try:
            from migsgx.criu._generated import rpc_pb2
        except ImportError as exc:
            raise CriuError(
                "the CRIU RPC module is missing: run scripts/setup.sh "
                "(it generates src/migsgx/criu/_generated/rpc_pb2.py)"
            ) from exc
        _pb_module = rpc_pb2
    return _pb_module


class Criu:
    """A CRIU binary, driven request by request over ``criu swrk``."""

    def __init__(
        self,
        binary: Path | str | None = None,
        *,
        timeout: float | None = 300.0,
        log_level: int = 4,
    ) -> None:
        """``timeout``: seconds to wait for each message from CRIU (None: no limit).

        ``log_level`` 4 is CRIU's debug level: logs of a few hundred KiB per
        dump, and the lines that explain a failure.
        """

        self.binary = Path(binary).absolute() if binary is not None else find_criu()
        self.timeout = timeout
        self.log_level = log_level
        self._mem_track: bool | None = None
        # The RPC module now, not at the first request: a migration's first request
        # (the tool's dump, the agent's restore) runs with the application frozen,
        # and loading protobuf there (about 20 ms, more on a loaded machine) would
        # be downtime.  Missing, it is said at that request, as before.
        with contextlib.suppress(CriuError):
            _pb()

    def __repr__(self) -> str:
        return f"Criu({str(self.binary)!r})"

    # --- requests ---------------------------------------------------------------
    def check(self, *, enter: Enter | None = None) -> None:
        """``criu check``: raises :class:`CriuError` when CRIU cannot work here."""

        with tempfile.TemporaryDirectory(prefix="migsgx-criu-check-") as tmp:
            self._request("CHECK", Path(tmp), log_file="check.log", enter=enter)

    def version(self, *, enter: Enter | None = None) -> CriuVersion:
        resp = self._request("VERSION", None, enter=enter)
        v = resp.version
        return CriuVersion(
            int(v.major_number),
            int(v.minor_number),
            int(v.sublevel) if v.HasField("sublevel") else 0,
            str(v.gitid) if v.HasField("gitid") else "",
        )

    def features(self, *, enter: Enter | None = None) -> dict[str, bool]:
        """Which optional features work here (``mem_track``, ``lazy_pages``, ``pidfd_store``)."""

        names = ("mem_track", "lazy_pages", "pidfd_store")
        with tempfile.TemporaryDirectory(prefix="migsgx-criu-features-") as tmp:
            resp = self._request(
                "FEATURE_CHECK",
                Path(tmp),
                log_file="features.log",
                enter=enter,
                features=dict.fromkeys(names, True),
            )
        off = set(os.environ.get(FEATURES_OFF_ENV, "").split(","))
        return {name: bool(getattr(resp.features, name)) and name not in off for name in names}

    def dump(
        self,
        pid: int,
        images_dir: Path | str,
        *,
        leave_running: bool = False,
        shell_job: bool = False,
        tcp_established: bool = False,
        ext_unix_sk: bool = False,
        file_locks: bool = False,
        track_mem: bool = False,
        parent_img: str | None = None,
        lazy_pages: bool = False,
        page_server: tuple[str, int] | None = None,
        page_fd: int | None = None,
        log_file: str = "dump.log",
        notify: NotifyCallback | None = None,
        enter: Enter | None = None,
        extra: Mapping[str, OptionValue] | None = None,
        cancel: DumpCancel | None = None,
    ) -> None:
        """Checkpoint the process tree rooted at ``pid`` into ``images_dir``.

        ``page_fd``: a connected stream socket on which CRIU speaks to a page
        server (``criu_page_server_info.fd``, passed to ``criu swrk``) instead
        of connecting to ``page_server`` itself.  It is closed here once CRIU
        holds it (whatever happens), so that its peer sees the end of the
        stream when CRIU closes its copy.

        Unless ``leave_running``, CRIU kills the tree once the images are
        complete and ``post-dump`` was answered with success.  ``cancel``, when
        triggered from another thread, ends the dump early with the tree resumed
        (:mod:`migsgx.criu.cancel`).
        """

        if track_mem:
            self._require_mem_track("dump --track-mem", enter)
        self._checkpoint(
            "DUMP", pid, images_dir, parent_img, page_server, log_file, notify, enter, extra,
            leave_running=leave_running, shell_job=shell_job, tcp_established=tcp_established,
            ext_unix_sk=ext_unix_sk, file_locks=file_locks, track_mem=track_mem,
            lazy_pages=lazy_pages, cancel=cancel, page_fd=page_fd,
        )  # fmt: skip

    def pre_dump(
        self,
        pid: int,
        images_dir: Path | str,
        *,
        shell_job: bool = False,
        tcp_established: bool = False,
        ext_unix_sk: bool = False,
        parent_img: str | None = None,
        page_server: tuple[str, int] | None = None,
        log_file: str = "pre-dump.log",
        notify: NotifyCallback | None = None,
        enter: Enter | None = None,
        extra: Mapping[str, OptionValue] | None = None,
    ) -> None:
        """Copy the memory of a running tree ahead of the final dump.

        CRIU always tracks memory in a pre-dump, which needs the kernel's
        soft-dirty bits; where they are missing (see :meth:`features`) CRIU
        would stop on an internal BUG, so this raises :class:`CriuError` first.
        """

        self._require_mem_track("pre-dump", enter)
        self._checkpoint(
            "PRE_DUMP", pid, images_dir, parent_img, page_server, log_file, notify, enter, extra,
            shell_job=shell_job, tcp_established=tcp_established, ext_unix_sk=ext_unix_sk,
            track_mem=True,
        )  # fmt: skip

    def _checkpoint(
        self,
        kind: str,
        pid: int,
        images_dir: Path | str,
        parent_img: str | None,
        page_server: tuple[str, int] | None,
        log_file: str,
        notify: NotifyCallback | None,
        enter: Enter | None,
        extra: Mapping[str, OptionValue] | None,
        cancel: DumpCancel | None = None,
        page_fd: int | None = None,
        **flags: bool,
    ) -> None:
        """DUMP and PRE_DUMP are one request with different flags."""

        opts: dict[str, bool | int | str] = {"pid": pid, **flags}
        if parent_img is not None:
            opts["parent_img"] = parent_img
        # CRIU's parasite may make ``proc.crtools`` in the task's working directory:
        # one dump there at a time, until post-dump (:mod:`.workdir`).
        with workdir_held(pid) as release:
            relay = notify
            if notify is not None:

                def relay(script: str, task: int) -> None:
                    if script == "post-dump":
                        release()
                    notify(script, task)

            self._request(
                kind, Path(images_dir), log_file=log_file, notify=relay, enter=enter, opts=opts,
                page_server=page_server, extra=extra, cancel=cancel, page_fd=page_fd,
            )  # fmt: skip

    def restore(
        self,
        images_dir: Path | str,
        *,
        shell_job: bool = False,
        tcp_established: bool = False,
        ext_unix_sk: bool = False,
        file_locks: bool = False,
        lazy_pages: bool = False,
        restore_detached: bool = True,
        log_file: str = "restore.log",
        notify: NotifyCallback | None = None,
        enter: Enter | None = None,
        extra: Mapping[str, OptionValue] | None = None,
    ) -> int:
        """Restore the tree in ``images_dir``; returns the pid of its root.

        Detached (the default), the root is reparented to the nearest child
        subreaper (or init) when CRIU exits. With ``restore_detached=False``
        it becomes a child of the calling process, which must reap it.
        """

        resp = self._request(
            "RESTORE",
            Path(images_dir),
            log_file=log_file,
            notify=notify,
            enter=enter,
            opts=dict(
                shell_job=shell_job,
                tcp_established=tcp_established,
                ext_unix_sk=ext_unix_sk,
                file_locks=file_locks,
                lazy_pages=lazy_pages,
                rst_sibling=not restore_detached,
            ),
            extra=extra,
        )
        return int(resp.restore.pid)

    def _require_mem_track(self, what: str, enter: Enter | None) -> None:
        if self._mem_track is None:
            self._mem_track = self.features(enter=enter)["mem_track"]
        if not self._mem_track:
            raise CriuError(
                f"criu {what} needs memory tracking (soft-dirty bits), which this kernel "
                "lacks; use a plain dump, or lazy pages for post-copy",
                action=what,
            )

    # --- one request, one criu process ----------------------------------------
    def _request(
        self,
        kind: str,
        images_dir: Path | None,
        *,
        log_file: str | None = None,
        notify: NotifyCallback | None = None,
        enter: Enter | None = None,
        opts: Mapping[str, bool | int | str] | None = None,
        page_server: tuple[str, int] | None = None,
        extra: Mapping[str, OptionValue] | None = None,
        features: Mapping[str, bool] | None = None,
        cancel: DumpCancel | None = None,
        page_fd: int | None = None,
    ) -> Any:
        pb = _pb()
        action = kind.lower().replace("_", "-")
        if log_file is not None and (not log_file or "/" in log_file):
            raise ConfigError(f"CRIU log_file must be a plain file name, not {log_file!r}")
        req = pb.criu_req(type=getattr(pb, kind))
        if features:
            for name, wanted in features.items():
                setattr(req.features, name, wanted)
        dir_fd = -1
        if images_dir is not None:
            try:
                dir_fd = os.open(images_dir, os.O_RDONLY | os.O_DIRECTORY)
            except OSError as exc:
                if page_fd is not None:
                    os.close(page_fd)
                raise CriuError(
                    f"criu {action}: cannot open images directory {images_dir}: {exc}",
                    action=action,
                ) from exc
        try:
            if images_dir is not None:
                o = req.opts
                o.images_dir_fd = dir_fd
                o.log_level = self.log_level
                if log_file:
                    o.log_file = log_file
                if notify is not None or cancel is not None:
                    o.notify_scripts = True
                for name, value in (opts or {}).items():
                    setattr(o, name, value)
                if page_server is not None:
                    o.ps.address, o.ps.port = page_server
                if page_fd is not None:
                    o.ps.fd = page_fd  # the same number in CRIU: passed below
                _apply_extra(o, extra or {})
            log_path = images_dir / log_file if images_dir is not None and log_file else None
            # CRIU opens the images directory as /proc/<our pid>/fd/<dir_fd>:
            # the descriptor stays open here until CRIU has answered.
            try:
                session = Session(
                    self.binary, enter, self.timeout, action, log_path,
                    () if page_fd is None else (page_fd,),
                )  # fmt: skip
            finally:
                if page_fd is not None:
                    os.close(page_fd)
                    page_fd = None
            if cancel is None:
                return session.run(pb, req, notify)
            cancel.bind(session.proc.pid, page_server)
            try:
                return session.run(pb, req, notify, cancel)
            finally:
                cancel.unbind()
        finally:
            if dir_fd >= 0:
                os.close(dir_fd)
            if page_fd is not None:  # (CRIU never started)
                os.close(page_fd)


def _apply_extra(opts: Any, extra: Mapping[str, OptionValue]) -> None:
    """Set further ``criu_opts`` fields by name; anything the schema lacks is refused."""

    for name, value in extra.items():
        try:
            if isinstance(value, (str, bool, int)):
                setattr(opts, name, value)
            else:
                getattr(opts, name).extend(value)
        except (AttributeError, TypeError, ValueError) as exc:
            raise ConfigError(f"bad CRIU option {name}={value!r}: {exc}", option=name) from exc
