"""Checkpoint a tree into a directory, and restore it from there (one host, no agent).

The directory holds CRIU's images, ``migsgx.json`` (what the restore needs
to know) and, per enclave, its state sealed by the enclave itself
(:mod:`migsgx.migration.checkpoint`): restorable on this host, exactly once.

Order on the way out: the app hands its enclaves over; each enclave writes its
state (the source enclaves still hold theirs); CRIU dumps the tree; in CRIU's
``post-dump`` step the enclaves give their state up.  A failure before that
step resumes the enclaves and the app (CRIU's post-dump veto), so the tree runs
on as before.  On the way back: CRIU restores the tree stopped; every enclave
is loaded into a fresh enclave; then all are activated (each claims its
checkpoint id), handed to the app, and the tree continues.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from ..criu import Criu, InNetns, InTaskNamespaces
from ..errors import CheckpointDamagedError, ConfigError, CriuError, MigSGXError
from ..host.appctl import AppLink
from ..migration.checkpoint import CheckpointIn, CheckpointOut
from .process import continue_tree, is_pidns_init, kill_tree, tree_pids, wait_stopped

__all__ = ["CHECKPOINT_META", "checkpoint", "restore"]

CHECKPOINT_META: Final = "migsgx.json"
FORMAT: Final = 1


@dataclass
class CheckpointResult:
    directory: Path
    pid: int
    enclaves: int


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
    pidns = is_pidns_init(pid)  # asked now: after the dump the process is gone
    link = AppLink.find(pid)
    handed = link.prepare(prepare_timeout) if link is not None else []
    outs = [CheckpointOut(h.sock, h.info, h.image_files) for h in handed]
    committed: list[int] = []

    def post_dump(script: str, _pid: int) -> None:
        if script != "post-dump":
            return
        for i, out in enumerate(outs):
            try:
                out.commit()
            except MigSGXError:
                if not committed:
                    raise  # nothing given up yet: CRIU resumes the tree
                # Some enclaves gave their state up already: going back is impossible.
                continue
            committed.append(i)

    try:
        for i, out in enumerate(outs):
            out.write(directory, i)
        extra = {"tcp_close": True} if tcp_close else {}
        criu.dump(
            pid,
            directory,
            enter=InTaskNamespaces(pid),
            file_locks=True,
            extra=extra,
            notify=post_dump,
        )
    except BaseException:
        if not committed:
            socks = [out.abort() for out in outs]
            if link is not None and socks:
                with contextlib.suppress(MigSGXError):
                    link.resume(socks)
            for path in directory.iterdir():
                with contextlib.suppress(OSError):
                    path.unlink()
        for h in handed:
            h.sock.close()
        raise
    if len(committed) != len(outs):
        raise MigSGXError(
            f"only {len(committed)} of {len(outs)} enclaves gave their state up; the "
            f"checkpoint in {directory} holds them all"
        )
    for h in handed:
        h.sock.close()
    meta = {
        "format": FORMAT,
        "pid": pid,
        "pidns": pidns,
        "tcp_close": tcp_close,
        "enclaves": len(handed),
        "files": _digests(directory),
    }
    (directory / CHECKPOINT_META).write_text(json.dumps(meta, indent=2) + "\n")
    return CheckpointResult(directory, pid, len(handed))


def _digests(directory: Path) -> dict[str, list[int | str]]:
    """Size and SHA-256 of every file the restore reads (logs and the metadata aside)."""

    files: dict[str, list[int | str]] = {}
    for path in sorted(directory.iterdir()):
        if path.is_file() and path.name != CHECKPOINT_META and not path.name.endswith(".log"):
            digest = hashlib.sha256()
            with path.open("rb") as src:
                while block := src.read(1 << 20):
                    digest.update(block)
            files[path.name] = [path.stat().st_size, digest.hexdigest()]
    return files


def _verify(directory: Path, recorded: object) -> None:
    """The checkpoint's files are exactly those written, byte for byte.

    This detects damage (a truncated copy, a flipped bit); it is no defence
    against someone who rewrites the metadata too.  The enclave state is
    authenticated by its own sealed streams either way.
    """

    if not isinstance(recorded, dict):
        raise CheckpointDamagedError(f"{directory}: the checkpoint records no file digests")
    found = _digests(directory)
    missing = sorted(set(recorded) - set(found))
    extra = sorted(set(found) - set(recorded))
    changed = sorted(n for n in set(recorded) & set(found) if list(recorded[n]) != found[n])
    if missing or extra or changed:
        detail = "; ".join(
            f"{what}: {', '.join(names[:5])}"
            for what, names in (("missing", missing), ("unexpected", extra), ("changed", changed))
            if names
        )
        raise CheckpointDamagedError(
            f"the checkpoint in {directory} is damaged ({detail}); nothing was restored"
        )


def restore(
    directory: Path,
    *,
    criu: Criu | None = None,
    netns: str | None = None,
    platform_socket: Path | None = None,
) -> int:
    """Restore the tree in ``directory`` (in the named network namespace); returns its pid."""

    criu = criu or Criu()
    directory = Path(directory)
    try:
        meta = json.loads((directory / CHECKPOINT_META).read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{directory} holds no migsgx checkpoint: {exc}") from exc
    if meta.get("format") != FORMAT:
        raise ConfigError(f"unknown checkpoint format {meta.get('format')!r}")
    count = int(meta.get("enclaves") or 0)
    if count and platform_socket is None:
        raise ConfigError("the checkpoint holds enclaves: name the host's --platform-socket")
    # Before CRIU sees anything: a truncated page image makes CRIU's restorer spin
    # for ever, and a changed byte would run unnoticed.
    _verify(directory, meta.get("files"))
    extra: dict[str, bool] = {"leave_stopped": True}
    if meta.get("tcp_close"):
        extra["tcp_close"] = True
    pid = criu.restore(
        directory,
        restore_detached=True,
        file_locks=True,
        enter=InNetns(netns) if netns else None,
        log_file="restore.log",
        extra=extra,
    )
    incoming: list[CheckpointIn] = []
    try:
        try:
            wait_stopped(pid)
        except MigSGXError as exc:
            raise CriuError(f"the restored tree did not hold: {exc}") from exc
        if count:
            assert platform_socket is not None
            for i in range(count):
                enclave = CheckpointIn(directory, i, platform_socket)
                incoming.append(enclave)
                enclave.load()
    except BaseException:
        for enclave in incoming:
            enclave.discard()
        with contextlib.suppress(MigSGXError):
            kill_tree(pid)
        raise
    # Every enclave verified its state: from here on they run (each claims its id once).
    socks = [enclave.activate() for enclave in incoming]
    # The app answers only once it runs; its ECALL callers wait for the attach.
    continue_tree(pid)
    if socks:
        link = AppLink.find(pid)
        if link is None:
            raise MigSGXError(f"the restored process {pid} has no migration control to attach to")
        link.attach(socks, [e.info for e in incoming if e.info is not None])
    return pid
