"""Post-copy pieces that need no root: the pipe-size check, the served port, the errors."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from migsgx import _proc
from migsgx.agent.lazy import still_serving
from migsgx.cli import EXIT_MIGRATION, EXIT_SOURCE_LOST, _exit_code
from migsgx.containers.postcopy import check_pipe_max_size, served_port, uncork
from migsgx.errors import (
    CriuError,
    PostCopyError,
    PostCopyUnavailableError,
    SourceLostError,
    error_from_wire,
)


def test_pipe_max_size_too_low_is_named(tmp_path: Path) -> None:
    fake = tmp_path / "pipe-max-size"
    fake.write_text("1048576\n")
    with pytest.raises(PostCopyUnavailableError) as caught:
        check_pipe_max_size(fake)
    assert "fs.pipe-max-size is 1048576" in str(caught.value)
    assert "sysctl -w fs.pipe-max-size=4194304" in str(caught.value)
    fake.write_text("4194304\n")
    assert check_pipe_max_size(fake) == 4194304


def test_unreadable_pipe_max_size_is_unavailable(tmp_path: Path) -> None:
    with pytest.raises(PostCopyUnavailableError):
        check_pipe_max_size(tmp_path / "missing")


def test_served_port_is_read_from_the_dump_log(tmp_path: Path) -> None:
    (tmp_path / "dump.log").write_bytes(
        b"(00.2) Starting page server on port 0\n(00.2) Using 40123 port\n"
    )
    assert served_port(tmp_path, timeout=1, alive=lambda: True) == 40123


def test_served_port_of_a_dump_that_ended_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "dump.log").write_bytes(b"(00.1) Error (criu/cr-dump.c:1): Dumping FAILED.\n")
    with pytest.raises(CriuError) as caught:
        served_port(tmp_path, timeout=30, alive=lambda: False)
    assert "did not start serving pages" in str(caught.value)


def test_source_lost_has_its_own_exit_status_and_code() -> None:
    lost = SourceLostError("gone")
    assert _exit_code(lost) == EXIT_SOURCE_LOST == 9
    assert _exit_code(PostCopyUnavailableError("small pipes")) == EXIT_MIGRATION
    for cls in (PostCopyError, PostCopyUnavailableError, SourceLostError):
        assert type(error_from_wire(cls.code, "x")) is cls


# --- the lazy dump in a migration (agent/lazy.py) ----------------------------------------------
def test_lazy_dump_returns_once_post_dump_returned(tmp_path: Path) -> None:
    """The dump goes on (serving pages) after ``post-dump``; the caller goes on too."""

    import threading

    from migsgx.agent.lazy import LazyDump

    served = threading.Event()
    seen: list[str] = []

    def dump(on_dumped: Callable[[], None]) -> None:
        on_dumped()
        served.wait(10)  # CRIU serving pages until the destination has them all

    lazy = LazyDump(dump, lambda: seen.append("post-dump"), tmp_path)
    lazy.wait_dumped()
    assert seen == ["post-dump"] and lazy.thread.is_alive()
    assert not lazy.finish(0.01)
    served.set()
    assert lazy.finish(10) and lazy.error is None


def test_lazy_dump_raises_what_ended_it_before_post_dump_returned(tmp_path: Path) -> None:
    from migsgx.agent.lazy import LazyDump

    def veto() -> None:
        raise PostCopyError("the enclaves did not load")

    def dump(on_dumped: Callable[[], None]) -> None:
        try:
            on_dumped()
        except PostCopyError as exc:  # CRIU resumes the tree and fails the dump
            raise CriuError("post-dump callback failed") from exc

    lazy = LazyDump(dump, veto, tmp_path)
    with pytest.raises(CriuError):
        lazy.wait_dumped()
    lazy.stop()  # nothing to end: returns at once


def test_the_post_copy_messages_are_in_the_schema() -> None:
    from migsgx.agent.protocol import CONTROL
    from migsgx.errors import FrameError

    CONTROL.validate({"t": "restore", "lazy_port": 4002})
    CONTROL.validate({"t": "restore"})
    CONTROL.validate({"t": "window", "seconds": 1.5})
    with pytest.raises(FrameError):
        CONTROL.validate({"t": "restore", "lazy_port": "4002"})


# --- runc's lazy checkpoint (containers/runc_lazy.py) --------------------------------------------
#: Stands in for ``runc checkpoint --lazy-pages ... --status-fd FD CID``: reports the CRIU
#: configuration it was given, then writes the status byte (or fails without it).
FAKE_RUNC = """
import os, sys
fd = int(sys.argv[sys.argv.index("--status-fd") + 1])
conf = os.environ.get("CRIU_CONFIG_FILE", "")
open(sys.argv[1], "w").write(open(conf).read() if conf else "")
if sys.argv[2] == "fail":
    sys.stderr.write("criu failed: Dumping FAILED\\n")
    sys.exit(3)
os.write(fd, b"\\0")
"""


def _lazy_checkpoint(tmp_path: Path, how: str) -> tuple[object, Path]:
    import sys

    from migsgx.containers.runc_lazy import LazyCheckpoint

    tls = (tmp_path / "ca.pem", tmp_path / "agent.pem", tmp_path / "agent-key.pem")
    seen = tmp_path / "seen.conf"
    argv = [sys.executable, "-c", FAKE_RUNC, str(seen), how, "container-id"]
    return LazyCheckpoint(argv, tmp_path, tls=tls), seen


def test_lazy_checkpoint_gives_criu_tls_and_is_ready_on_the_status_byte(tmp_path: Path) -> None:
    from migsgx.containers.runc_lazy import LazyCheckpoint

    running, seen = _lazy_checkpoint(tmp_path, "serve")
    assert isinstance(running, LazyCheckpoint) and running.config is not None
    running.wait_ready()
    running.wait()
    assert seen.read_text().split("\n") == [
        "tls",
        f"tls-cacert {tmp_path / 'ca.pem'}",
        f"tls-cert {tmp_path / 'agent.pem'}",
        f"tls-key {tmp_path / 'agent-key.pem'}",
        "",
    ]
    assert not running.config.exists()  # (CRIU read it when it started)


def test_lazy_checkpoint_that_ends_without_serving_is_an_error(tmp_path: Path) -> None:
    from migsgx.containers import ContainerError
    from migsgx.containers.runc_lazy import LazyCheckpoint

    running, _ = _lazy_checkpoint(tmp_path, "fail")
    assert isinstance(running, LazyCheckpoint)
    with pytest.raises(ContainerError) as caught:
        running.wait_ready()
    assert "criu failed: Dumping FAILED" in str(caught.value)
    assert running.config is not None and not running.config.exists()


def test_live_says_which_engines_have_no_post_copy() -> None:
    import io

    from rich.console import Console

    from migsgx.cli_migrate import _post_copy_here

    out = io.StringIO()
    console = Console(file=out, width=400)
    assert not _post_copy_here(console, "podman")
    assert "post-copy is not supported for a podman container" in out.getvalue()
    assert "no lazy-pages mode" in out.getvalue()
    assert not _post_copy_here(console, "containerd")
    assert "containerd's task checkpoint has no lazy-pages mode" in out.getvalue()


# --- CRIU's corked page connections (containers/postcopy.py: uncork) ---------------------------
#: A process holding a corked TCP connection (as CRIU's page connections are), that
#: reports the connection's TCP_CORK and TCP_NODELAY on each line it reads.
CORKED = """
import socket, sys
sock = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1)
print("ready", flush=True)
for _ in sys.stdin:
    cork = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_CORK)
    nodelay = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    print(cork, nodelay, flush=True)
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="pidfd_getfd of another process needs root")
def test_uncork_pushes_another_process_connection_and_leaves_it_open() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        child = subprocess.Popen(
            [sys.executable, "-c", CORKED, str(port)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert child.stdin is not None and child.stdout is not None
        try:
            peer, _ = server.accept()
            with peer:
                assert child.stdout.readline().strip() == "ready"
                child.stdin.write("?\n")
                child.stdin.flush()
                assert child.stdout.readline().split() == ["1", "0"]  # corked, as CRIU's
                # The listener here is no connection of the child's; its one connection is.
                assert uncork(child.pid) == 1
                child.stdin.write("?\n")
                child.stdin.flush()
                assert child.stdout.readline().split() == ["0", "1"]
                # Only the duplicate was closed: the child's connection still works.
                peer.sendall(b"x")
                assert uncork(child.pid) == 1
        finally:
            child.kill()
            child.wait()
    assert uncork(child.pid) == 0  # a process that ended: nothing to push, no error


def test_a_noted_criu_pid_is_killed_only_while_it_is_still_criu() -> None:
    """The guardian's ``criu PID`` note outlives the CRIU: its pid may run anything now."""

    criu = subprocess.Popen(["bash", "-c", "exec -a criu sleep 60"])
    other = subprocess.Popen(["sleep", "60"])
    try:
        deadline = time.monotonic() + 10
        while _proc.argv(criu.pid)[:1] != [b"criu"]:  # (until bash has exec'ed)
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert still_serving(criu.pid)
        assert not still_serving(other.pid)  # (a recycled pid)
        assert not still_serving(2**22 + 7)  # (gone)
    finally:
        for proc in (criu, other):
            proc.kill()
            proc.wait()
