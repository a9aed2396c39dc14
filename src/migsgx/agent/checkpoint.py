"""Checkpoint a tree into a directory, and restore it from there (one host, no agent).

The directory holds CRIU's images and ``migsgx.json`` (what the restore needs
to know).  A tree with enclaves needs the migration engine's file sink: the
enclave state goes into the directory encrypted for a future destination
enclave and restorable exactly once.  Until the engine offers it, a
checkpoint of a tree with enclaves is refused and the tree runs on.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from ..criu import Criu, InNetns, InTaskNamespaces
from ..errors import ConfigError, CriuError, MigSGXError
from ..host.appctl import AppLink
from .process import continue_tree, is_pidns_init, kill_tree, tree_pids, wait_stopped

__all__ = ["CHECKPOINT_META", "checkpoint", "restore"]

CHECKPOINT_META: Final = "migsgx.json"
FORMAT: Final = 1


@dataclass
class CheckpointResult:
    directory: Path
    pid: int
    enclaves: int


def _file_sink() -> Any:
    from .incoming import load_engine

    engine = load_engine()
    if not hasattr(engine.OutgoingEnclave, "checkpoint"):
        raise ConfigError("not yet: the enclave engine cannot write enclave state to a directory")
    return engine


def checkpoint(
    pid: int,
    directory: Path,
    *,
    criu: Criu | None = None,
    leave_running: bool = False,
    tcp_close: bool = True,
    prepare_timeout: float = 30.0,
) -> CheckpointResult:
    criu = criu or Criu()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    if any(directory.iterdir()):
        raise ConfigError(f"{directory} is not empty")
    if leave_running:
        raise ConfigError("a checkpoint that leaves the source running would fork it")
    pids = tree_pids(pid)
    if not pids:
        raise ConfigError(f"no process {pid}")
    link = AppLink.find(pid)
    handed = link.prepare(prepare_timeout) if link is not None else []
    try:
        if handed:
            _file_sink()
        extra = {"tcp_close": True} if tcp_close else {}
        criu.dump(pid, directory, enter=InTaskNamespaces(pid), extra=extra)
    except BaseException:
        if link is not None and handed:
            with contextlib.suppress(MigSGXError):
                link.resume([h.sock for h in handed])
        for h in handed:
            h.sock.close()
        raise
    meta = {
        "format": FORMAT,
        "pid": pid,
        "pidns": is_pidns_init(pid) if os.path.exists(f"/proc/{pid}") else None,
        "tcp_close": tcp_close,
        "enclaves": len(handed),
    }
    (directory / CHECKPOINT_META).write_text(json.dumps(meta, indent=2) + "\n")
    return CheckpointResult(directory, pid, len(handed))


def restore(directory: Path, *, criu: Criu | None = None, netns: str | None = None) -> int:
    """Restore the tree in ``directory`` (in the named network namespace); returns its pid."""

    criu = criu or Criu()
    directory = Path(directory)
    try:
        meta = json.loads((directory / CHECKPOINT_META).read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{directory} holds no migsgx checkpoint: {exc}") from exc
    if meta.get("format") != FORMAT:
        raise ConfigError(f"unknown checkpoint format {meta.get('format')!r}")
    if meta.get("enclaves"):
        _file_sink()
    extra: dict[str, bool] = {"leave_stopped": True}
    if meta.get("tcp_close"):
        extra["tcp_close"] = True
    pid = criu.restore(
        directory,
        restore_detached=True,
        enter=InNetns(netns) if netns else None,
        log_file="restore.log",
        extra=extra,
    )
    try:
        wait_stopped(pid)
    except MigSGXError as exc:
        with contextlib.suppress(MigSGXError):
            kill_tree(pid)
        raise CriuError(f"the restored tree did not hold: {exc}") from exc
    continue_tree(pid)
    return pid
