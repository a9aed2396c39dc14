"""A ``begin`` whose container specification is misshapen gets an ``err`` frame, nothing else.

A peer with the deployment's certificate sent ``begin`` for a runc container
with ``"process": [1]``: the destination agent's admission called ``.get`` on
the list, logged a traceback and closed the connection; the tool got no
answer.  Now the configuration's shape is checked before anything reads it:
the answer is ``err`` with the admission's code (``container-spec``), naming
the field, and the session goes on answering (nothing was launched).

The agent runs in this process on loopback (as in ``test_agent.py``), dialled
with mutual TLS and the source's identity, the way the migration tool does.
"""

from __future__ import annotations

import logging
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from migsgx.agent.protocol import VERSION
from migsgx.agent.server import Agent, AgentConfig
from migsgx.agent.source import AgentConnection
from migsgx.agent.tls import issue_agent_identity
from migsgx.sgx.ca import ProvisioningCA
from migsgx.wire import recv_frame

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

LOOPBACK = "127.0.0.1"


@pytest.fixture(scope="module")
def agent_port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, int]]:
    root = tmp_path_factory.mktemp("spec-shapes")
    ProvisioningCA.init(root / "ca")
    identity = issue_agent_identity(root / "ca", root / "agent-state", "dst", [LOOPBACK])
    agent = Agent(
        AgentConfig(
            state=root / "agent-state",
            listen=(LOOPBACK, 0),
            platform_socket=root / "no-platform.sock",
            identity=identity,
            work_dir=root / "work",
            subreaper=False,
        )
    )
    _, port = agent.bind()
    thread = threading.Thread(target=agent.serve_forever, daemon=True)
    thread.start()
    yield root, port
    agent.shutdown()
    thread.join(5)


def _spec(where: str, value: Any) -> dict[str, Any]:
    # (admitted but for ``value``: the namespaces a container needs)
    spec: dict[str, Any] = {
        "ociVersion": "1.0.2",
        "process": {"args": ["app"]},
        "linux": {"namespaces": [{"type": t} for t in ("pid", "ipc", "uts", "mount")]},
    }
    node = spec
    *parents, last = where.split(".")
    for key in parents:
        node = node.setdefault(key, {})
    node[last] = value
    return spec


@pytest.mark.parametrize(
    ("where", "value"),
    [
        ("process", [1]),  # (the attack's)
        ("linux.namespaces", [{"type": ["pid"]}]),
        ("linux.namespaces", {"type": "network"}),
        ("process.capabilities.bounding", [["CAP_SYS_ADMIN"]]),
    ],
)
def test_a_begin_with_a_misshapen_runc_spec_gets_an_err_frame(
    agent_port: tuple[Path, int], where: str, value: Any, caplog: pytest.LogCaptureFixture
) -> None:
    if shutil.which("runc") is None:
        pytest.fail("runc is not installed on this host")
    root, port = agent_port
    identity = issue_agent_identity(root / "ca", root / "src", "src", [LOOPBACK])
    conn = AgentConnection((LOOPBACK, port), identity, 10.0)
    try:
        conn.call({"t": "hello", "version": VERSION, "host_id": "src"}, "welcome")
        with caplog.at_level(logging.WARNING, logger="migsgx"):
            conn.send(
                {"t": "begin", "session_id": b"s" * 16, "enclaves": [], "pids": [],
                 "pidns": True, "tcp_close": True, "page_tls": True, "driver": "runc",
                 "target": {"id": "kv1"}, "spec": _spec(where, value)}
            )  # fmt: skip
            reply = recv_frame(conn.sock, None)
        assert reply["t"] == "err" and reply["code"] == "container-spec", reply
        assert where in reply["message"], reply
        assert not [r for r in caplog.records if r.exc_info], "a traceback in the agent's log"
    finally:
        conn.close()
