"""An attacker on a destination agent's data port: nothing it sends runs.

A real agent (in this process, on loopback) and a real platform service: a
source tool opens a migration over mutual TLS, ``begin`` announces one enclave
(the probe's MRENCLAVE), and then the attacker tries the data port:

* the old opening, the session's bearer token in clear: dropped unparsed;
* a recorded opening replayed on a new connection: dropped;
* with the session's data key itself (as if it had leaked), a forged ``offer``
  naming a hostile image whose constructor writes a canary file: refused by the
  pin before anything launches (no new enclave log, no canary).
"""

from __future__ import annotations

import os
import secrets
import socket
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from platform_fixtures import World, make_image, shared_world

from migsgx.agent.datalink import CHALLENGE_SIZE, HELLO_SIZE, open_data
from migsgx.agent.incoming_data import DATA_HELLO_TIMEOUT
from migsgx.agent.protocol import VERSION, AgentError
from migsgx.agent.server import Agent, AgentConfig
from migsgx.agent.source import AgentConnection
from migsgx.agent.tls import issue_agent_identity
from migsgx.core.peer import PEER_FRAME_MAX
from migsgx.host.appctl import info_to_wire
from migsgx.host.client import EnclaveInfo
from migsgx.sgx.spawn import ServiceProcess
from migsgx.wire import encode, send_frame

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

LOOPBACK = "127.0.0.1"

CANARY_SOURCE = """
from migsgx.enclave import Enclave, ecall


class Planted(Enclave):
    def __init__(self, ctx):
        super().__init__(ctx)
        with open({canary!r}, "w") as f:
            f.write("the attacker's constructor ran")

    @ecall
    def noop(self):
        return None
"""


@dataclass
class Session:
    conn: AgentConnection
    mid: bytes
    data_port: int
    data_key: bytes


@pytest.fixture(scope="module")
def world() -> World:
    return shared_world()


@pytest.fixture
def agent_world(tmp_path: Path, world: World, service: ServiceProcess) -> Iterator[Path]:
    identity = issue_agent_identity(world.ca_dir, tmp_path / "dst", "dst", [LOOPBACK])
    agent = Agent(
        AgentConfig(
            state=tmp_path / "dst",
            listen=(LOOPBACK, 0),
            platform_socket=service.socket,
            identity=identity,
            work_dir=tmp_path / "work",
            subreaper=False,
        )
    )
    _, port = agent.bind()
    thread = threading.Thread(target=agent.serve_forever, daemon=True)
    thread.start()
    (tmp_path / "port").write_text(str(port))
    yield tmp_path
    agent.shutdown()
    thread.join(5)


def open_session(root: Path, world: World, enclaves: int = 1) -> Session:
    port = int((root / "port").read_text())
    src = issue_agent_identity(world.ca_dir, root / "src", "src", [LOOPBACK])
    conn = AgentConnection((LOOPBACK, port), src, 10.0)
    conn.call({"t": "hello", "version": VERSION, "host_id": "src"}, "welcome")
    sig = make_image(world.author).verify()
    info = EnclaveInfo(
        pid=1, mr_enclave=sig.mr_enclave, mr_signer=sig.mr_signer, isv_prod_id=7, isv_svn=1,
        debug=False, memory_size=1 << 20, thread_slots=4, ecalls=("echo",),
    )  # fmt: skip
    mid = secrets.token_bytes(16)
    ready = conn.call(
        {"t": "begin", "session_id": mid, "enclaves": [{"info": info_to_wire(info)}] * enclaves,
         "pids": [], "pidns": True, "tcp_close": True, "page_tls": True, "page_server": False},
        "ready",
    )  # fmt: skip
    return Session(conn, mid, int(ready["data_port"]), bytes(ready["data_key"]))


def enclave_logs(world: World) -> set[str]:
    return {p.name for p in (world.host_a.state_dir / "logs").glob("enclave-*.log")}


def dropped(sock: socket.socket) -> bool:
    sock.settimeout(10)
    try:
        while sock.recv(4096):
            pass
    except ConnectionResetError:
        pass
    return True


def test_the_bearer_token_in_clear_no_longer_opens_a_connection(
    agent_world: Path, world: World
) -> None:
    session = open_session(agent_world, world)
    try:
        with socket.create_connection((LOOPBACK, session.data_port)) as sock:
            assert len(sock.recv(CHALLENGE_SIZE, socket.MSG_WAITALL)) == CHALLENGE_SIZE
            old = encode({"t": "data", "token": session.data_key, "index": 0})
            sock.sendall(old.ljust(HELLO_SIZE, b"\0"))
            assert dropped(sock)
        with socket.create_connection((LOOPBACK, session.data_port)) as sock:
            sock.recv(CHALLENGE_SIZE, socket.MSG_WAITALL)
            sock.sendall(struct.pack(">I", 1 << 30) + b"\0" * (HELLO_SIZE - 4))  # a huge "frame"
            assert dropped(sock)
    finally:
        session.conn.close()


def test_a_replayed_opening_is_dropped(agent_world: Path, world: World) -> None:
    session = open_session(agent_world, world, enclaves=2)  # index 1 stays open for the replay
    try:
        recorded: list[bytes] = []

        class Recorder(socket.socket):
            def sendall(self, data, flags=0):  # type: ignore[no-untyped-def, override]
                recorded.append(bytes(data))
                return super().sendall(data, flags)

        first = Recorder(socket.AF_INET, socket.SOCK_STREAM)
        first.connect((LOOPBACK, session.data_port))
        open_data(first, session.data_key, session.mid, 0)  # the genuine source, recorded
        with socket.create_connection((LOOPBACK, session.data_port)) as replay:
            replay.recv(CHALLENGE_SIZE, socket.MSG_WAITALL)
            replay.sendall(recorded[0])
            assert dropped(replay)
        first.close()
    finally:
        session.conn.close()


def test_a_forged_offer_with_the_session_key_launches_nothing(
    agent_world: Path, world: World, tmp_path: Path
) -> None:
    canary = tmp_path / "canary"
    os.chmod(tmp_path, 0o777)  # the constructor could write here if it ever ran
    hostile = make_image(
        world.author, CANARY_SOURCE.format(canary=str(canary)), entry="probe_enclave:Planted"
    )
    session = open_session(agent_world, world)
    before = enclave_logs(world)
    try:
        with socket.create_connection((LOOPBACK, session.data_port)) as sock:
            open_data(sock, session.data_key, session.mid, 0)
            send_frame(
                sock,
                {"t": "offer", "files": dict(hostile.files), "chunk_size": 1 << 20, "slots": 2,
                 "mode": "pipelined"},
                max_size=PEER_FRAME_MAX,
            )  # fmt: skip
            with pytest.raises(AgentError, match="ImagePinError"):
                session.conn.call({"t": "enclaves_done"}, "enclaves_ready")
    finally:
        session.conn.close()
    assert not canary.exists(), "the forged image's constructor ran"
    assert enclave_logs(world) == before, "an enclave was launched for the forged offer"


def test_a_silent_connection_does_not_hold_up_the_genuine_one(
    agent_world: Path, world: World
) -> None:
    session = open_session(agent_world, world)
    try:
        with socket.create_connection((LOOPBACK, session.data_port)) as silent:
            silent.recv(CHALLENGE_SIZE, socket.MSG_WAITALL)  # and then nothing
            with socket.create_connection((LOOPBACK, session.data_port)) as genuine:
                # Openings run side by side: the genuine one does not wait out the
                # silent one's DATA_HELLO_TIMEOUT.
                genuine.settimeout(DATA_HELLO_TIMEOUT / 2)
                open_data(genuine, session.data_key, session.mid, 0)
    finally:
        session.conn.close()
