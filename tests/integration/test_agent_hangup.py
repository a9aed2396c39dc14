"""A destination session whose source hangs up inside a step's wait ends at once.

A real agent (in this process, on loopback, its default I/O time limit of
300 s), a real platform service, CRIU's real page server behind the sealed
page relay.  The source side is a peer speaking the control protocol itself:
it opens the step's other connection (an enclave's authenticated data
connection, the page connection), asks for the step (``enclaves_done``,
``images_done``) and hangs up its control connection alone, the other
connection left open and silent.  Before, the session waited there its whole
bound (the enclave's load, the page server's end: 300 s) before it ended;
now the control connection's hang-up ends the wait, and the session is
discarded as when its tool goes away between requests: its work directory
removed, its connections closed, no page server left.

(The tool killed with ``kill -9`` closes the data and page connections with
its control connection: the waits end then by those connections' end too.
These cells take the case where only the control connection's end says so.)
"""

from __future__ import annotations

import secrets
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from platform_fixtures import World, make_image, shared_world, wait_until

from migsgx.agent.datalink import open_data
from migsgx.agent.protocol import VERSION
from migsgx.agent.server import Agent, AgentConfig
from migsgx.agent.source import AgentConnection
from migsgx.agent.tls import issue_agent_identity
from migsgx.host.appctl import info_to_wire
from migsgx.host.client import EnclaveInfo
from migsgx.sgx.spawn import ServiceProcess

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

LOOPBACK = "127.0.0.1"
#: Well under the I/O time limit (300 s) the session waited before.
GONE_WITHIN = 60.0


@pytest.fixture(scope="module")
def world() -> World:
    return shared_world()


@pytest.fixture
def agent_root(tmp_path: Path, world: World, service: ServiceProcess) -> Iterator[Path]:
    identity = issue_agent_identity(world.ca_dir, tmp_path / "dst", "dst", [LOOPBACK])
    agent = Agent(
        AgentConfig(
            state=tmp_path / "dst", listen=(LOOPBACK, 0), platform_socket=service.socket,
            identity=identity, work_dir=tmp_path / "work", subreaper=False,
        )
    )  # fmt: skip
    _, port = agent.bind()
    thread = threading.Thread(target=agent.serve_forever, daemon=True)
    thread.start()
    (tmp_path / "port").write_text(str(port))
    yield tmp_path
    agent.shutdown()
    thread.join(5)


def _begun(
    root: Path, world: World, *, enclaves: int, relay: bool
) -> tuple[AgentConnection, bytes, dict[str, Any]]:
    port = int((root / "port").read_text())
    identity = issue_agent_identity(world.ca_dir, root / "src", "src", [LOOPBACK])
    conn = AgentConnection((LOOPBACK, port), identity, 30.0)
    conn.call({"t": "hello", "version": VERSION, "host_id": "src"}, "welcome")
    sig = make_image(world.author).verify()
    info = EnclaveInfo(
        pid=1, mr_enclave=sig.mr_enclave, mr_signer=sig.mr_signer, isv_prod_id=7, isv_svn=1,
        debug=False, memory_size=1 << 20, thread_slots=4, ecalls=("echo",),
    )  # fmt: skip
    mid = secrets.token_bytes(16)
    begin: dict[str, object] = {
        "t": "begin", "session_id": mid, "enclaves": [{"info": info_to_wire(info)}] * enclaves,
        "pids": [], "pidns": True, "tcp_close": True,
    }  # fmt: skip
    pages = {"page_relay": True} if relay else {"page_server": False}
    begin.update(pages, page_tls=not relay)
    ready = conn.call(begin, "ready")
    assert (root / "work" / mid.hex()).is_dir()
    return conn, mid, ready


def _closed_by_the_agent(sock: socket.socket) -> bool:
    """Whether the agent closed its end of ``sock`` (read to its end)."""

    sock.settimeout(GONE_WITHIN)
    try:
        while sock.recv(4096):
            pass
    except ConnectionResetError:
        pass
    except TimeoutError:
        return False
    return True


def _page_servers(images: str) -> list[str]:
    out = subprocess.run(["pgrep", "-af", "page-server"], capture_output=True, text=True)
    return [line for line in out.stdout.splitlines() if images in line]


def test_enclaves_done_ends_at_the_hang_up(agent_root: Path, world: World) -> None:
    """``enclaves_done`` waits for an enclave whose data connection is open and silent;
    the source hangs up: the session is discarded at once (no load came: nothing held)."""

    conn, mid, ready = _begun(agent_root, world, enclaves=1, relay=False)
    data = socket.create_connection((LOOPBACK, int(ready["data_port"])))
    try:
        open_data(data, bytes(ready["data_key"]), mid, 0)
        conn.send({"t": "enclaves_done"})
        t0 = time.monotonic()
        conn.close()  # (after the request: the agent reads it, then the end)
        assert _closed_by_the_agent(data), "the data connection is still open"
        work = agent_root / "work" / mid.hex()
        assert wait_until(lambda: not work.exists(), GONE_WITHIN), "the session is still held"
        print(f"enclaves_done x hang-up: session gone after {time.monotonic() - t0:.2f} s")
    finally:
        data.close()


def test_images_done_ends_at_the_hang_up(agent_root: Path, world: World) -> None:
    """``images_done`` waits for the page server's end, its page connection open and
    silent; the source hangs up: page server, relay and session end at once."""

    conn, mid, ready = _begun(agent_root, world, enclaves=0, relay=True)
    pages = socket.create_connection((LOOPBACK, int(ready["page_port"])))
    work = agent_root / "work" / mid.hex()
    try:
        assert wait_until(lambda: bool(_page_servers(mid.hex())), 30), "no page server started"
        conn.send({"t": "images_done", "files": 0, "bytes": 0})
        t0 = time.monotonic()
        conn.close()  # (after the request: the agent reads it, then the end)
        assert _closed_by_the_agent(pages), "the page connection is still open"
        assert wait_until(lambda: not work.exists(), GONE_WITHIN), "the session is still held"
        assert wait_until(lambda: not _page_servers(mid.hex()), 10), _page_servers(mid.hex())
        print(f"images_done x hang-up: session gone after {time.monotonic() - t0:.2f} s")
    finally:
        pages.close()
