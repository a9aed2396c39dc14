"""A ``refuse`` request's listener lives no longer than the session that asked for it.

The destination agent's session object over a real socket pair (the control
connection) and a real TCP listener on loopback; no enclave, no platform service
(nothing gets as far as a refusal).  ``refuse`` for a post-copy session that ended
here (its note) opens a data listener; it ends once it took its one connection,
or as the asking session ends: a connection already made by then is still taken
(the tool connects before it closes its control connection), nothing later.
Before, it waited 30 s for a connection whatever happened to its session.
"""

from __future__ import annotations

import socket
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import cbor2
import pytest

from migsgx.agent.config import AgentHost
from migsgx.agent.datalink import CHALLENGE_SIZE
from migsgx.agent.held import HeldRecord
from migsgx.agent.incoming import IncomingMigration
from migsgx.agent.protocol import CONTROL, CONTROL_FRAME_MAX
from migsgx.agent.refusal import mark_refusable
from migsgx.agent.versions import VERSION
from migsgx.host.appctl import info_to_wire
from migsgx.host.client import EnclaveInfo
from migsgx.wire import recv_frame, send_frame

SID = bytes(range(16))
INFO = EnclaveInfo(
    pid=7, mr_enclave=bytes(32), mr_signer=bytes(32), isv_prod_id=1, isv_svn=2,
    debug=True, memory_size=1 << 20, thread_slots=2, ecalls=("put",),
)  # fmt: skip
LOCAL = "127.0.0.1"


class Agent:
    """What a session on a connection of its own asks of its agent."""

    def __init__(self, tmp: Path) -> None:
        self.config = SimpleNamespace(
            io_timeout=10.0, commit_grace=0.1, min_protocol=1, work_dir=tmp / "work",
            platform_socket=tmp / "platform.sock", state=tmp / "state",
        )  # fmt: skip
        self.metrics = SimpleNamespace(greeted=lambda version: None)
        self.host_id = "dst"

    def discard(self, path: Path | None) -> None:
        pass


@pytest.fixture
def asking(tmp_path: Path) -> tuple[socket.socket, threading.Thread]:
    """A session on a connection of its own, greeted; the tool's end and the session's run."""

    agent = Agent(tmp_path)
    record = HeldRecord(
        SID.hex(), 0, 0, "pid", LOCAL, LOCAL, [cbor2.dumps(info_to_wire(INFO)).hex()]
    )
    mark_refusable(tmp_path / "work" / SID.hex(), record)
    tool, ours = socket.socketpair()
    session = IncomingMigration(cast(AgentHost, agent), ours, LOCAL)
    run = threading.Thread(target=session.run, daemon=True)
    run.start()
    assert _call(tool, {"t": "hello", "version": VERSION, "host_id": "src"})["t"] == "welcome"
    return tool, run


def _call(sock: socket.socket, msg: dict[str, Any]) -> dict[str, Any]:
    send_frame(sock, msg, max_size=CONTROL_FRAME_MAX)
    return dict(recv_frame(sock, CONTROL, max_size=CONTROL_FRAME_MAX))


def _refuse(tool: socket.socket) -> int:
    reply = _call(tool, {"t": "refuse", "session_id": SID, "index": 0})
    assert reply["t"] == "redelivery", reply
    return int(reply["data_port"])


def _session_ends(tool: socket.socket, run: threading.Thread) -> None:
    tool.close()
    run.join(30)
    assert not run.is_alive()


def test_the_listener_ends_with_the_session_that_asked(
    asking: tuple[socket.socket, threading.Thread],
) -> None:
    tool, run = asking
    port = _refuse(tool)
    _session_ends(tool, run)
    # Closed by the time the session's run returned: nobody can connect any more.
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((LOCAL, port), timeout=5).close()


def test_a_connection_made_before_the_session_ended_is_still_taken(
    asking: tuple[socket.socket, threading.Thread],
) -> None:
    tool, run = asking
    port = _refuse(tool)
    data = socket.create_connection((LOCAL, port), timeout=10)
    with data:
        _session_ends(tool, run)
        # Accepted: the data connection's opening begins (its challenge), and only one
        # connection is taken.
        assert len(data.recv(CHALLENGE_SIZE, socket.MSG_WAITALL)) == CHALLENGE_SIZE
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((LOCAL, port), timeout=5).close()
