"""Migration and the platform's TCB: real enclave processes, platform services, TCP.

The source enclave verifies the destination's quote through dcap-qvl with the collateral
the deployment's CA published (read by the source host's platform service).  A revoked
host and an out-of-date host are refused in the handshake, before any enclave byte moves,
and the source runs on; once the host's TCB is raised (a new PCK certificate, as a
microcode update brings) and the collateral republished, the same migration succeeds.
The CA and the platform are driven through the ``migsgx`` command line.
"""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.register_assert_rewrite("state_helpers")

from state_helpers import (  # noqa: E402
    S2D,
    TamperingProxy,
    World,
    assert_kvstore_intact,
    close_hard,
    fill_kvstore,
    migration_pair,
    peer_frame,
    pid_running,
    start_transfer,
    wait_gone,
)

from migsgx.errors import (  # noqa: E402
    AttestationError,
    MigrationError,
    RevokedError,
    TcbOutOfDateError,
)
from migsgx.lab.hosts import start_service  # noqa: E402
from migsgx.sgx.image import load_author_key, mr_signer_of  # noqa: E402

pytest_plugins = ["state_helpers"]
pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]


def migsgx(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "migsgx", *args], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.fixture
def host(world: World) -> Iterator[tuple[str, Path]]:
    """A fresh host of the deployment at TCB level 1 (out of date), with its service."""

    name = f"t{uuid.uuid4().hex[:8]}"
    state = world.root / f"host-{name}"
    ca = str(world.deployment.ca_dir)
    signer = mr_signer_of(load_author_key(world.deployment.author_key)).hex()
    migsgx(
        "platform",
        "init",
        "--state",
        str(state),
        "--ca",
        ca,
        "--host-id",
        name,
        "--tcb-level",
        "1",
        "--allow-signer",
        signer,
    )
    world.services[name] = start_service(state)
    try:
        yield name, state
    finally:
        world.services.pop(name).stop()


def _refused(
    world: World,
    launch: object,
    name: str,
    error: type[AttestationError],
    image: str = "kvstore",
) -> None:
    client = launch(image)  # type: ignore[operator]
    values = fill_kvstore(client)
    digest = client.ecall.digest()
    with migration_pair(world, name, proxy={}) as (dest, mitm, addr):
        assert mitm is not None
        run = start_transfer(client, addr)
        close_hard(run.peer)
        dest.join()
        launch.track(dest.pid)  # type: ignore[attr-defined]
        # Both enclaves check both quotes against the same collateral and policy; the
        # destination's check of its own quote comes first, the source's of the
        # destination's would follow (tests/unit/test_dcap.py covers each alone).
        refusal = dest.error if isinstance(dest.error, error) else run.error
        assert isinstance(refusal, error), (repr(run.error), repr(dest.error))
        assert f"PCK {name}" in str(refusal)
        assert run.error is not None
        # Refused in the handshake: not one chunk of enclave state crossed.
        assert mitm.chunk_count == 0
        assert not dest.active and dest.enclave_sock is None
        if dest.pid is not None:
            assert wait_gone(dest.pid), "the refused destination enclave still runs"
    run.resume()
    assert pid_running(client.info.pid)
    assert_kvstore_intact(client, digest, values)


def _migrates(world: World, launch: object, name: str, image: str = "kvstore") -> None:
    client = launch(image)  # type: ignore[operator]
    values = fill_kvstore(client, seed=2)
    digest = client.ecall.digest()
    with migration_pair(world, name) as (dest, _, addr):
        run = start_transfer(client, addr)
        assert run.error is None, run.error
        assert dest.loaded.wait(10)
        launch.track(dest.pid)  # type: ignore[attr-defined]
        run.commit()
        dest.join()
        assert dest.error is None, dest.error
        assert dest.enclave_sock is not None
        client.reattach(dest.enclave_sock)
        dest.enclave_sock = None
    assert_kvstore_intact(client, digest, values)


def test_out_of_date_host_refused_until_its_tcb_is_raised(
    world: World, launch: object, host: tuple[str, Path]
) -> None:
    name, state = host
    _refused(world, launch, name, TcbOutOfDateError)
    # The host's microcode update: a PCK certificate at the current level, and the
    # collateral republished.  The running platform service quotes with the new one.
    ca = str(world.deployment.ca_dir)
    migsgx("platform", "tcb", "--state", str(state), "--ca", ca, "--level", "3")
    migsgx("ca", "publish", "--dir", ca)
    _migrates(world, launch, name)


def test_revoked_host_refused(world: World, launch: object, host: tuple[str, Path]) -> None:
    name, state = host
    ca = str(world.deployment.ca_dir)
    migsgx("platform", "tcb", "--state", str(state), "--ca", ca, "--level", "3")
    out = migsgx("ca", "revoke", name, "--dir", ca)
    assert name in out
    _refused(world, launch, name, RevokedError)


def test_measured_policy_may_accept_an_out_of_date_host(
    world: World, launch: object, host: tuple[str, Path]
) -> None:
    """A build whose manifest says ``accept_tcb = ["OutOfDate"]`` moves to the out-of-date
    host; the same host stays closed to the build that does not."""

    name, _ = host
    _migrates(world, launch, name, image="kv-accept-ood")
    _refused(world, launch, name, TcbOutOfDateError)


def test_source_alone_refuses_an_out_of_date_destination(
    world: World, launch: object, host: tuple[str, Path]
) -> None:
    """The network swaps the image in the offer for a build of the same author and product
    that accepts out-of-date platforms: the destination enclave on the out-of-date host
    passes its own checks and the source's quote, and it is the source enclave, by its
    own measured policy, that refuses the destination before any state leaves it."""

    name, _ = host
    files = world.image("kv-signer-accept-ood").files

    def swap_offer(proxy: TamperingProxy, direction: str, msg: dict[str, Any], raw: bytes) -> Any:
        if direction == S2D and msg["t"] == "offer":
            msg["files"] = files
            return peer_frame(msg)
        return None

    client = launch("kv-signer-svn1")  # type: ignore[operator]
    values = fill_kvstore(client)
    digest = client.ecall.digest()
    with migration_pair(world, name, proxy={"on_frame": swap_offer}) as (dest, mitm, addr):
        assert mitm is not None
        run = start_transfer(client, addr)
        close_hard(run.peer)
        dest.join()
        launch.track(dest.pid)  # type: ignore[attr-defined]
        assert isinstance(run.error, TcbOutOfDateError), (repr(run.error), repr(dest.error))
        assert f"PCK {name}" in str(run.error)
        assert isinstance(dest.error, MigrationError), repr(dest.error)
        assert mitm.chunk_count == 0
        assert not dest.active and dest.enclave_sock is None
    run.resume()
    assert_kvstore_intact(client, digest, values)
