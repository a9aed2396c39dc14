"""Who holds a source enclave's connection after an abort: the processes that really do.

The enclave is told at the hold which processes of the application hold its
connection, and after an abort lets its duplicate go once the last of them
exited.  The application may fork after the hold, and a process named then may
close the connection and live on.  Before the driver continues the given-back
tree it re-reads who holds the connection (root: ``/proc`` and ``sock_diag``)
and tells the enclave (``__mig_watch``); the enclave follows that set.

Real platform service, real enclave process, real application forking real
children; the driver's steps (prepare, hold, abort, re-read, resume) are the
tool's own calls, in the tool's order.  The moments of the forks and closes are
the test's (files the application waits for), the old runtime the application
fault point ``app.resume-taken:no-unhold``; no sleep decides anything.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from platform_fixtures import (
    World,
    make_image,
    pid_alive,
    shared_world,
    wait_until,
    write_image,
)

from migsgx.lab.hosts import ServiceProcess
from migsgx.sgx.image import EnclaveImage

pytestmark = pytest.mark.integration

SECRET = "canary-51c2-forked-after-the-hold"

#: The application ``P``: one enclave, holding a secret; a child ``C1`` forked before
#: the migration holds the connection too (named with the hold).  Once the test says
#: ``go``, C1 either forks ``C2`` (which keeps the connection) and exits (``fork``), or
#: closes its copy and lives on without it (``close``).  C2 calls the enclave once the
#: test says ``use``.
_APP = textwrap.dedent(
    """
    import os, socket, sys, time
    from pathlib import Path
    from migsgx.channel import ECALL, ECALL_FRAME_MAX
    from migsgx.host.appctl import MigrationControl
    from migsgx.host.client import EnclaveClient
    from migsgx.wire import recv_frame, send_frame
    image, platform, work, secret, mode = sys.argv[1:6]
    work = Path(work)
    client = EnclaveClient.launch(image, socket_path=platform)
    client.ecall.store(secret.encode())
    fd = client._sock.fileno()  # (the children use the connection as they inherited it)
    control = MigrationControl([client]).start()

    def wait_for(name):
        while not (work / name).exists():
            time.sleep(0.02)

    def say(name, text=""):
        (work / (name + ".tmp")).write_text(text)
        os.rename(work / (name + ".tmp"), work / name)

    child = os.fork()
    if child == 0:
        wait_for("go")
        if mode == "fork":
            if os.fork() == 0:
                say("c2", str(os.getpid()))
                wait_for("use")
                sock = socket.socket(fileno=fd)
                send_frame(sock, {"t": "ecall", "id": 7, "fn": "load", "args": [len(secret)]},
                           max_size=ECALL_FRAME_MAX)
                while (msg := recv_frame(sock, ECALL, max_size=ECALL_FRAME_MAX))["id"] != 7:
                    pass
                say("answer", msg["value"].decode() if msg["t"] == "ret" else "ERR")
                time.sleep(300)
            os._exit(0)
        os.close(fd)
        say("closed")
        time.sleep(300)
        os._exit(0)
    print(os.getpid(), child, client.info.pid, control.name, flush=True)
    time.sleep(300)
    """
)


@pytest.fixture(scope="session")
def world() -> World:
    return shared_world()


@pytest.fixture(scope="module")
def probe(world: World) -> EnclaveImage:
    return make_image(world.author)


@dataclass
class Forking:
    """The running application: its pids, its enclave's, and where it talks."""

    app: subprocess.Popen[bytes]
    parent: int
    child: int
    enclave: int
    name: str
    work: Path

    def pids(self) -> list[int]:
        c2 = self.work / "c2"
        return [self.parent, self.child] + ([int(c2.read_text())] if c2.exists() else [])


@pytest.fixture
def forking(
    request: pytest.FixtureRequest, service: ServiceProcess, probe: EnclaveImage, tmp_path: Path
) -> Iterator[Forking]:
    mode, env = request.param
    yield from run_forking(mode, env, service, probe, tmp_path)


def run_forking(
    mode: str, env: dict[str, str], service: ServiceProcess, probe: EnclaveImage, tmp_path: Path
) -> Iterator[Forking]:
    """The application (P, C1 forked before the hold) in ``mode``, until the test ends;
    then every process of it killed and its enclave gone."""

    if os.geteuid() != 0:
        pytest.skip("pidfd_getfd and the scan of every process need root")
    image_dir = write_image(tmp_path / "img", probe)
    work = tmp_path / "work"
    work.mkdir()
    app = subprocess.Popen(
        [sys.executable, "-c", _APP, str(image_dir), str(service.socket), str(work), SECRET, mode],
        stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, start_new_session=True,
        env={**os.environ, **env},
    )  # fmt: skip
    running = None
    try:
        assert app.stdout is not None
        parent, child, enclave, name = app.stdout.readline().decode().split()
        running = Forking(app, int(parent), int(child), int(enclave), name, work)
        yield running
    finally:
        for pid in running.pids() if running else []:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if app.poll() is None:
            app.kill()
        app.wait()
        if app.stdout is not None:
            app.stdout.close()
        if running is not None:
            assert wait_until(lambda: not pid_alive(running.enclave), 30), "enclave left behind"


def _enclave_logs(world: World) -> bytes:
    logs = world.host_a.state_dir / "logs"
    return b"".join(p.read_bytes() for p in logs.glob("*.log"))


@pytest.mark.parametrize("forking", [("fork", {})], indirect=True)
def test_a_child_forked_after_the_hold_keeps_the_enclave_after_its_parent_exits(
    forking: Forking, world: World
) -> None:
    """C1 (named with the hold) forks C2 after the hold and exits; the parent dies
    before its ``__mig_unhold``.  The driver re-read the holders before continuing
    the tree, so the enclave keeps its duplicate while C2 lives, C2 finds the state
    intact, and the duplicate goes, and the enclave ends, with C2.

    Before, the enclave watched only the processes named with the hold (P and C1):
    both gone, it let its duplicate go while C2 still used the connection.
    """

    from migsgx.agent.applink import AppLink
    from migsgx.agent.ckpt_journal import start_time
    from migsgx.agent.handback import call_enclave
    from migsgx.agent.holders import take_held, watch_holders
    from migsgx.datapath.enclave_link import EnclaveLink

    ended = b"a process of the application ended after the abort"
    let_go = b"the application ended after the abort: its duplicate is let go"
    before = {line: _enclave_logs(world).count(line) for line in (ended, let_go)}

    def seen(line: bytes) -> bool:
        return _enclave_logs(world).count(line) > before[line]

    app, work = forking, forking.work
    (handed,) = AppLink(app.parent, app.name).prepare()
    nonce = os.urandom(16)
    holder = [app.enclave, EnclaveLink(handed.sock).hold(app.parent, nonce),
              start_time(app.enclave), nonce.hex()]  # fmt: skip
    (work / "go").touch()  # after the hold: C1 forks C2 and exits
    assert wait_until(lambda: (work / "c2").exists() and not pid_alive(app.child), 30)
    c2 = int((work / "c2").read_text())
    for pid in (app.parent, c2):
        os.kill(pid, signal.SIGSTOP)  # the fence
    answer = call_enclave(handed.sock, "__mig_abort", ["the migration failed"])
    assert answer is not None and answer["t"] == "ret", answer
    assert watch_holders([handed.sock], [holder], app.parent) == [0]
    for pid in (app.parent, c2):
        os.kill(pid, signal.SIGCONT)
    os.kill(app.parent, signal.SIGKILL)  # the parent dies before its hand-back
    app.app.wait()
    handed.sock.close()  # and the tool: nobody hands the connection back
    assert wait_until(lambda: seen(ended) or seen(let_go), 30)
    assert not seen(let_go), "the duplicate went with the processes named at the hold"
    taken = take_held([holder])
    assert list(taken) == [0]  # the enclave still holds its duplicate
    taken[0].close()
    (work / "use").touch()
    assert wait_until((work / "answer").exists, 30), "C2 never called its enclave"
    assert (work / "answer").read_text() == SECRET  # the state is intact
    os.kill(c2, signal.SIGKILL)  # the last real holder ends: the duplicate goes, then the enclave
    assert wait_until(lambda: seen(let_go), 30), "the duplicate stayed"
    assert wait_until(lambda: not pid_alive(app.enclave), 30), "the enclave outlived C2"


@pytest.mark.parametrize(
    "forking", [("close", {"MIGSGX_FAULT": "app.resume-taken:no-unhold"})], indirect=True
)
def test_a_named_process_that_closed_the_connection_does_not_keep_the_enclave(
    forking: Forking,
) -> None:
    """The reverse: C1 (named with the hold) closes its copy of the connection after
    the hold and lives on.  The application, a runtime without ``__mig_unhold``
    (``app.resume-taken:no-unhold``), takes its connection back, keeps working,
    and is killed.  The driver's re-read named P alone, so the duplicate goes with
    P and the enclave ends with its last real holder, as a crash of the application
    would end it.

    Before, C1 stayed named: alive, it kept the duplicate, and the enclave, for good,
    outliving every process that could ever use it.
    """

    from migsgx.agent.applink import AppLink
    from migsgx.agent.ckpt_journal import start_time
    from migsgx.agent.handback import call_enclave
    from migsgx.agent.holders import watch_holders
    from migsgx.datapath.enclave_link import EnclaveLink

    app, work = forking, forking.work
    link = AppLink(app.parent, app.name)
    (handed,) = link.prepare()
    nonce = os.urandom(16)
    holder = [app.enclave, EnclaveLink(handed.sock).hold(app.parent, nonce),
              start_time(app.enclave), nonce.hex()]  # fmt: skip
    (work / "go").touch()  # after the hold: C1 closes the connection and lives on
    assert wait_until((work / "closed").exists, 30)
    os.kill(app.parent, signal.SIGSTOP)  # the fence
    answer = call_enclave(handed.sock, "__mig_abort", ["the migration failed"])
    assert answer is not None and answer["t"] == "ret", answer
    assert watch_holders([handed.sock], [holder], app.parent) == [0]
    os.kill(app.parent, signal.SIGCONT)
    link.resume([handed.sock])  # back with the application, which never says __mig_unhold
    handed.sock.close()
    assert link.status()["handed_over"] is False
    assert pid_alive(app.enclave)  # the state lives with its application
    os.kill(app.parent, signal.SIGKILL)
    app.app.wait()
    assert pid_alive(app.child)  # C1 lives on, without the connection
    assert wait_until(lambda: not pid_alive(app.enclave), 30), "the enclave outlived its holders"


@pytest.mark.parametrize(
    "forking", [("close", {"MIGSGX_FAULT": "app.resume-taken:no-unhold"})], indirect=True
)
def test_the_checkpoint_tool_rereads_the_holders_before_it_gives_the_tree_back(
    forking: Forking, tmp_path: Path
) -> None:
    """The same, driven by the real ``migsgx checkpoint``: it holds each enclave
    connection, waits at ``ckpt.before-dump`` while C1 closes its copy, then fails
    there (``wait-file-then-fail``) and rolls back: its re-read before it continues
    the tree names P alone, so the enclave ends once P is killed (before: C1, alive
    without the connection, kept it for good)."""

    app, work = forking, forking.work
    go = work / "tool-go"
    tool = subprocess.Popen(
        [sys.executable, "-m", "migsgx", "checkpoint", str(app.parent), "--dir",
         str(tmp_path / "ck")],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
        env={**os.environ, "MIGSGX_FAULT": f"ckpt.before-dump:wait-file-then-fail={go}"},
    )  # fmt: skip
    try:
        assert tool.stderr is not None
        for line in tool.stderr:  # its holds made, the tool waits there
            if line.startswith("migsgx fault: ckpt.before-dump:"):
                break
        else:
            pytest.fail("the checkpoint tool ended before its fault point")
        (work / "go").touch()
        assert wait_until((work / "closed").exists, 30)
        go.touch()
        _, rest = tool.communicate(timeout=120)
    finally:
        if tool.poll() is None:
            tool.kill()
            tool.wait()
    assert tool.returncode == 6, rest  # the source runs on
    assert "Traceback" not in rest
    assert pid_alive(app.enclave)  # back with its application, which keeps it
    os.kill(app.parent, signal.SIGKILL)
    app.app.wait()
    assert pid_alive(app.child)  # C1 lives on, without the connection
    assert wait_until(lambda: not pid_alive(app.enclave), 30), "the enclave outlived its holders"
