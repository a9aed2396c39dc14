"""The platform socket across restarts of its service (issue 9): a killed service's
socket is kept by its keeper, the same inode, and the restarted service takes it
back with the connections that queued meanwhile; a service that ended (SIGTERM)
leaves no socket and nothing that holds one; one service per socket.

Each test makes its own host; the services run as processes, without namespaces.
"""

from __future__ import annotations

import shutil
import socket
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from platform_fixtures import World, make_image, shared_world, wait_until

from migsgx.agent.faults import socket_owner
from migsgx.channel import ECALL, ECALL_FRAME_MAX, IMAGE_FRAME_MAX
from migsgx.errors import ConfigError, MigSGXError
from migsgx.host.client import EnclaveClient
from migsgx.lab.hosts import ServiceProcess, start_service
from migsgx.sgx.image import EnclaveImage, mr_signer_of
from migsgx.sgx.keepers import keepers_of as _keepers_of
from migsgx.sgx.listener import socket_tag
from migsgx.sgx.platform import EmulatedPlatform
from migsgx.wire import recv_frame, send_frame

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


@pytest.fixture(scope="session")
def world() -> World:
    return shared_world()


@pytest.fixture
def host(world: World, tmp_path: Path) -> tuple[Path, Path]:
    state = tmp_path / "host"
    EmulatedPlatform.init(
        state, world.ca, host_id="sockkeep", allowed_signers=[mr_signer_of(world.author)]
    )
    return state, tmp_path / "run" / "enclave.sock"


@pytest.fixture(scope="module")
def image(world: World) -> EnclaveImage:
    return make_image(world.author)


def keepers(state: Path, sock: Path) -> list[int]:
    return [pid for pid, _ in _keepers_of(socket_tag(state, sock))]


def killed(service: ServiceProcess) -> None:
    service.process.kill()
    service.process.wait()


def queue_launch(sock: Path, image: EnclaveImage) -> socket.socket:
    """A launch request sent while no service runs (as from a container, which cannot
    see who listens): the connection queues on the kept socket."""

    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.connect(str(sock))
    send_frame(conn, {"t": "launch", "files": dict(image.files)}, max_size=IMAGE_FRAME_MAX)
    conn.settimeout(60)
    return conn


def test_a_killed_service_s_socket_is_kept_and_taken_back(
    host: tuple[Path, Path], image: EnclaveImage
) -> None:
    state, sock = host
    service = start_service(state, socket_path=sock)
    try:
        kept = sock.stat()
        assert stat.S_IMODE(kept.st_mode) == 0o600
        assert len(keepers(state, sock)) == 1
        killed(service)
        assert sock.stat().st_ino == kept.st_ino and len(keepers(state, sock)) == 1
        # On this host a launch is refused at once: the service that listened is gone.
        with pytest.raises(ConfigError, match="no platform service runs"):
            EnclaveClient.launch(image, socket_path=sock)
        queued = queue_launch(sock, image)

        service = start_service(state, socket_path=sock)
        assert "(the socket kept from the service before)" in (state / "service.log").read_text()
        after = sock.stat()
        assert (after.st_ino, after.st_mode, after.st_uid) == (
            kept.st_ino, kept.st_mode, kept.st_uid)  # fmt: skip
        assert socket_owner(sock) == service.process.pid  # it listens now, not the dead one
        # The launch that queued while none ran is served by the restarted service.
        assert recv_frame(queued, ECALL, max_size=ECALL_FRAME_MAX)["t"] == "ready"
        queued.close()
        with EnclaveClient.launch(image, socket_path=sock) as client:
            assert client.ecall.echo(7) == 7
        assert len(keepers(state, sock)) == 1
        # Twice: the keeper's fresh reserve channel serves the next restart too.
        killed(service)
        service = start_service(state, socket_path=sock)
        assert sock.stat().st_ino == kept.st_ino
        with EnclaveClient.launch(image, socket_path=sock) as client:
            assert client.ecall.echo(8) == 8
    finally:
        service.stop()
    # SIGTERM: the service ended for good; its socket is removed and nothing holds it.
    assert not sock.exists()
    assert wait_until(lambda: keepers(state, sock) == [], timeout=30)
    service = start_service(state, socket_path=sock)  # a fresh socket
    try:
        with EnclaveClient.launch(image, socket_path=sock) as client:
            assert client.ecall.echo(9) == 9
    finally:
        service.stop()


def test_services_racing_for_one_socket_are_refused_but_one(
    host: tuple[Path, Path], image: EnclaveImage
) -> None:
    """Two services started at once for one state directory and socket, after the one
    before was killed: one takes the kept socket, the other is refused."""

    state, sock = host
    first = start_service(state, socket_path=sock)
    try:
        with pytest.raises(MigSGXError, match="exited"):
            start_service(state, socket_path=sock)
        assert "another platform service serves" in (state / "service.log").read_text()
        assert socket_owner(sock) == first.process.pid
    finally:
        killed(first)
    kept = sock.stat().st_ino
    started: list[ServiceProcess] = []
    refused: list[MigSGXError] = []

    def start() -> None:
        try:
            started.append(start_service(state, socket_path=sock))
        except MigSGXError as exc:
            refused.append(exc)

    racers = [threading.Thread(target=start) for _ in range(2)]
    for racer in racers:
        racer.start()
    for racer in racers:
        racer.join()
    try:
        assert (len(started), len(refused)) == (1, 1), refused
        assert sock.stat().st_ino == kept
        assert socket_owner(sock) == started[0].process.pid
        with EnclaveClient.launch(image, socket_path=sock) as client:
            assert client.ecall.echo(1) == 1
    finally:
        for service in started:
            service.stop()


def test_a_kept_socket_is_given_up_without_a_service(
    host: tuple[Path, Path], image: EnclaveImage
) -> None:
    """Nothing keeps a dead service's socket for ever: after ``--keep-socket`` seconds
    without a service, or once its path no longer names it, the keeper closes it; a
    connection that queued meanwhile is closed, not left waiting."""

    state, sock = host
    service = start_service(state, socket_path=sock, extra_args=["--keep-socket", "1"])
    killed(service)
    queued = queue_launch(sock, image)
    assert wait_until(lambda: keepers(state, sock) == [], timeout=30)
    try:
        assert queued.recv(1) == b""
    except ConnectionResetError:
        pass
    queued.close()
    with pytest.raises(ConfigError, match="cannot reach"):
        EnclaveClient.launch(image, socket_path=sock)

    service = start_service(state, socket_path=sock)  # binds afresh over the stale file
    try:
        with EnclaveClient.launch(image, socket_path=sock) as client:
            assert client.ecall.echo(1) == 1
    finally:
        killed(service)
    assert len(keepers(state, sock)) == 1
    sock.unlink()  # its path gone: the keeper ends at once, whatever --keep-socket says
    assert wait_until(lambda: keepers(state, sock) == [], timeout=30)


def test_the_socket_systemd_passes_is_served_and_left_to_it(
    host: tuple[Path, Path], image: EnclaveImage
) -> None:
    """Socket activation (``LISTEN_FDS``), through systemd's own ``systemd-socket-activate``,
    which binds the socket and starts the service at the first connection: that
    connection is served, the service starts no keeper (systemd holds the socket
    across restarts), and it leaves the socket file to systemd when it ends."""

    state, sock = host
    sock.parent.mkdir(mode=0o700)
    activate = shutil.which("systemd-socket-activate")
    assert activate is not None, "systemd-socket-activate (Debian's systemd package)"
    with open(state / "service.log", "ab") as log:
        process = subprocess.Popen(
            [activate, "-l", str(sock), sys.executable, "-P", "-m", "migsgx", "platform",
             "serve", "--state", str(state), "--socket", str(sock)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
        )  # fmt: skip
    service = ServiceProcess(state, sock, process)
    assert wait_until(sock.exists, timeout=30)
    try:
        held = sock.stat().st_ino
        with EnclaveClient.launch(image, socket_path=sock) as client:
            assert client.ecall.echo(3) == 3
        assert socket_owner(sock) == service.process.pid
        assert keepers(state, sock) == []
    finally:
        service.stop()
    assert sock.stat().st_ino == held
    assert "(the socket systemd holds)" in (state / "service.log").read_text()


def test_a_foreign_socket_offered_as_the_kept_one_is_not_adopted(
    host: tuple[Path, Path], image: EnclaveImage
) -> None:
    """A process that poses as this socket's keeper (its command line, its tag, the
    stale socket file's inode) but holds a listener bound elsewhere: the service does
    not adopt it, binds a fresh socket, and the foreign listener never sees a client."""

    state, sock = host
    sock.parent.mkdir(mode=0o700)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(sock))  # a crashed service's file, no keeper
    stale.close()
    (sock.parent.parent / "elsewhere").mkdir()
    foreign = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    foreign.bind(str(sock.parent.parent / "elsewhere" / "enclave.sock"))
    foreign.listen(8)
    control, theirs = socket.socketpair()
    reserve, peer = socket.socketpair()
    fds = (foreign.fileno(), theirs.fileno(), reserve.fileno(), peer.fileno())
    poser = subprocess.Popen(
        [sys.executable, "-P", "-m", "migsgx.sgx.keeper", "--listener", str(fds[0]),
         "--control", str(fds[1]), "--reserve", str(fds[2]), "--reserve-peer", str(fds[3]),
         "--socket-tag", socket_tag(state, sock), "--path", str(sock), "--keep-for", "60"],
        pass_fds=fds,
    )  # fmt: skip
    for end in (control, theirs, reserve, peer):
        end.close()  # its "service" is gone: it waits for a successor
    assert wait_until(lambda: keepers(state, sock) == [poser.pid], timeout=30)
    service = start_service(state, socket_path=sock)
    try:
        assert "kept from" not in (state / "service.log").read_text()
        with EnclaveClient.launch(image, socket_path=sock) as client:
            assert client.ecall.echo(1) == 1
        foreign.setblocking(False)
        with pytest.raises(BlockingIOError):
            foreign.accept()
    finally:
        service.stop()
        poser.kill()
        poser.wait()
        foreign.close()
