"""Handing a source's enclaves back to it, after the party that held them died.

The checkpoint or migration tool holds the application's enclave connections
from ``prepare`` on.  When it dies before the commit, whoever then holds them
(its guardian, :mod:`.guardian`, or ``migsgx recover --checkpoint``, which
takes them back from the enclaves themselves, :mod:`.ckpt_recover`) asks every
enclave to abort and hands the connections back to the application.  One
implementation for both.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Final

from ..containers.cgroups import thaw_file
from ..errors import MigSGXError
from .applink import AppLink
from .enclave_ask import Answer, ask, not_answering

if TYPE_CHECKING:
    from ..host.client import EnclaveInfo

__all__ = [
    "abort_answer", "abort_asked", "abort_enclave", "abort_frame_of", "abort_reply",
    "attach_when_running", "call_enclave", "commit_rest", "let_go", "resume_source",
]  # fmt: skip

#: The wait of a call whose caller does not bound it (a checkpoint's recovery);
#: the guardian and ``migsgx recover`` bound theirs (:mod:`.enclave_ask`).
ABORT_TIMEOUT: Final = 30.0
RESUME_WAIT: Final = 60.0


def _stderr(text: str) -> None:
    sys.stderr.write(f"migsgx[{os.getpid()}]: {text}\n")
    sys.stderr.flush()


def call_enclave(
    sock: socket.socket, fn: str, args: list[object], timeout: float = ABORT_TIMEOUT
) -> dict[str, object] | None:
    """One runtime call on a connection the tool held; None if the enclave is gone, or
    did not answer within ``timeout`` seconds (hung)."""

    return ask(sock, fn, args, timeout).msg


#: An enclave's answers to ``__mig_abort`` that leave it not aborted (see below).
_NOT_ABORTED = ("committed", "group-decided", "group-unchecked")


def abort_enclave(sock: socket.socket) -> bool:
    """Ask the enclave to abort its migration; False if it committed (or is gone)."""

    return abort_answer(sock) == "aborted"


def abort_answer(sock: socket.socket) -> str | None:
    """Ask the enclave to abort: ``aborted``, the code of a refusal, or None (gone)."""

    return abort_reply(sock)[0]


def abort_reply(sock: socket.socket, timeout: float = ABORT_TIMEOUT) -> tuple[str | None, bytes]:
    """:func:`abort_answer`, and the ABORT frame the enclave returned (b"" for none).

    The enclave returns its frame even when its store record failed (its
    platform service died with the tool): then the caller holds the only
    ABORT there is to carry to the destination (``docs/spec/commit.md`` 1 rule 4).
    Not secret (``handshake.md`` 9.1), and judged by the destination enclave itself.
    None: gone, or no answer within ``timeout`` (the caller tells which).
    """

    answer, frame, _ = abort_asked(sock, timeout)
    return answer, frame


def abort_asked(sock: socket.socket, wait: float | None = None) -> tuple[str | None, bytes, str]:
    """:func:`abort_reply` bounded by ``wait`` (:data:`~.enclave_ask.HUNG_WAIT` unless
    given), and what became of the call (``answered``, ``dead`` or ``hung``:
    :func:`.enclave_ask.ask`)."""

    asked = ask(sock, "__mig_abort", ["the tool died"], wait)
    return (*_abort_of(asked), asked.state)


def _abort_of(asked: Answer) -> tuple[str | None, bytes]:
    msg = asked.msg
    if msg is None:
        return None, b""
    # Not in a migration (the tool died before the transfer began): nothing to undo, a
    # return.
    # ``committed``: it committed, or another enclave of its migration did and it
    # rolled forward; ``group-decided``: it must roll forward and could not yet;
    # ``group-unchecked``: the platform store could not check its group (still frozen).
    if msg["t"] != "err":
        value = msg.get("value")
        return "aborted", bytes(value) if isinstance(value, bytes | bytearray) else b""
    code = msg.get("code")
    if code in _NOT_ABORTED:
        return str(code), b""
    # Any other refusal is no abort either: the enclave gave no ABORT, and it keeps its
    # migration's state and duplicate (``enclave/app_channel.py``).  Read as still
    # frozen (asked again, never handed back), as the trusted half's own refusals are.
    return "group-unchecked", b""


def abort_frame_of(sock: socket.socket, migration_id: bytes) -> bytes:
    """The ABORT frame of ``migration_id`` the enclave returned before, asked again.

    For an enclave that answers ``__mig_abort`` with nothing because it aborted
    already (the tool got its frame and died with it): it keeps the frames of
    the migrations it aborted as a source and hands the same one out again
    (``docs/spec/commit.md`` 1 rule 6).  b"" when it has none for that id (it
    committed it, never began it, or is gone): the caller carries nothing.
    """

    msg = call_enclave(sock, "__mig_abort_frame", [migration_id])
    value = msg.get("value") if msg is not None and msg["t"] == "ret" else None
    return bytes(value) if isinstance(value, bytes | bytearray) else b""


def let_go(socks: list[socket.socket]) -> None:
    """Nobody will take these enclaves back: each lets its duplicate go (``__mig_unhold``).

    An aborted source enclave keeps the duplicate of its connection it was
    given (``__mig_hold``) until the application has the connection back, so
    that the death of whoever asked for the abort cannot end it with the
    state.  Where the application is gone (or would not take them), closing
    these connections then ends the enclaves, as a crash of the application
    would.  An enclave that is gone, or holds none, changes nothing.
    """

    for sock in socks:
        # (bounded: a hung enclave reads it once it answers again; it never fails)
        ask(sock, "__mig_unhold", [])


def commit_rest(
    socks: Mapping[int, socket.socket], indexes: list[int], log: Callable[[str], None] = _stderr
) -> None:
    """The first COMMIT of a migration was its commit point: the undecided enclaves commit.

    The guardian's and ``migsgx recover``'s (on connections it took back), one
    implementation for both.  Each bounded (:mod:`.enclave_ask`): a hung one is
    said so, never taken for gone; its COMMIT stays asked on its connection and
    it commits once it answers (the decision was the first COMMIT's, not its own).
    """

    for index in indexes:
        sock = socks.get(index)
        if sock is None:
            continue
        asked = ask(sock, "__mig_commit", [])
        msg = asked.msg
        if asked.state == "hung":
            log(f"{not_answering(index, 0, '__mig_commit')}: it commits once it answers")
        elif msg is None:
            log(f"enclave {index} is gone before it committed: its state went with it")
        elif msg["t"] == "ret":
            log(f"enclave {index} committed (rolled forward)")
        elif msg.get("code") != "committed":
            log(f"enclave {index} could not commit yet: {msg.get('code')}")


def resume_source(
    app_pid: int,
    app_name: str,
    socks: list[socket.socket],
    fenced: list[int],
    frozen: list[str],
    log: Callable[[str], None] = _stderr,
) -> int:
    """Continue the fenced (thaw the frozen) source and hand it its enclaves back.

    Also what ``migsgx recover --checkpoint`` does for a source whose tool and
    guardian both died before the commit.  Returns 0 once handed back (or
    nothing to hand back), 1 if the application would not take them.
    """

    for pid in fenced:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
    for control in frozen:
        try:
            thaw_file(control)
        except MigSGXError as exc:
            log(f"could not thaw the source: {exc}")
    if not os.path.exists(f"/proc/{app_pid}"):
        log("the application is gone: its enclaves end with it")
        let_go(socks)
        return 0
    link = AppLink(app_pid, app_name, timeout=10)
    deadline = time.monotonic() + RESUME_WAIT
    while True:
        try:
            if socks:
                link.resume(socks)
            return 0
        except MigSGXError as exc:
            # CRIU may still hold the tree frozen for a moment; the app answers once it runs.
            if time.monotonic() > deadline:
                log(f"could not hand the enclaves back: {exc}")
                let_go(socks)
                return 1
            time.sleep(0.1)
            for pid in fenced:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
            for control in frozen:
                # (again: a CRIU letting go of the tree puts back the freezer state it found)
                with contextlib.suppress(MigSGXError, OSError):
                    thaw_file(control)


def attach_when_running(pid: int, socks: list[socket.socket], infos: list[EnclaveInfo]) -> None:
    """Hand a restored tree, continued, its enclaves: it answers once it runs (up to
    :data:`RESUME_WAIT`; then the last refusal is raised)."""

    deadline = time.monotonic() + RESUME_WAIT
    while True:
        try:
            link = AppLink.find(pid)
            if link is None:
                raise MigSGXError(f"the restored process {pid} has no migration control")
            link.attach(socks, infos)
            return
        except MigSGXError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
