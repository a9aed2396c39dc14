"""Checkpoint a tree into a directory (one host, no agent); the way back is
:mod:`.ckpt_restore`'s.

The directory holds CRIU's images, ``migsgx.json`` (what the restore needs
to know) and, per enclave, its state sealed by the enclave itself
(:mod:`migsgx.datapath.checkpoint`): restorable on this host, exactly once.

Order on the way out: the app hands its enclaves over; each enclave writes its
state (the source enclaves still hold theirs); CRIU dumps the tree; in CRIU's
``post-dump`` step the enclaves give their state up.  A failure before that
step resumes the enclaves and the app (CRIU's post-dump veto), so the tree runs
on as before (exit 6), or without the state of an enclave that died before its
gate committed (exit 11, :mod:`.enclave_loss`).  An enclave that died after it
was sent its commit may have committed its gate first: the gate, read once its
process ended, says which (final: its platform service refuses the request of
an enclave that hung up, ``docs/spec/commit.md`` section 5): committed, the
checkpoint holds its state and goes on; not, its state is lost.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from .._fs import write_durably
from ..criu import Criu, InTaskNamespaces
from ..datapath.checkpoint import CheckpointIn, CheckpointOut
from ..errors import (
    CheckpointGateError,
    ConfigError,
    DecisionUnknownError,
    InDoubtError,
    MigrationError,
    MigSGXError,
    SourceGoneError,
)
from ..host.client import platform_socket as default_platform_socket
from ..system.process import (
    is_pidns_init,
    process_state,
    stop_tree,
    tree_pids,
)
from .applink import AppLink, HandedEnclave
from .ckpt_journal import (
    CHECKPOINT_META,
    HELD,
    JOURNAL,
    start_time,
    write_journal,
)
from .enclave_loss import LostEnclave, dead, lost_error, wait_ended
from .faults import fault, kill_dead, kill_until_dying, socket_owner
from .guardian import Guardian
from .handback import let_go
from .holders import watch_holders
from .lost_enclaves import hung_up

__all__ = ["CHECKPOINT_META", "checkpoint"]

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
    # Several enclaves are one checkpoint: their gates' decisions share a group, so
    # that the platform store refuses an abort once one committed (and the reverse).
    group = os.urandom(16) if len(handed) > 1 else b""
    outs = [CheckpointOut(h.sock, h.info, h.image_files, group=group) for h in handed]
    committed: list[int] = []
    #: Enclaves sent their commit (alive then: one dead before cannot have committed).
    asked: set[int] = set()
    #: Of those, the ones that died and whose gate, read after, never committed.
    refused: set[int] = set()
    #: Of those, the ones that died and whose gate could not be read: in doubt.
    unread: list[int] = []
    #: Alive, whose gate commit went out and got no answer (its service went away).
    unknown: list[int] = []
    fenced: list[int] = []
    holders: list[list[object]] = []
    #: The files' digests as ``migsgx.json`` records them (an image launches only as recorded).
    digests: dict[str, list[int | str]] = {}
    meta = {"format": FORMAT, "pid": pid, "pidns": pidns, "tcp_close": tcp_close,
            "enclaves": len(handed), "start": start_time(pid)}  # fmt: skip
    # As for a migration: a guardian holds the enclave connections, so that a tool
    # that dies before the commit leaves the enclaves to be aborted and handed back.
    # It also resolves the checkpoint itself then (``migsgx recover --checkpoint``'s logic).
    guardian = (
        Guardian(link.pid, link.name, [h.sock for h in handed], ["--checkpoint", str(directory)])
        if link
        else None
    )
    # Which tool works here, on which source: what ``migsgx recover`` starts from.
    write_journal(directory, "writing", pid=pid, start=meta["start"], enclaves=len(handed),
                  app=[link.pid, link.name] if link else None,
                  guardian=_pid_start(guardian.proc.pid) if guardian else None)  # fmt: skip

    def post_dump(script: str, _pid: int) -> None:
        if script != "post-dump":
            return
        # CRIU's images are complete: the metadata (with every file's digest) is
        # durable before any enclave gives its state up, so a tool that dies after
        # the commit leaves a restorable checkpoint.
        digests.update(_digests(directory))
        meta_digest = _write_meta(directory, {**meta, "files": digests})
        # The fence: if this tool dies from here on and CRIU resumes the tree, it
        # stops instead of running beside the checkpoint.
        fenced.extend(tree_pids(pid))
        stop_tree(fenced)
        if guardian is not None:
            guardian.note("fence " + " ".join(map(str, fenced)))
        write_journal(directory, "fenced")
        _fault("ckpt.before-commit", pid, handed, guardian=guardian)
        for i, out in enumerate(outs):
            if committed and _fault("ckpt.between-commits", pid, handed, guardian=guardian):
                _race_an_abort(outs[i:])
            if _alive(handed[i].info.pid):
                asked.add(i)
            try:
                out.commit(meta_digest)  # the gate binds the metadata (and so every file)
            except MigSGXError as exc:
                # (an enclave closes its connection only as its process ends)
                dead_now = i in asked and (
                    not _alive(handed[i].info.pid) or hung_up(handed[i].sock)
                )
                gate = (
                    _gate_after_death(directory, i, handed[i].info.pid, meta_digest, digests)
                    if dead_now else False
                )  # fmt: skip
                if gate is None and not committed:
                    unread.append(i)
                    raise InDoubtError(f"enclave {i} died inside its commit: {exc}") from exc
                if isinstance(exc, DecisionUnknownError) and not committed:
                    # Alive, its platform service gone before it answered: the gate may
                    # have committed.  The enclave stays frozen; so do the fence and files.
                    unknown.append(i)
                    raise InDoubtError(f"enclave {i}'s gate commit is unanswered: {exc}") from exc
                if gate:
                    # Its gate committed, its answer died with it: the checkpoint holds
                    # its state (the commit point passed), and the rest commit too.
                    committed.append(i)
                    continue
                if gate is False and dead_now:
                    refused.add(i)  # (dead, its gate read pending: it never committed)
                if not committed:
                    raise  # nothing given up yet: CRIU resumes the tree (unfenced below)
                # Some enclaves gave their state up already: going back is impossible.
                continue
            committed.append(i)
        write_journal(directory, "committed")
        _fault("ckpt.after-commit", pid, handed, guardian=guardian)

    try:
        try:
            # Each enclave keeps a duplicate of our end of its connection: should this
            # tool and its guardian both die, it keeps its state (and the application's
            # writes) instead of ending, and ``migsgx recover --checkpoint`` takes the
            # duplicate back to abort the checkpoint and hand the enclave back.
            app = link.pid if link is not None else None
            nonces = [secrets.token_bytes(16) for _ in handed]
            holders = [[h.info.pid, out.link.hold(app, nonce), start_time(h.info.pid),
                        nonce.hex()]
                       for h, out, nonce in zip(handed, outs, nonces, strict=True)]  # fmt: skip
            if holders:
                write_journal(directory, "writing", holders=holders)
            for i, out in enumerate(outs):
                out.write(directory, i)
            _fault("ckpt.before-dump", pid, handed, guardian=guardian)
            extra = {"tcp_close": True} if tcp_close else {}
            criu.dump(
                pid,
                directory,
                enter=InTaskNamespaces(pid),
                file_locks=True,
                extra=extra,
                notify=post_dump,
            )
        except BaseException as exc:
            if unknown and not committed:
                raise InDoubtError(
                    f"enclave(s) {', '.join(map(str, unknown))} sent their gate commit and "
                    "their platform service went away before it answered: it may be "
                    "recorded: the source stays stopped and the files stay; once the "
                    f"platform service is back, run: migsgx recover --checkpoint {directory} "
                    "--platform-socket SOCK"
                ) from exc
            if unread and not committed:
                # Its gate may have committed: the files and the fence stay, the
                # others keep their state (each holds a duplicate of its connection).
                raise InDoubtError(
                    f"enclave(s) {', '.join(map(str, unread))} died after they were sent "
                    "their commit, and their gates could not be read (name the platform "
                    "service: $MIGSGX_PLATFORM_SOCKET): the source stays stopped and the "
                    f"files stay; run: migsgx recover --checkpoint {directory} "
                    "--platform-socket SOCK"
                ) from exc
            if not committed:
                if link is not None and _alive(pid):  # (who holds each connection now)
                    watch_holders([h.sock for h in handed], holders, link.pid)
                for fenced_pid in fenced:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(fenced_pid, signal.SIGCONT)
                socks = [out.abort() for out in outs]
                _fault("ckpt.rolled-back", pid, handed, guardian=guardian)
                handed_back = False
                if link is not None and socks and _alive(pid):
                    with contextlib.suppress(MigSGXError):
                        link.resume(socks)
                        handed_back = True
                if not handed_back:
                    let_go(socks)  # (nobody takes them: they end as the connections close)
                for path in directory.iterdir():
                    if path.name != JOURNAL:
                        with contextlib.suppress(OSError):
                            path.unlink()
                lost = [
                    LostEnclave.of(i, h.info) for i, h in enumerate(handed)
                    if (i not in asked or i in refused) and dead(h.info.pid)
                ]  # fmt: skip
                # (``source_lost``: ``migsgx recover --checkpoint --json`` names them)
                named = {"source_lost": [e.to_dict() for e in lost]} if lost else {}
                write_journal(directory, "aborted", holders=[], **named)
                said = _not_saved(exc, pid) if isinstance(exc, Exception) else exc
                if lost and isinstance(exc, Exception) and not isinstance(said, SourceGoneError):
                    # Nothing saved, the source runs, but not as before: exit 11.
                    raise lost_error(lost, "the checkpoint", exc) from exc
                if said is not exc:
                    raise said from exc
            raise
    finally:
        if guardian is not None:
            guardian.release()
        for h in handed:
            h.sock.close()
    if len(committed) != len(outs):
        raise MigSGXError(
            f"only {len(committed)} of {len(outs)} enclaves gave their state up; the "
            f"checkpoint in {directory} holds them all"
        )
    write_journal(directory, "done")
    return CheckpointResult(directory, pid, len(handed))


def _write_meta(directory: Path, meta: dict[str, object]) -> bytes:
    """Write ``migsgx.json`` durably; returns its SHA-256 (which the enclaves commit)."""

    data = (json.dumps(meta, indent=2) + "\n").encode()
    write_durably(directory / CHECKPOINT_META, data)
    return hashlib.sha256(data).digest()


def _race_an_abort(pending: list[CheckpointOut]) -> None:
    """Fault ``abort-rest``: abort the pending enclaves, as a racing guardian would, and die.

    A guardian that asked every enclave ``__mig_status`` while this tool's last
    commit still ran inside its enclave sees them all pending and aborts them:
    the store must refuse those aborts (the committed gate was the commit
    point), or the checkpoint splits.  The tool then ends as a crash would.
    """

    for out in pending:
        with contextlib.suppress(MigSGXError, OSError):
            out.link.call("__mig_abort", "the tool died")
    os._exit(70)


def _gate_after_death(
    directory: Path, index: int, pid: int, meta: bytes, files: dict[str, list[int | str]]
) -> bool | None:
    """Whether enclave ``index``'s gate committed; its process ``pid`` died after it
    was sent its commit.  None: the gate cannot be read.

    Read once every thread of it ended, through a fresh enclave of its image
    (the gate's record, under the store's lock): final, since its platform
    service refuses for good a request whose enclave hung up before the write.
    """

    if not wait_ended(pid):
        return None
    try:
        sock = default_platform_socket(None)
        CheckpointIn(directory, index, sock, meta, files=files).probe()
    except CheckpointGateError:
        return False  # (pending, or gone: never committed)
    except (MigSGXError, OSError):
        return None
    return True


def _alive(pid: int) -> bool:
    return process_state(pid) not in ("", "Z", "X")


def _not_saved(exc: Exception, pid: int) -> Exception:
    """A checkpoint rolled back: the status says so, as ``migrate``'s does.

    Exit 6 (``migration``) when the source runs on, 8 (``source-gone``) when it
    ended; a configuration error keeps its own status.  Before, every failure
    but a few exited 1, whether or not the source ran.  (11, an enclave that
    died before it was asked to commit, is the caller's: :mod:`.enclave_loss`.)
    """

    if isinstance(exc, (MigrationError, ConfigError)):
        return exc
    if not _alive(pid):
        return SourceGoneError(
            f"the source (pid {pid}) ended during the checkpoint: nothing was saved "
            f"({type(exc).__name__}: {exc})"
        )
    return MigrationError(f"nothing was checkpointed, the source runs on: {exc}")


def _fault(
    point: str,
    pid: int,
    handed: list[HandedEnclave],
    platform: Path | None = None,
    *,
    guardian: Guardian | None = None,
) -> bool:
    """A fault point of checkpoint or restore (``kill-source``, ``kill-enclave`` here).

    True for ``abort-rest``, which the caller acts on (:func:`_race_an_abort`).

    ``kill-platform`` SIGKILLs this host's platform service (``platform``, or the
    one ``$MIGSGX_PLATFORM_SOCKET`` names) and returns once it is dead;
    ``kill-guardian`` SIGKILLs the checkpoint's guardian (waited for), and then
    this tool ends at once (as ``exit``): both holders of the enclaves gone.
    """

    action = fault(point)
    if action == "kill-enclave-guardian-and-exit" and guardian is not None:
        kill_dead([guardian.proc.pid])  # (then as ``kill-enclave-and-exit``)
        action = "kill-enclave-and-exit"
    if action == "kill-guardian":
        if guardian is not None:
            kill_dead([guardian.proc.pid])
        os._exit(70)
    if action == "kill-platform":
        sock = platform if platform is not None else default_platform_socket(None)
        kill_dead([socket_owner(sock)])
    if action == "kill-source" and pid > 0:
        kill_until_dying(pid)  # (not until a zombie: CRIU holds a killed pidns init's end)
    elif action in ("kill-enclave", "kill-enclave-and-exit") and handed:
        kill_dead([handed[0].info.pid])  # (dead before the next step: no race with it)
        if action == "kill-enclave-and-exit":
            os._exit(70)  # (its guardian finds one enclave dead, the others alive)
    return action == "abort-rest"


def _digests(directory: Path) -> dict[str, list[int | str]]:
    """Size and SHA-256 of every file the restore reads (logs and the metadata aside)."""

    files: dict[str, list[int | str]] = {}
    for path in sorted(directory.iterdir()):
        unchecked = path.name in (CHECKPOINT_META, HELD, JOURNAL) or path.name.startswith("stats-")
        if path.is_file() and not unchecked and not path.name.endswith((".log", ".tmp")):
            digest = hashlib.sha256()
            with path.open("rb") as src:
                while block := src.read(1 << 20):
                    digest.update(block)
            files[path.name] = [path.stat().st_size, digest.hexdigest()]
    return files


def _pid_start(pid: int) -> list[int | str]:
    return [pid, start_time(pid)]
