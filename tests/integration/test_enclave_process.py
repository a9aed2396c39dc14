"""The enclave process, for real: started by the platform service, reached only by ECALLs.

One platform service (a child process) serves the whole module; every enclave a
test launches is destroyed at teardown, and the service stops at the end.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from platform_fixtures import (
    PROBE_SOURCE,
    World,
    ancestors,
    children_of,
    make_image,
    pid_alive,
    shared_world,
    wait_until,
    write_image,
)

from migsgx.channel import ECALL, ECALL_FRAME_MAX, IMAGE_FRAME_MAX
from migsgx.errors import (
    ConnectionClosedError,
    EnclaveError,
    EnclaveLostError,
    MigSGXError,
    OutOfThreadSlotsError,
    UnknownEcallError,
)
from migsgx.host.client import EnclaveClient
from migsgx.lab.hosts import ServiceProcess
from migsgx.sgx.image import EnclaveImage
from migsgx.wire import HEADER, encode, recv_frame, send_frame

pytestmark = pytest.mark.integration

SECRET = "canary-7f3a-must-not-leave-the-enclave"


@pytest.fixture(scope="session")
def world() -> World:
    return shared_world()


@pytest.fixture(scope="module")
def probe(world: World) -> EnclaveImage:
    return make_image(world.author)


@pytest.fixture(scope="module")
def shared(service: ServiceProcess, probe: EnclaveImage) -> Iterator[EnclaveClient]:
    """One enclave for the tests that need no enclave of their own."""

    client = EnclaveClient.launch(probe, socket_path=service.socket)
    yield client
    client.destroy()


Launcher = Callable[..., EnclaveClient]


@pytest.fixture
def launch(service: ServiceProcess, probe: EnclaveImage) -> Iterator[Launcher]:
    clients: list[EnclaveClient] = []

    def start(image: EnclaveImage | None = None, **ocalls: Callable[..., Any]) -> EnclaveClient:
        client = EnclaveClient.launch(image or probe, socket_path=service.socket, ocalls=ocalls)
        clients.append(client)
        return client

    yield start
    for client in clients:
        client.destroy()
    for client in clients:
        assert wait_until(lambda c=client: not pid_alive(c.info.pid), timeout=10)


def _raw_launch(
    service: ServiceProcess, image: EnclaveImage
) -> tuple[socket.socket, dict[str, Any]]:
    """Launch like the untrusted runtime does, keeping the raw ECALL socket."""

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(20)
    sock.connect(str(service.socket))
    send_frame(sock, {"t": "launch", "files": dict(image.files)}, max_size=IMAGE_FRAME_MAX)
    ready = recv_frame(sock, ECALL, max_size=ECALL_FRAME_MAX)
    assert ready["t"] == "ready"
    return sock, ready


def _enclave_logs(world: World) -> bytes:
    logs = world.host_a.state_dir / "logs"
    return b"".join(p.read_bytes() for p in logs.glob("*.log"))


# --- where the enclave runs ------------------------------------------------------------
_APP = textwrap.dedent(
    """
    import sys, time
    from migsgx.host.client import EnclaveClient
    client = EnclaveClient.launch(sys.argv[1], socket_path=sys.argv[2])
    client.ecall.store(b"secret in the application's enclave")
    print(client.info.pid, flush=True)
    time.sleep(120)
    """
)


@pytest.fixture
def application(
    tmp_path: Path, service: ServiceProcess, probe: EnclaveImage
) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """An application process (not the service's parent) that launched an enclave:
    ``(application, enclave pid)``."""

    image_dir = write_image(tmp_path / "img", probe)
    app = subprocess.Popen(
        [sys.executable, "-c", _APP, str(image_dir), str(service.socket)],
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        assert app.stdout is not None
        yield app, int(app.stdout.readline())
    finally:
        if app.poll() is None:
            app.kill()
            app.wait()
        if app.stdout is not None:
            app.stdout.close()


def test_enclave_is_not_a_descendant_of_the_application(
    application: tuple[subprocess.Popen[bytes], int], service: ServiceProcess
) -> None:
    app, pid = application
    chain = ancestors(pid)
    assert app.pid not in chain
    assert chain[0] == service.process.pid
    assert pid not in children_of(app.pid)


def test_enclave_exits_when_its_application_dies(
    application: tuple[subprocess.Popen[bytes], int],
) -> None:
    app, pid = application
    assert pid_alive(pid)
    app.send_signal(signal.SIGKILL)
    app.wait(10)
    assert wait_until(lambda: not pid_alive(pid), timeout=10)


def test_enclave_reports_its_identity(
    launch: Launcher, service: ServiceProcess, probe: EnclaveImage, world: World
) -> None:
    client = launch()
    assert client.ecall.whoami() == {"pid": client.info.pid, "ppid": service.process.pid}
    identity = world.host_a.einit(probe)[0]
    assert (client.info.mr_enclave, client.info.mr_signer) == (
        identity.mr_enclave,
        identity.mr_signer,
    )
    assert (client.info.isv_prod_id, client.info.isv_svn) == (7, 1)
    assert client.info.thread_slots == 4 and not client.info.debug
    assert "echo" in client.info.ecalls


def test_destroy_ends_the_enclave_process(launch: Launcher) -> None:
    client = launch()
    client.ecall.store(SECRET.encode())
    pid = client.info.pid
    client.destroy()
    assert wait_until(lambda: not pid_alive(pid), timeout=10)
    with pytest.raises(EnclaveLostError):
        client.ecall.echo(1)


# --- ECALLs ---------------------------------------------------------------------------------
def test_thread_slots_are_enforced_and_given_back(launch: Launcher, world: World) -> None:
    entered = threading.Semaphore(0)
    release = threading.Event()

    def gate(tag: int) -> int:
        entered.release()
        assert release.wait(20)
        return tag

    client = launch(make_image(world.author, name="two-slots", thread_slots=2), gate=gate)
    assert client.info.thread_slots == 2
    results: list[Any] = []
    holders = [
        threading.Thread(target=lambda i=i: results.append(client.ecall.gate(i))) for i in (1, 2)
    ]
    try:
        for t in holders:
            t.start()
        for _ in holders:
            assert entered.acquire(timeout=20)
        with pytest.raises(OutOfThreadSlotsError):
            client.ecall.echo("third caller")
    finally:
        release.set()
        for t in holders:
            t.join(20)
    assert sorted(results) == [1, 2]
    assert client.ecall.echo("after") == "after"
    assert [client.ecall.add(i, 1) for i in range(5)] == [1, 2, 3, 4, 5]


def test_unknown_ecall(shared: EnclaveClient) -> None:
    client = shared
    with pytest.raises(UnknownEcallError):
        client.call("no_such_ecall")
    with pytest.raises(UnknownEcallError):
        client.call("export_state")  # a method, but not an ECALL
    assert client.ecall.echo(1) == 1


def test_enclave_exceptions_keep_their_secrets(shared: EnclaveClient, world: World) -> None:
    client = shared
    with pytest.raises(EnclaveError) as err:
        client.ecall.fail(SECRET)
    assert type(err.value) is EnclaveError
    assert SECRET not in str(err.value)
    assert "ValueError" in str(err.value)
    assert SECRET.encode() not in _enclave_logs(world)
    assert client.ecall.echo("still serving") == "still serving"


def test_constructor_failure_is_typed_and_leaves_no_process(
    service: ServiceProcess, world: World
) -> None:
    source = PROBE_SOURCE.replace(
        "        self.cells = ", f"        raise RuntimeError({SECRET!r})\n        self.cells = "
    )
    image = make_image(world.author, name="broken", source=source)
    before = set(children_of(service.process.pid))
    with pytest.raises(EnclaveError) as err:
        EnclaveClient.launch(image, socket_path=service.socket)
    assert not isinstance(err.value, EnclaveLostError)
    assert SECRET not in str(err.value)
    assert wait_until(lambda: set(children_of(service.process.pid)) <= before, timeout=10)
    assert SECRET.encode() not in _enclave_logs(world)


def test_ocall_roundtrip(launch: Launcher) -> None:
    seen: list[Any] = []

    def echo(value: Any) -> Any:
        seen.append(value)
        return value

    client = launch(echo=echo)
    for value in (None, True, 7, "text", b"\x00bytes", [1, [2]], {"k": b"v"}):
        assert client.ecall.ocall_echo(value) == value
    assert seen[-1] == {"k": b"v"}


def test_ocall_failures_reach_the_caller(launch: Launcher) -> None:
    def broken(value: Any) -> Any:
        raise ValueError("handler failed")

    client = launch(echo=broken)
    with pytest.raises(MigSGXError):
        client.ecall.ocall_echo(1)
    with pytest.raises(MigSGXError):
        client.ecall.gate(1)  # no handler registered for it
    assert client.ecall.echo(2) == 2


def test_many_threads_get_the_right_answers(shared: EnclaveClient) -> None:
    client = shared
    errors: list[BaseException] = []

    def worker(k: int) -> None:
        try:
            for i in range(60):
                assert client.ecall.add(k * 1000, i) == k * 1000 + i
                assert client.ecall.echo([k, i]) == [k, i]
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors[0]


def test_booleans_and_large_values_cross(shared: EnclaveClient) -> None:
    client = shared
    assert client.ecall.echo(True) is True
    assert client.ecall.echo({"ok": False}) == {"ok": False}
    big = os.urandom(4 << 20)
    assert client.ecall.echo(big) == big


# --- a hostile application on the ECALL socket -------------------------------------------
def _expect_frame_error_then_eof(sock: socket.socket) -> None:
    reply = recv_frame(sock, ECALL, max_size=ECALL_FRAME_MAX)
    assert reply["t"] == "err" and reply["code"] in ("frame", "protocol")
    with pytest.raises(ConnectionClosedError):
        recv_frame(sock, ECALL)


@pytest.mark.parametrize(
    "garbage",
    [
        HEADER.pack(6) + b"\xff\x00\xfe\x01\x02\x03",  # not CBOR
        HEADER.pack(0xFFFFFFFF),  # oversize: refused before any body arrives
        encode({"t": "ecall", "id": 1, "fn": "echo", "args": [1], "smuggled": 1}),
        encode({"t": "ecall", "id": True, "fn": "echo", "args": [1]}),
        encode({"t": "no-such-type"}),
    ],
    ids=["garbled", "oversize", "extra-field", "bool-id", "unknown-type"],
)
def test_garbage_on_the_ecall_socket(
    garbage: bytes, shared: EnclaveClient, service: ServiceProcess, probe: EnclaveImage
) -> None:
    bystander = shared
    sock, ready = _raw_launch(service, probe)
    with sock:
        send_frame(sock, {"t": "ecall", "id": 1, "fn": "add", "args": [1, 2]})
        assert recv_frame(sock, ECALL) == {"t": "ret", "id": 1, "value": 3}
        sock.sendall(garbage)
        _expect_frame_error_then_eof(sock)
    assert wait_until(lambda: not pid_alive(ready["pid"]), timeout=10)
    assert bystander.ecall.echo("unaffected") == "unaffected"


def test_truncated_frame_on_the_ecall_socket(
    launch: Launcher, service: ServiceProcess, probe: EnclaveImage
) -> None:
    sock, ready = _raw_launch(service, probe)
    with sock:
        frame = encode({"t": "ecall", "id": 1, "fn": "echo", "args": [b"x" * 100]})
        sock.sendall(frame[: len(frame) // 2])
        sock.shutdown(socket.SHUT_WR)
        _expect_frame_error_then_eof(sock)
    assert wait_until(lambda: not pid_alive(ready["pid"]), timeout=10)
    # The platform service goes on launching enclaves.
    assert launch().ecall.echo(1) == 1


def test_unexpected_but_valid_frame_ends_the_session(
    service: ServiceProcess, probe: EnclaveImage
) -> None:
    sock, ready = _raw_launch(service, probe)
    with sock:
        send_frame(sock, {"t": "ret", "id": 1, "value": None})  # only the enclave sends these
        with contextlib.suppress(ConnectionClosedError, OSError):
            while True:
                recv_frame(sock, ECALL)
    assert wait_until(lambda: not pid_alive(ready["pid"]), timeout=10)


def test_stray_ocall_reply_is_ignored(
    launch: Launcher, service: ServiceProcess, probe: EnclaveImage
) -> None:
    sock, _ = _raw_launch(service, probe)
    with sock:
        send_frame(
            sock, {"t": "oret", "id": 99, "ok": True, "value": 1, "code": None, "message": None}
        )
        send_frame(sock, {"t": "ecall", "id": 2, "fn": "echo", "args": ["ok"]})
        assert recv_frame(sock, ECALL) == {"t": "ret", "id": 2, "value": "ok"}
        send_frame(sock, {"t": "destroy"})


# --- results that cannot cross, and known bugs -------------------------------------------
@pytest.mark.parametrize(("fn", "args"), [("big_result", (17 << 20,)), ("unencodable", ())])
def test_unsendable_result_is_reported(
    shared: EnclaveClient, fn: str, args: tuple[Any, ...]
) -> None:
    with pytest.raises(EnclaveError) as err:
        shared.call(fn, *args, timeout=1.5)
    assert not isinstance(err.value, EnclaveLostError), "no answer: the caller hung"


needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="the platform isolates enclave processes only when run as root"
)


@needs_root
def test_enclave_code_cannot_reach_the_platform_secrets(
    shared: EnclaveClient, world: World
) -> None:
    """Enclave code is arbitrary code in a process of the service's user: the state
    directory (root secret, PCK and attestation keys) must be out of its reach."""

    client = shared
    # The service's command line (and so where its state is) is hidden too now.
    with pytest.raises(EnclaveError, match=r"PermissionError|FileNotFoundError"):
        client.ecall.service_state_dir()
    state = str(world.host_a.state_dir)
    service_pid = client.ecall.whoami()["ppid"]
    assert client.ecall.capabilities()["CapEff"] == "0" * 16
    for path in (
        f"{state}/root.key",
        f"{state}/attestation-key.pem",
        f"/proc/{service_pid}/root{state}/root.key",
        f"/proc/{service_pid}/mem",
        f"/proc/{service_pid}/environ",
    ):
        with pytest.raises(EnclaveError, match=r"PermissionError|FileNotFoundError"):
            client.ecall.read_file(path)
    assert client.ecall.unmount(state) != "unmounted"
    with pytest.raises(EnclaveError, match=r"PermissionError|FileNotFoundError"):
        client.ecall.read_file(f"{state}/root.key")


@needs_root
def test_an_enclave_cannot_read_another_enclaves_memory(launch: Launcher) -> None:
    victim, attacker = launch(), launch()
    victim.ecall.store(SECRET.encode())
    try:
        found = attacker.ecall.peek(victim.info.pid, SECRET.encode())
    except EnclaveError as exc:
        # Another uid, not dumpable, and invisible in the sandbox's /proc.
        assert "PermissionError" in str(exc) or "FileNotFoundError" in str(exc)
    else:
        assert not found, "the attacker enclave read the victim's secret"


# --- holding its own connection across an abort --------------------------------------------
def test_an_aborted_enclave_keeps_its_duplicate_until_the_application_has_it_back(
    launch: Launcher,
) -> None:
    """``__mig_hold``, then ``__mig_abort``, then every driver end closed: the enclave
    keeps its state (its duplicate is no end of file) until the application has the
    connection back; ``resume`` has it let the duplicate go (``__mig_unhold``).

    Before, the abort let the duplicate go at once, and a driver (guardian,
    ``migsgx recover``) killed before the hand-back ended the enclave with the
    only copy of the state (``docs/spec/commit.md``, section 5).
    """

    from migsgx.agent.applink import AppLink
    from migsgx.agent.ckpt_journal import start_time
    from migsgx.agent.handback import call_enclave
    from migsgx.agent.holders import take_held
    from migsgx.datapath.enclave_link import EnclaveLink
    from migsgx.host.appctl import MigrationControl

    if os.geteuid() != 0:
        pytest.skip("pidfd_getfd needs root")
    client = launch()
    client.ecall.store(SECRET.encode())
    control = MigrationControl([client]).start()
    try:
        link = AppLink(os.getpid(), control.name)
        (handed,) = link.prepare()
        pid = client.info.pid
        holder = [pid, EnclaveLink(handed.sock).hold(), start_time(pid)]
        answer = call_enclave(handed.sock, "__mig_abort", ["the tool died"])
        assert answer is not None and answer["t"] == "ret", answer
        handed.sock.close()  # the driver dies: no end of file, the enclave kept its duplicate
        (taken,) = take_held([holder]).values()
        with taken:
            status = call_enclave(taken, "__mig_status", [])
            assert status is not None and status["t"] == "ret", status
            link.resume([taken])  # the application takes it back, the enclave lets go
        assert client.ecall.load(len(SECRET)) == SECRET.encode()
        assert take_held([holder]) == {}  # the duplicate is gone: the next EOF ends it
    finally:
        control.close()


_FORKING_APP = textwrap.dedent(
    """
    import os, socket, sys, time
    from pathlib import Path
    from migsgx.channel import ECALL, ECALL_FRAME_MAX
    from migsgx.host.appctl import MigrationControl
    from migsgx.host.client import EnclaveClient
    from migsgx.wire import recv_frame, send_frame
    image, platform, go, secret = sys.argv[1:5]
    client = EnclaveClient.launch(image, socket_path=platform)
    client.ecall.store(secret.encode())
    fd = client._sock.fileno()  # (the child uses the connection as it inherited it)
    control = MigrationControl([client]).start()
    # Read before the fork: a child first scheduled after its parent died (a loaded
    # machine) would read its new parent's pid from getppid() and wait for good.
    parent = os.getpid()
    child = os.fork()
    if child == 0:
        while os.getppid() == parent or not Path(go).exists():
            time.sleep(0.05)  # the parent exited, and the test says go
        sock = socket.socket(fileno=fd)
        send_frame(sock, {"t": "ecall", "id": 7, "fn": "load", "args": [len(secret)]},
                   max_size=ECALL_FRAME_MAX)
        while (msg := recv_frame(sock, ECALL, max_size=ECALL_FRAME_MAX))["id"] != 7:
            pass
        Path(go + ".answer").write_bytes(msg["value"] if msg["t"] == "ret" else b"ERR")
        time.sleep(120)
        os._exit(0)
    print(os.getpid(), child, client.info.pid, control.name, flush=True)
    time.sleep(120)
    """
)


def test_an_aborted_enclave_keeps_its_duplicate_while_a_forked_child_holds_it(
    service: ServiceProcess, probe: EnclaveImage, world: World, tmp_path: Path
) -> None:
    """An application forks a child that keeps its enclave connection and uses it after
    the parent exited; the parent is the one that answers ``prepare``.

    The tool holds the connection, gives the enclave its duplicate
    (``__mig_hold``), asks the abort and dies; then the parent dies before its
    ``__mig_unhold``.  Before, the enclave's watch named the parent only and let
    the duplicate go with it, though the child still held and used the
    connection.  Now the tool names every process of the application's tree that
    holds the connection: the duplicate stays while the child lives, the child
    finds the state intact, and the duplicate goes (and the enclave ends) only
    with the last holder.
    """

    from migsgx.agent.applink import AppLink
    from migsgx.agent.ckpt_journal import start_time
    from migsgx.agent.handback import call_enclave
    from migsgx.agent.holders import take_held
    from migsgx.datapath.enclave_link import EnclaveLink

    if os.geteuid() != 0:
        pytest.skip("pidfd_getfd needs root")
    ended = b"a process of the application ended after the abort"
    let_go = b"the application ended after the abort: its duplicate is let go"
    before = {line: _enclave_logs(world).count(line) for line in (ended, let_go)}

    def seen(line: bytes) -> bool:
        return _enclave_logs(world).count(line) > before[line]

    image_dir = write_image(tmp_path / "img", probe)
    go = tmp_path / "go"
    app = subprocess.Popen(
        [sys.executable, "-c", _FORKING_APP, str(image_dir), str(service.socket), str(go), SECRET],
        stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    child = 0
    try:
        assert app.stdout is not None
        parent, child, enclave, name = app.stdout.readline().decode().split()
        child, enclave = int(child), int(enclave)
        (handed,) = AppLink(int(parent), name).prepare()
        nonce = os.urandom(16)
        holder = [enclave, EnclaveLink(handed.sock).hold(int(parent), nonce),
                  start_time(enclave), nonce.hex()]  # fmt: skip
        answer = call_enclave(handed.sock, "__mig_abort", ["the tool died"])
        assert answer is not None and answer["t"] == "ret", answer
        handed.sock.close()  # the tool dies
        app.kill()  # the parent dies before its __mig_unhold
        app.wait()
        # (the enclave's watch sees the parent's exit; counted: the host's log is shared)
        assert wait_until(lambda: seen(ended) or seen(let_go), 30)
        assert not seen(let_go)
        taken = take_held([holder])  # the enclave still holds its duplicate
        assert list(taken) == [0]
        taken[0].close()
        go.touch()
        answered = tmp_path / "go.answer"
        assert wait_until(answered.exists, 30), "the child never called its enclave"
        assert answered.read_bytes() == SECRET.encode()  # the child's state is intact
        os.kill(child, signal.SIGKILL)  # the last holder ends: the duplicate goes, and the enclave
        assert wait_until(lambda: seen(let_go), 30), "the duplicate stayed"
        assert wait_until(lambda: not pid_alive(enclave), 30), "the enclave outlived its holders"
    finally:
        if app.poll() is None:
            app.kill()
            app.wait()
        if child:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)
        if app.stdout is not None:
            app.stdout.close()
