"""The agent's control channel: mutual TLS with the deployment CA, and nothing else.

The agent runs in this process on loopback; the tests dial it the way the
migration tool does, and in ways it must refuse.
"""

from __future__ import annotations

import shutil
import socket
import ssl
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from migsgx.agent.protocol import VERSION, AgentError
from migsgx.agent.server import Agent, AgentConfig
from migsgx.agent.source import AgentConnection
from migsgx.agent.tls import (
    AgentIdentity,
    PeerCertificateError,
    issue_agent_identity,
    server_context,
)
from migsgx.sgx.ca import ProvisioningCA
from migsgx.wire import recv_frame, send_frame

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

LOOPBACK = "127.0.0.1"


@dataclass
class World:
    root: Path
    ca_dir: Path
    port: int
    agent: Agent

    def identity(self, name: str, *, ca_dir: Path | None = None, names: list[str] | None = None
                 ) -> AgentIdentity:  # fmt: skip
        return issue_agent_identity(
            ca_dir or self.ca_dir, self.root / name, name, names or [LOOPBACK]
        )

    def connect(self, identity: AgentIdentity, address: str = LOOPBACK) -> AgentConnection:
        return AgentConnection((address, self.port), identity, 10.0)


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    ca_dir = tmp_path / "ca"
    ProvisioningCA.init(ca_dir)
    identity = issue_agent_identity(ca_dir, tmp_path / "agent-state", "dst", [LOOPBACK])
    agent = Agent(
        AgentConfig(
            state=tmp_path / "agent-state",
            listen=(LOOPBACK, 0),
            platform_socket=tmp_path / "no-platform.sock",
            identity=identity,
            work_dir=tmp_path / "work",
            subreaper=False,
        )
    )
    _, port = agent.bind()
    thread = threading.Thread(target=agent.serve_forever, daemon=True)
    thread.start()
    yield World(tmp_path, ca_dir, port, agent)
    agent.shutdown()
    thread.join(5)


def hello(conn: AgentConnection) -> dict[str, object]:
    return conn.call({"t": "hello", "version": VERSION, "host_id": "test"}, "welcome")


def test_a_deployment_certificate_gets_in(world: World) -> None:
    conn = world.connect(world.identity("src"))
    try:
        assert hello(conn) == {"t": "welcome", "version": VERSION, "host_id": "dst"}
    finally:
        conn.close()


def test_the_agent_speaks_the_older_of_the_offer_and_its_own_version(world: World) -> None:
    for offered, answered in ((1, 1), (VERSION, VERSION), (VERSION + 1, VERSION)):
        conn = world.connect(world.identity("src"))
        try:
            welcome = conn.call({"t": "hello", "version": offered, "host_id": "t"}, "welcome")
            assert welcome["version"] == answered
        finally:
            conn.close()
    conn = world.connect(world.identity("src"))
    try:
        assert conn.greet("test")["version"] == VERSION and conn.version == VERSION
    finally:
        conn.close()


def test_a_version_1_session_refuses_a_field_of_version_2(world: World) -> None:
    conn = world.connect(world.identity("src"))
    try:
        conn.call({"t": "hello", "version": 1, "host_id": "old"}, "welcome")
        begin = {
            "t": "begin",
            "session_id": b"s" * 16,
            "enclaves": [],
            "pids": [],
            "pidns": True,
            "tcp_close": True,
            "page_tls": True,
            "memory_bytes": 1 << 20,
        }
        send_frame(conn.sock, begin)  # (conn.send would leave the field out)
        with pytest.raises(AgentError, match="memory_bytes is not in control protocol version 1"):
            conn.receive("begin", "ready")
    finally:
        conn.close()


def test_an_agent_told_min_protocol_2_refuses_a_version_1_tool_at_hello(world: World) -> None:
    world.agent.config.min_protocol = 2
    try:
        conn = world.connect(world.identity("src"))
        try:
            with pytest.raises(AgentError, match=r"\[protocol-version\].*up to 1, this agent"):
                conn.call({"t": "hello", "version": 1, "host_id": "old"}, "welcome")
        finally:
            conn.close()
        conn = world.connect(world.identity("src"))
        try:
            assert conn.greet("new")["version"] == VERSION
        finally:
            conn.close()
    finally:
        world.agent.config.min_protocol = 1
    # Operators see which versions arrive (when no 1 arrives any more: --min-protocol 2).
    sessions = world.agent.metrics.registry.get_sample_value
    assert sessions("migsgx_control_sessions_total", {"version": "refused"}) == 1
    assert (sessions("migsgx_control_sessions_total", {"version": str(VERSION)}) or 0) >= 1


def test_a_certificate_of_another_ca_is_refused(world: World) -> None:
    other_ca = world.root / "other-ca"
    ProvisioningCA.init(other_ca)
    foreign = world.identity("intruder", ca_dir=other_ca)
    # It trusts our CA, so it gets as far as presenting its own certificate.
    shutil.copy(world.ca_dir / "ca.pem", foreign.ca)
    conn = world.connect(foreign)
    with pytest.raises(AgentError):
        hello(conn)  # TLS 1.3: the server's refusal arrives with the first read
    conn.close()


def test_an_agent_of_another_ca_is_not_trusted(world: World) -> None:
    other_ca = world.root / "other-ca"
    ProvisioningCA.init(other_ca)
    with pytest.raises(PeerCertificateError, match="not trusted"):
        world.connect(world.identity("lost", ca_dir=other_ca))


def test_a_pck_certificate_of_the_same_ca_is_refused(world: World) -> None:
    """The CA also certifies platform keys; those must not open a control channel."""

    key = ec.generate_private_key(ec.SECP256R1())
    cert = ProvisioningCA.load(world.ca_dir).issue_pck(key.public_key(), "someone")
    ident = world.identity("pck")
    ident.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    ident.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    conn = world.connect(ident)
    with pytest.raises(AgentError):
        hello(conn)
    conn.close()


def test_no_client_certificate_is_refused(world: World) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cafile=world.ca_dir / "ca.pem")
    with socket.create_connection((LOOPBACK, world.port), timeout=10) as raw:
        tls = ctx.wrap_socket(raw, server_hostname=LOOPBACK)
        with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
            send_frame(tls, {"t": "hello", "version": VERSION, "host_id": "x"})
            if not tls.recv(1):
                raise ConnectionError("closed")


def test_plain_tcp_gets_no_answer(world: World) -> None:
    with socket.create_connection((LOOPBACK, world.port), timeout=10) as raw:
        send_frame(raw, {"t": "hello", "version": VERSION, "host_id": "x"})
        reply = b""
        try:
            while chunk := raw.recv(4096):
                reply += chunk
        except ConnectionResetError:
            pass
        assert b"welcome" not in reply  # at most a TLS alert, then the connection ends


def test_the_agent_name_must_match_the_address_dialled(world: World, tmp_path: Path) -> None:
    wrong = issue_agent_identity(world.ca_dir, tmp_path / "wrong", "dst", ["10.250.0.9"])
    world.agent.context = server_context(wrong)
    with pytest.raises(PeerCertificateError, match="not trusted"):
        world.connect(world.identity("src"))


def test_a_request_out_of_turn_is_refused(world: World) -> None:
    conn = world.connect(world.identity("src"))
    try:
        with pytest.raises(AgentError, match="not allowed in state new"):
            conn.call({"t": "restore"}, "restored")
    finally:
        conn.close()


def test_an_oversize_frame_ends_the_session(world: World) -> None:
    conn = world.connect(world.identity("src"))
    try:
        hello(conn)
        conn.sock.sendall(struct.pack(">I", 512 << 20))
        assert conn.sock.recv(1) == b""
    finally:
        conn.close()


def test_a_begin_with_a_bad_migration_id_aborts(world: World) -> None:
    conn = world.connect(world.identity("src"))
    try:
        hello(conn)
        conn.send(
            {"t": "begin", "session_id": b"short", "enclaves": [], "pids": [], "pidns": True,
             "tcp_close": True, "page_tls": True}
        )  # fmt: skip
        reply = recv_frame(conn.sock, None)
        assert reply["t"] == "err" and reply["code"] == "protocol"
    finally:
        conn.close()
