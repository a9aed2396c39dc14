"""``migsgx restore``: a checkpoint directory back into a running tree, exactly once.

Every file is checked against ``migsgx.json``'s digests before CRIU reads
anything; the enclaves load first, into fresh enclaves that do not run (a
checkpoint never committed, aborted or restored before is refused there);
CRIU restores the tree stopped; then every enclave is activated (each claims
its checkpoint id), handed to the application, and the tree continues.  A
guardian holds the enclaves from the activation on and finishes the restore
if this tool dies; each enclave holds a duplicate of its connection from
before the activation until the application has it, so that ``migsgx recover
--checkpoint`` finishes the restore if the guardian died too.  The way out is
:mod:`.checkpoint`'s.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import secrets
import socket
from collections.abc import Iterator
from pathlib import Path

import cbor2

from .._fs import write_private
from .._records import json_record, non_negative_int
from ..criu import Criu, InNetns
from ..datapath.checkpoint import CheckpointIn
from ..datapath.ckpt_image import checked_image
from ..errors import (
    CheckpointBusyError,
    CheckpointDamagedError,
    ConfigError,
    CriuError,
    InDoubtError,
    MigSGXError,
    RecordDamagedError,
)
from ..host.appctl import info_to_wire
from ..system.process import continue_tree, kill_tree, wait_stopped
from .applink import AppLink
from .checkpoint import FORMAT, _digests, _fault
from .ckpt_attach import note_unattached
from .ckpt_journal import (
    CHECKPOINT_META,
    HELD,
    MAX_CHECKPOINT_ENCLAVES,
    read_journal,
    read_metadata,
    remove_fenced_source,
    remove_held_leftover,
    start_time,
    working,
    write_journal,
)
from .guardian import Guardian

__all__ = ["load_metadata", "restore"]


def _verify(directory: Path, recorded: object) -> None:
    """The checkpoint's files are exactly those written, byte for byte.

    This detects damage (a truncated copy, a flipped bit) before CRIU reads
    anything.  A rewrite of the metadata together with the files is refused by
    the enclaves instead: each committed gate binds the metadata's SHA-256
    (``docs/spec/checkpoint.md``), and nothing runs before every enclave opened
    its gate.  The enclave state is authenticated by its own sealed streams.
    """

    if not isinstance(recorded, dict) or not all(
        isinstance(v, list) and len(v) == 2 for v in recorded.values()
    ):
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


def load_metadata(directory: Path) -> tuple[bytes, dict[str, object], int]:
    """The checkpoint's metadata (raw, parsed, enclave count), its files verified.

    Everything a restore decides on comes from here, before anything is touched:
    a damaged or forged ``migsgx.json``, or one that is not this user's own
    (:func:`~.ckpt_journal.read_metadata`: it names the tree a restore kills),
    is a :class:`RecordDamagedError`, a damaged image file a
    :class:`CheckpointDamagedError`.
    """

    try:
        raw_meta = read_metadata(directory)
    except OSError as exc:
        raise ConfigError(f"{directory} holds no migsgx checkpoint: {exc}") from exc
    meta = json_record(raw_meta, f"checkpoint metadata {directory / CHECKPOINT_META}")
    if meta.get("format") != FORMAT:
        raise ConfigError(f"unknown checkpoint format {str(meta.get('format'))[:64]!r}")
    count = meta.get("enclaves") or 0
    if not non_negative_int(count, MAX_CHECKPOINT_ENCLAVES + 1):
        raise RecordDamagedError(f"{directory}: the checkpoint metadata's enclave count is damaged")
    # Before CRIU sees anything: a truncated page image makes CRIU's restorer spin
    # for ever, and a changed byte would run unnoticed.  The enclave images first,
    # by the check every launch from a checkpoint makes (it says what differs).
    for index in range(count):
        checked_image(directory, index, meta.get("files"))
    _verify(directory, meta.get("files"))
    return raw_meta, meta, count


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
    raw_meta, meta, count = load_metadata(directory)
    if count and platform_socket is None:
        raise ConfigError("the checkpoint holds enclaves: name the host's --platform-socket")
    with _alone(directory) as phase:
        return _restore(directory, criu, netns, platform_socket, raw_meta, meta, count, phase)


@contextlib.contextmanager
def _alone(directory: Path) -> Iterator[str | None]:
    """This restore alone works on ``directory`` until it returns; the journal's phase
    (None: no journal of this user's).

    A restore kills what it takes for a dead attempt's leftovers (a held tree, a
    fenced source): beside a live tool those are that tool's (a restore's activated
    tree, a checkpoint's source before its commit), and killing them loses the only
    copy.  So a restore refuses (:class:`CheckpointBusyError`, nothing touched) while
    another restore holds the directory's lock, or the journal's tool or guardian
    runs; then it names itself in the journal, so that ``migsgx recover
    --checkpoint`` leaves it alone too (``in-progress``).
    """

    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CheckpointBusyError(
                f"another restore of {directory} runs now: nothing was done"
            ) from None
        journal = read_journal(directory)
        who = working(journal)
        if who is not None:
            raise CheckpointBusyError(
                f"{who} still works on the checkpoint in {directory}: nothing was done; "
                f"once it ended, run: migsgx recover --checkpoint {directory}"
            )
        phase = str(journal["phase"]) if journal is not None else None
        if phase is not None:
            write_journal(directory, phase)  # (this tool, from now on)
        yield phase
    finally:
        os.close(fd)


def _restore(
    directory: Path,
    criu: Criu,
    netns: str | None,
    platform_socket: Path | None,
    raw_meta: bytes,
    meta: dict[str, object],
    count: int,
    phase: str | None,
) -> int:
    meta_digest = hashlib.sha256(raw_meta).digest()
    remove_held_leftover(directory)
    remove_fenced_source(meta)
    extra: dict[str, bool] = {"leave_stopped": True}
    if meta.get("tcp_close"):
        extra["tcp_close"] = True
    # The enclaves load first, into fresh enclaves that do not run: a checkpoint
    # that was never committed, was aborted or restored before is refused (its
    # gate) before CRIU restores anything.
    incoming: list[CheckpointIn] = []
    pid = 0
    guardian: Guardian | None = None
    try:
        for i in range(count):
            assert platform_socket is not None
            # The enclave opens its checkpoint only with the metadata its source
            # committed: a rewrite of migsgx.json (with the files) is refused.  It
            # launches only from the image the metadata records (checked first).
            files = meta.get("files")
            enclave = CheckpointIn(directory, i, platform_socket, meta_digest, files=files)
            incoming.append(enclave)
            enclave.load()
        # From the activation on, the enclaves hold the only copy and need their
        # application: a guardian holding their connections finishes the restore
        # (activate, continue, attach) if this tool dies before the attach.  It
        # starts now, so that its start overlaps CRIU's restore.
        guardian = _restore_guardian(incoming, directory) if incoming else None
        if guardian is not None and phase is not None:
            # (it may finish this restore: nobody else may take its tree meanwhile)
            pid_start = [guardian.proc.pid, start_time(guardian.proc.pid)]
            write_journal(directory, phase, guardian=pid_start)
        _fault("restore.before-criu", 0, [], platform_socket)
        pid = criu.restore(
            directory,
            restore_detached=True,
            file_locks=True,
            enter=InNetns(netns) if netns else None,
            log_file="restore.log",
            extra=extra,
        )
        try:
            wait_stopped(pid)
        except MigSGXError as exc:
            raise CriuError(f"the restored tree did not hold: {exc}") from exc
        # Should this tool die now, the next restore finds the held tree and removes it.
        _write_held(directory, pid)
        _fault("restore.held", pid, [], platform_socket)
        _fault("restore.loaded", pid, [], platform_socket)
        try:
            wait_stopped(pid, timeout=0)  # still held: activating now cannot strand the state
        except MigSGXError as exc:
            raise CriuError(f"the restored tree ended before it ran: {exc}") from exc
        holders = _hold(incoming, pid)
    except BaseException:
        if guardian is not None:
            guardian.release()  # nothing was activated: it lets go
        for enclave in incoming:
            enclave.discard()
        if pid:
            with contextlib.suppress(MigSGXError):
                kill_tree(pid)
        raise
    infos = [e.info for e in incoming if e.info is not None]
    # Every enclave verified its state: from here on they run (each claims its id once).
    # First the journal says so: a recover then knows who consumed the gates, and
    # where the duplicates are that let it finish the restore should this tool and
    # its guardian both die.
    if holders:
        write_journal(directory, "restoring", holders=holders, infos=_packed(incoming))
    else:
        write_journal(directory, "restoring")
    try:
        if guardian is not None:
            guardian.note(f"restored {pid}")
            guardian.note("activating")
        socks: list[socket.socket] = []
        try:
            for enclave in incoming:
                socks.append(enclave.activate())
        except BaseException as exc:
            if socks:
                # Some enclaves claimed their checkpoints, this one did not: neither way
                # is whole.  The tree stays held (stopped); an operator decides.
                raise MigSGXError(
                    f"only {len(socks)} of {len(incoming)} enclaves could be activated "
                    f"({exc}); the restored tree {pid} is left stopped"
                ) from exc
            # Nothing was claimed (the platform service gone, say): every gate holds, so
            # the held tree and the loaded enclaves go and the checkpoint restores later.
            for enclave in incoming:
                enclave.discard()
            with contextlib.suppress(MigSGXError):
                kill_tree(pid)
            with contextlib.suppress(OSError):
                (directory / HELD).unlink()
            raise
        _fault("restore.activated", pid, [])
        # The app answers only once it runs; its ECALL callers wait for the attach.
        continue_tree(pid)
        if socks:
            link = AppLink.find(pid)
            if link is None:
                raise MigSGXError(
                    f"the restored process {pid} has no migration control to attach to"
                )
            try:
                _fault("restore.attach", pid, [])  # (``fail``: an application refusing)
                link.attach(socks, infos)
            except MigSGXError as exc:
                if not holders:
                    raise
                # The enclaves hold their duplicates: a recover attaches them (exit 7).
                note_unattached(directory, pid, len(socks), str(exc))
                raise InDoubtError(
                    f"the restored application {pid} runs without its enclaves: the attach "
                    f"failed ({exc}); run migsgx recover --checkpoint {directory}"
                ) from exc
    finally:
        if guardian is not None:
            guardian.release()  # (this tool lives: it ends the restore itself, either way)
    with contextlib.suppress(OSError):
        (directory / HELD).unlink()
    # (the application has the connections and let the duplicates go: their numbers
    # may be reused now)
    write_journal(directory, "restored", restored_pid=pid, holders=[])
    return pid


def _hold(incoming: list[CheckpointIn], pid: int) -> list[list[object]]:
    """Each loaded enclave keeps a duplicate of our end of its connection; the
    journal's ``holders`` entries (``[pid, fd, start, nonce]``, as a checkpoint's).

    From its activation until the application has the connection (its ``attach``
    lets the duplicate go, ``__mig_unhold``), the enclave holds the only copy of
    its state, and the death of this tool and its guardian is then no end of file
    for it: ``migsgx recover --checkpoint`` takes the duplicate back and finishes
    the restore.  The hold names the held tree's root (a pidfd): once it is gone
    the enclave lets the duplicate go, and ends with the last real holder.
    """

    holders: list[list[object]] = []
    for enclave in incoming:
        assert enclave.link is not None and enclave.info is not None
        nonce = secrets.token_bytes(16)
        fd = enclave.link.hold(pid, nonce)
        holders.append([enclave.info.pid, fd, start_time(enclave.info.pid), nonce.hex()])
    return holders


def _packed(incoming: list[CheckpointIn]) -> str:
    infos = [e.info for e in incoming if e.info is not None]
    return bytes(cbor2.dumps([info_to_wire(i) for i in infos])).hex()


def _restore_guardian(incoming: list[CheckpointIn], directory: Path) -> Guardian:
    socks = [e.link.sock for e in incoming if e.link is not None]
    extra = ["--restore", "--infos", _packed(incoming), "--checkpoint", str(directory)]
    return Guardian(0, "-", socks, extra)


def _write_held(directory: Path, pid: int) -> None:
    # (atomically, never through a link planted under its name: not a digested file)
    write_private(directory / HELD, json.dumps({"pid": pid, "start": start_time(pid)}).encode())
