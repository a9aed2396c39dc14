"""Plain processes for the CRIU tests: the fixtures' types, and a small TCP server to move.

:func:`server_program` is a Python program that holds state worth keeping in
memory, listens on TCP (a socket CRIU must restore), writes its port to a file
once it listens and answers one line per connection; :func:`start_server`
runs it through the ``spawn`` fixture and waits for that port; :func:`ask`
sends it one line.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from migsgx.lab.netns import Host, HostNetwork

__all__ = ["HostsFactory", "KillLater", "SpawnFactory", "ask", "server_program", "start_server"]

# The fixtures of tests/integration/conftest.py, as the tests see them.
HostsFactory = Callable[..., HostNetwork]
SpawnFactory = Callable[..., subprocess.Popen[bytes]]
KillLater = Callable[[int], int]

_PROGRAM = """
import hashlib, os, socket, sys
bind_address, port_file, args = sys.argv[1], sys.argv[2], sys.argv[3:]
{state}
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((bind_address, 0))
srv.listen(16)
with open(port_file + ".tmp", "w") as f:
    f.write(str(srv.getsockname()[1]))
os.replace(port_file + ".tmp", port_file)
while True:
    conn, _ = srv.accept()
    with conn:
        words = conn.recv(128).split() or [b""]
{answer}
        conn.sendall(reply + b"\\n")
"""


def server_program(state: str, answer: str) -> str:
    """The server: ``state`` runs once (``args``: its extra arguments); ``answer`` sets
    ``reply`` (bytes) from ``words`` (the request line, split)."""

    return _PROGRAM.format(
        state=textwrap.dedent(state).strip(),
        answer=textwrap.indent(textwrap.dedent(answer).strip(), " " * 8),
    )


def start_server(
    spawn: SpawnFactory,
    tmp_path: Path,
    program: str,
    *args: str,
    bind: str = "127.0.0.1",
    host: Host | None = None,
    prefix: Sequence[str] = (),
) -> tuple[subprocess.Popen[bytes], int]:
    """Run ``program`` (``prefix``: e.g. ``unshare --pid --fork``); its process and port
    once it listens."""

    port_file = tmp_path / "port"
    argv = [*prefix, sys.executable, "-c", program, bind, str(port_file), *args]
    proc = spawn(argv, host=host)
    deadline = time.monotonic() + 15
    while not port_file.exists():
        if proc.poll() is not None:
            err = (tmp_path / "proc.err").read_text()
            raise AssertionError(f"server exited with {proc.returncode}: {err}")
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.01)
    return proc, int(port_file.read_text())


def ask(line: str, port: int, *, via: Host | None = None, address: str = "127.0.0.1") -> str:
    """One request line to the server at ``address`` (from host ``via``); its answer."""

    if via is None:
        conn = socket.create_connection((address, port), timeout=10)
    else:
        conn = via.connect(address, port, timeout=10)
    with conn:
        conn.sendall(line.encode())
        return conn.makefile().readline().strip()
