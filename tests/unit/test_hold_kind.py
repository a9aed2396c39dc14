"""The kind of a refused ``__mig_hold`` decides whether a migration goes on.

``hold-kept`` means the enclave keeps another process's duplicate of its
connection (one that names no nonce of the tool's journal): the tool refuses to
migrate.  Any other refusal, an enclave runtime older than the call first
(``unknown-ecall``, or ``enclave-busy`` while it is quiesced), keeps nobody's
duplicate, and the migration goes on without one as before.

Both ends in this process: the tool's :class:`~migsgx.datapath.enclave_link.EnclaveLink`
on one end of a socket pair, the enclave's real :class:`~migsgx.enclave.hold.Hold`
(or an answer as an older runtime gives it) on the other.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any, cast

import pytest

from migsgx import errors
from migsgx.agent.source_enclaves import _EnclaveSteps
from migsgx.channel import ECALL, ECALL_FRAME_MAX
from migsgx.datapath.enclave_link import EnclaveLink, kept_by_another, refusal_kind
from migsgx.enclave import app_channel
from migsgx.enclave.hold import Hold, HoldKeptError
from migsgx.errors import (
    EnclaveBusyError,
    EnclaveLostError,
    HoldRefusedError,
    MigrationError,
    MigSGXError,
    ProtocolError,
    UnknownEcallError,
    error_from_wire,
)
from migsgx.wire import recv_frame, send_frame


@pytest.mark.parametrize(
    ("refusal", "another"),
    [
        (error_from_wire("hold-kept", "__mig_hold refused"), True),
        (HoldKeptError("kept"), True),
        (MigSGXError("an unknown class, the code on the wire"), False),
        (UnknownEcallError("the enclave declares no ECALL '__mig_hold'"), False),
        (EnclaveBusyError("the enclave is quiesced for migration"), False),
        (ProtocolError("__mig_hold comes with its descriptors"), False),
        (EnclaveLostError("the enclave went away during __mig_hold"), False),
        (OSError("broken pipe"), False),
    ],
)
def test_the_kind_decides(refusal: BaseException, another: bool) -> None:
    assert kept_by_another(refusal) is another


def test_a_code_on_the_wire_decides_not_the_message() -> None:
    assert not kept_by_another(error_from_wire("unknown-ecall", "hold-kept"))
    assert kept_by_another(MigSGXError("whatever it says", wire_code="hold-kept"))
    assert refusal_kind(OSError("broken pipe")) == "OSError"


def test_the_refusal_is_did_not_move() -> None:
    """Exit 6: ``HoldRefusedError`` is a ``MigrationError`` with a code of its own."""

    assert issubclass(HoldRefusedError, MigrationError)
    assert error_from_wire("hold-refused", "x").__class__ is HoldRefusedError


Answer = Callable[[socket.socket, dict[str, Any]], dict[str, Any]]


@pytest.fixture
def enclave() -> Iterator[Callable[[Answer], socket.socket]]:
    """The tool's end of a connection whose other end answers each call with ``answer``."""

    made: list[tuple[socket.socket, socket.socket, threading.Thread]] = []

    def start(answer: Answer) -> socket.socket:
        ours, theirs = socket.socketpair()

        def serve() -> None:
            while True:
                try:
                    msg = recv_frame(theirs, ECALL, max_size=ECALL_FRAME_MAX)
                except (OSError, MigSGXError):
                    return
                send_frame(theirs, {"id": msg["id"], **answer(theirs, msg)})

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        made.append((ours, theirs, thread))
        return ours

    yield start
    for ours, theirs, thread in made:
        ours.close()
        theirs.shutdown(socket.SHUT_RDWR)
        thread.join(5)
        theirs.close()


def _runtime(hold: Hold) -> Answer:
    """The enclave runtime's answer to a hold (``AppChannel._hold``), the real Hold."""

    def answer(sock: socket.socket, msg: dict[str, Any]) -> dict[str, Any]:
        try:
            return {"t": "ret", "value": hold.take(sock, msg["args"])}
        except MigSGXError as exc:
            return {"t": "err", "code": exc.code, "message": exc.message}

    return answer


def _older_runtime(sock: socket.socket, msg: dict[str, Any]) -> dict[str, Any]:
    """A runtime that predates ``__mig_hold``: an ECALL it does not declare."""

    err = UnknownEcallError(f"the enclave declares no ECALL {msg['fn']!r}")
    return {"t": "err", "code": err.code, "message": err.message}


def _tool_hold(sock: socket.socket) -> tuple[list[object], HoldRefusedError | None]:
    """The tool's own ``_hold`` of an enclave on ``sock`` (no transfer, no app link)."""

    steps = cast(_EnclaveSteps, SimpleNamespace(transfers=[], link=None))
    handed = SimpleNamespace(sock=sock, index=0, info=SimpleNamespace(pid=os.getpid()))
    return _EnclaveSteps._hold(steps, cast(Any, handed))


def test_a_hold_sent_first_by_another_process_refuses_the_migration(
    enclave: Callable[[Answer], socket.socket],
) -> None:
    """The application's own ``__mig_hold`` (its nonce, not the journal's) went first:
    the tool's is refused ``hold-kept``, and the tool refuses to migrate, naming it."""

    hold = Hold(lambda _: None, state=lambda: "idle")
    sock = enclave(_runtime(hold))
    EnclaveLink(sock).hold(None, b"the-applications-own")  # the application's, first
    entry, refused = _tool_hold(sock)
    assert entry == []
    assert isinstance(refused, HoldRefusedError)
    assert "enclave 0" in str(refused) and "hold-kept" in str(refused)
    assert "nothing moved, the source runs on" in str(refused)
    hold.drop()


def test_the_kind_is_kept_where_the_tool_knows_no_class_of_it(
    enclave: Callable[[Answer], socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tool's process never imports the enclave runtime, where ``hold-kept``'s
    class lives: the rebuilt error is the root type, and its wire code still decides."""

    monkeypatch.delitem(errors._ALL, "hold-kept")
    hold = Hold(lambda _: None, state=lambda: "idle")
    sock = enclave(_runtime(hold))
    EnclaveLink(sock).hold(None, b"the-applications-own")
    with pytest.raises(MigSGXError) as refused:
        EnclaveLink(sock).hold(None, b"the-tools")
    assert type(refused.value) is MigSGXError and kept_by_another(refused.value)
    entry, refusal = _tool_hold(sock)
    assert entry == [] and isinstance(refusal, HoldRefusedError)
    assert "(hold-kept: __mig_hold refused" in str(refusal)
    hold.drop()


def test_the_tools_hold_when_nobody_else_holds(
    enclave: Callable[[Answer], socket.socket],
) -> None:
    hold = Hold(lambda _: None, state=lambda: "idle")
    sock = enclave(_runtime(hold))
    entry, refused = _tool_hold(sock)
    assert refused is None and hold.held
    assert entry[0] == os.getpid() and len(bytes.fromhex(str(entry[3]))) == 16
    hold.drop()


def test_an_older_runtime_migrates_without_a_duplicate(
    enclave: Callable[[Answer], socket.socket],
) -> None:
    sock = enclave(_older_runtime)
    assert _tool_hold(sock) == ([], None)


def test_the_older_runtime_fault_takes_the_hold_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """``enclave.hold:unknown-call`` answers ``__mig_hold`` as an older runtime; nothing else."""

    assert not app_channel._as_older_runtime("__mig_hold")
    monkeypatch.setenv("MIGSGX_FAULT", "tool.after-prepare:fail,enclave.hold:unknown-call")
    assert app_channel._as_older_runtime("__mig_hold")
    for other in ("__mig_held", "__mig_unhold", "__mig_watch", "__mig_abort", "put"):
        assert not app_channel._as_older_runtime(other)
    monkeypatch.setenv("MIGSGX_FAULT", "enclave.hold:fail")
    assert not app_channel._as_older_runtime("__mig_hold")
