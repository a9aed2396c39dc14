"""The platform service watches the keeper of its socket (issue 9, item 8): a keeper
killed while the service runs (the OOM killer, an operator) is noticed, said in the
service's log and status, and replaced by a new one holding a duplicate of the
listener; a service killed after that takes the socket back from the new keeper, and
a running enclave stays usable and migratable throughout.

The service runs as a process, without namespaces; the keepers are found by their
command lines, as a restarted service finds them.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from platform_fixtures import World, make_image, shared_world, wait_until

from migsgx.agent.faults import socket_owner
from migsgx.datapath.checkpoint import CheckpointOut, restore_enclave
from migsgx.host.client import EnclaveClient
from migsgx.lab.hosts import start_service
from migsgx.sgx.image import mr_signer_of
from migsgx.sgx.keepers import keepers_of
from migsgx.sgx.listener import read_status, socket_tag
from migsgx.sgx.platform import EmulatedPlatform

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


@pytest.fixture(scope="session")
def world() -> World:
    return shared_world()


def keepers(state: Path, sock: Path) -> list[int]:
    return [pid for pid, _ in keepers_of(socket_tag(state, sock))]


def keeper_running(state: Path, sock: Path, *, not_pid: int | None = None) -> int | None:
    """The pid of the keeper the service says runs (its status), once it is not ``not_pid``."""

    status = read_status(state, sock)
    if status is None or status["keeper"] != "running" or status["keeper_pid"] == not_pid:
        return None
    pid = status["keeper_pid"]
    assert isinstance(pid, int)
    return pid


def test_a_killed_keeper_is_replaced_and_the_next_restart_takes_the_socket_back(
    world: World, tmp_path: Path
) -> None:
    state = tmp_path / "host"
    EmulatedPlatform.init(
        state, world.ca, host_id="keephealth", allowed_signers=[mr_signer_of(world.author)]
    )
    sock = tmp_path / "run" / "enclave.sock"
    image = make_image(world.author)
    service = start_service(state, socket_path=sock)
    client = EnclaveClient.launch(image, socket_path=sock)
    try:
        assert wait_until(lambda: keeper_running(state, sock) is not None, timeout=30)
        first = keeper_running(state, sock)
        assert first is not None and keepers(state, sock) == [first]
        inode = sock.stat().st_ino
        cid, _ = client.ecall.ctr_create(5)

        os.kill(first, signal.SIGKILL)  # (as the OOM killer would)
        assert wait_until(lambda: keeper_running(state, sock, not_pid=first), timeout=30)
        second = keeper_running(state, sock, not_pid=first)
        status = read_status(state, sock)
        assert status is not None and status["running"] and status["keeper_restarts"] == 1
        assert keepers(state, sock) == [second]
        log = (state / "service.log").read_text()
        assert f"the socket keeper (pid {first}) ended" in log
        assert f"a new socket keeper (pid {second}) holds {sock}" in log
        assert client.ecall.ctr_inc(cid) == 6  # the service ran on meanwhile

        service.process.kill()
        service.process.wait()
        service = start_service(state, socket_path=sock)
        assert "(the socket kept from the service before)" in (state / "service.log").read_text()
        assert sock.stat().st_ino == inode  # taken back from the new keeper
        assert socket_owner(sock) == service.process.pid
        assert keeper_running(state, sock) == second and keepers(state, sock) == [second]
        assert client.ecall.ctr_inc(cid) == 7  # taken back too
        with EnclaveClient.launch(image, socket_path=sock) as other:
            assert other.ecall.echo(4) == 4
        # Migratable: a checkpoint written and committed, then restored.
        (tmp_path / "ck").mkdir()
        out = CheckpointOut(client.detach(), client.info, client.image_files)
        out.write(tmp_path / "ck", 0)
        out.commit()
        back, info, files = restore_enclave(tmp_path / "ck", 0, sock)
        with EnclaveClient(back, info, image_files=files) as restored:
            assert restored.ecall.ctr_read(cid) == 7
    finally:
        client.destroy()
        service.stop()
    assert wait_until(lambda: keepers(state, sock) == [], timeout=30)
    assert read_status(state, sock) is None  # (ended for good: nothing to say)
