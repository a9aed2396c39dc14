"""Persistent enclave state end to end: real enclave processes on emulated hosts a, b, c.

Sealed data and migratable counters move with the enclave through the attested
migration (``docs/spec/persistent.md``): they open and continue on the destination,
and nowhere else; the source's record and counters are retired at the commit; a
replayed older blob is refused; seal and counter operations are frozen from the dump
until the migration aborts; a destination that dies before the commit leaves the
source as it was; the record survives an enclave (and platform service) restart.
"""

from __future__ import annotations

import time
from pathlib import Path

import cbor2
import pytest

pytest.register_assert_rewrite("state_helpers", "pstore_image")

from pstore_image import (  # noqa: E402
    checkpoint_out,
    counting,
    host_state,
    record_names,
    restored,
)
from state_helpers import (  # noqa: E402
    Launcher,
    World,
    kill_quietly,
    migration_pair,
    pid_running,
    start_transfer,
    wait_gone,
)

from migsgx.agent.reservations import release_reservations  # noqa: E402
from migsgx.enclave.persistent_format import RESERVED  # noqa: E402
from migsgx.errors import PersistentStateError, RollbackError, SealError  # noqa: E402
from migsgx.host.client import EnclaveClient  # noqa: E402
from migsgx.lab.hosts import start_service  # noqa: E402

pytest_plugins = ["state_helpers", "pstore_image"]
pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


def reserved_on(world: World, host: str, name: str) -> bool:
    """Host ``host`` holds ``name`` only as a reservation for an arriving migration."""

    data = cbor2.loads((host_state(world, host) / "counters.cbor").read_bytes())
    blobs = [r["blob"] for k, r in data.get("records", {}).items() if k.endswith("/" + name)]
    return len(blobs) == 1 and blobs[0].startswith(RESERVED)


def migrate(world: World, launch: Launcher, client: EnclaveClient, dest_host: str) -> None:
    """Move ``client``'s enclave to ``dest_host``, commit, and reattach the application."""

    with migration_pair(world, dest_host) as (dest, _, addr):
        run = start_transfer(client, addr)
        assert run.error is None, run.error
        launch.track(dest.pid)
        run.commit()
        dest.join()
        assert dest.error is None, dest.error
        assert dest.enclave_sock is not None
        client.reattach(dest.enclave_sock)
        dest.enclave_sock = None


# --- the kvstore example ------------------------------------------------------------------
def test_sealed_data_moves_and_opens_nowhere_else(
    world: World, launch: Launcher, name: str
) -> None:
    client = launch("kvstore")
    assert client.ecall.open_persistent(name) is True
    client.ecall.put("card", b"4111-1111-1111-1111")
    moving = client.ecall.seal_value_migratable("card")
    staying = client.ecall.seal_value("card")  # platform sealing: bound to host a
    assert name in record_names(world, "a")

    migrate(world, launch, client, "b")

    client.ecall.delete("card")
    client.ecall.unseal_value_migratable("card", moving)
    assert client.ecall.get("card") == b"4111-1111-1111-1111"
    with pytest.raises(SealError):
        client.ecall.unseal_value("card", staying)
    assert name not in record_names(world, "a") and name in record_names(world, "b")

    # On a after the commit, and on c that received no migration, the same enclave
    # under the same name gets a new persistent state: the blob does not open.
    for host in ("a", "c"):
        other = launch("kvstore", host)
        assert other.ecall.open_persistent(name) is True
        with pytest.raises(SealError):
            other.ecall.unseal_value_migratable("card", moving)


def test_counters_continue_across_two_migrations_and_old_blobs_are_refused(
    world: World, launch: Launcher, name: str
) -> None:
    client = launch("kvstore")
    client.ecall.open_persistent(name)
    assert client.ecall.mcounter_create("ops", 10) == 10
    for _ in range(5):
        client.ecall.mcounter_increment("ops")
    client.ecall.put("balance", b"100")
    v1 = client.ecall.seal_value_migratable("balance", True)
    client.ecall.put("balance", b"40")
    v2 = client.ecall.seal_value_migratable("balance", True)

    migrate(world, launch, client, "b")
    assert client.ecall.mcounter_read("ops") == 15
    assert client.ecall.mcounter_increment("ops", 5) == 20
    with pytest.raises(RollbackError):
        client.ecall.unseal_value_migratable("balance", v1)  # replayed after a migration
    client.ecall.unseal_value_migratable("balance", v2)
    client.ecall.put("balance", b"7")
    v3 = client.ecall.seal_value_migratable("balance", True)

    migrate(world, launch, client, "a")
    assert client.ecall.mcounter_read("ops") == 20
    assert client.ecall.mcounter_increment("ops") == 21
    for old in (v1, v2):
        with pytest.raises(RollbackError):
            client.ecall.unseal_value_migratable("balance", old)
    client.ecall.unseal_value_migratable("balance", v3)
    assert client.ecall.get("balance") == b"7"
    assert name in record_names(world, "a") and name not in record_names(world, "b")


# --- freeze, abort, crash ----------------------------------------------------------------------
def test_frozen_from_dump_until_the_abort(
    world: World, launch: Launcher, pstore: str, name: str
) -> None:
    client = launch(pstore)
    client.ecall.open(name)
    client.ecall.create("tick")
    client.ecall.tick_start("tick", 0.01)
    time.sleep(0.1)
    with migration_pair(world) as (dest, _, addr):
        run = start_transfer(client, addr)
        assert run.error is None, run.error
        launch.track(dest.pid)
        # The source has dumped: its thread's operations are refused, typed.
        assert run.out.link.call("__ps_status") == {
            "name": name,
            "open": True,
            "frozen": True,
            "counters": ["tick"],
        }
        time.sleep(0.3)
        run.resume("the operator changed their mind")
        dest.join()
    assert client.call("__ps_status")["frozen"] is False
    frozen = client.ecall.tick_report()
    # Migratable and platform operations alike were refused, and nothing else happened.
    assert frozen["errors"].get("frozen", 0) >= 5, frozen
    assert frozen["platform_errors"].get("frozen", 0) >= 5, frozen
    assert set(frozen["errors"]) == set(frozen["platform_errors"]) == {"frozen"}, frozen
    # Counting again after the abort: wait for five more ticks (a loaded machine
    # schedules the ticking thread late, never not at all).
    deadline = time.monotonic() + 30
    after = client.ecall.tick_report()
    while (
        after["ok"] < frozen["ok"] + 5 or after["platform_ok"] < frozen["platform_ok"] + 5
    ) and time.monotonic() < deadline:
        time.sleep(0.05)
        after = client.ecall.tick_report()
    assert after["ok"] >= frozen["ok"] + 5, after
    assert after["platform_ok"] >= frozen["platform_ok"] + 5, after
    assert after["errors"] == frozen["errors"]
    client.ecall.tick_stop()
    time.sleep(0.05)
    # Every increment that succeeded is in the counter, and nothing else.
    assert client.ecall.read("tick") == client.ecall.tick_report()["ok"]


def test_destination_crash_before_commit_leaves_the_source_intact(
    world: World, launch: Launcher, pstore: str, name: str
) -> None:
    client = counting(launch, pstore, name, 41)
    blob = client.ecall.seal(b"still here", "c")  # c = 42
    with migration_pair(world) as (dest, _, addr):
        run = start_transfer(client, addr)
        assert run.error is None, run.error
        assert dest.pid is not None
        launch.track(dest.pid)
        kill_quietly(dest.pid)  # loaded, not committed
        assert wait_gone(dest.pid)
        run.resume("the destination died")
        dest.join()
        assert dest.error is not None and not dest.active
    assert client.ecall.read("c") == 42
    assert client.ecall.unseal(blob) == b"still here"
    assert client.ecall.increment("c") == 43
    assert name in record_names(world, "a")
    # b keeps the name reserved for that arrival (no state), until it is resolved.
    assert reserved_on(world, "b", name)


def test_a_reservation_left_by_a_dead_destination_is_released(
    world: World, launch: Launcher, pstore: str, name: str
) -> None:
    """The destination enclave died after LOADED (the migration aborted): its name goes.

    What the destination agent does for arrivals none of its sessions holds
    (``migsgx.agent.reservations``); then the same state migrates there again.
    """

    client = counting(launch, pstore, name, 6)
    with migration_pair(world) as (dest, _, addr):
        run = start_transfer(client, addr)
        assert run.error is None, run.error
        assert dest.pid is not None
        launch.track(dest.pid)
        kill_quietly(dest.pid)  # loaded, not committed: the reservation stays
        assert wait_gone(dest.pid)
        run.resume("the destination died")
        dest.join()
    assert reserved_on(world, "b", name)
    arrival = run.out.migration_id
    assert arrival is not None
    assert release_reservations(host_state(world, "b"), [b"\x01" * 16]) == []  # another id
    assert reserved_on(world, "b", name)
    assert release_reservations(host_state(world, "b"), [arrival]) == [name]
    assert name not in record_names(world, "b")
    migrate(world, launch, client, "b")  # a later arrival of the name is not refused
    assert client.ecall.read("c") == 6
    assert name in record_names(world, "b") and not reserved_on(world, "b", name)


# --- restarts and checkpoints -------------------------------------------------------------
def test_record_survives_enclave_and_platform_restarts(
    world: World, launch: Launcher, pstore: str, name: str
) -> None:
    client = launch(pstore, "c")
    assert client.ecall.open(name) is True
    client.ecall.create("c", 5)
    blob = client.ecall.seal(b"kept", "c")  # 6
    pid = client.info.pid
    client.destroy()
    assert wait_gone(pid)

    again = launch(pstore, "c")
    assert again.ecall.open(name) is False
    assert again.ecall.unseal(blob) == b"kept"
    assert again.ecall.increment("c") == 7

    # The platform service restarts too (its enclaves end with it).
    world.services["c"].stop()
    world.services["c"] = start_service(host_state(world, "c"))
    third = launch(pstore, "c")
    assert third.ecall.open(name) is False
    assert third.ecall.read("c") == 7
    with pytest.raises(RollbackError):
        third.ecall.unseal(blob)  # sealed at 6: an older blob than the counter says
    assert third.ecall.unseal(blob, False) == b"kept"


def test_a_second_instance_takes_the_record_over(
    world: World, launch: Launcher, pstore: str, name: str
) -> None:
    first = counting(launch, pstore, name)
    second = launch(pstore)
    assert second.ecall.open(name) is False
    with pytest.raises(PersistentStateError):
        first.ecall.increment("c")
    assert second.ecall.increment("c") == 1


def test_checkpoint_carries_the_persistent_state(
    world: World, launch: Launcher, pstore: str, name: str, tmp_path: Path
) -> None:
    client = counting(launch, pstore, name, 2)
    blob = client.ecall.seal(b"in the checkpoint", "c")  # 3
    pid = client.info.pid
    out = checkpoint_out(client, tmp_path)
    out.commit()
    assert wait_gone(pid)
    assert name not in record_names(world, "a")

    back = restored(launch, world, tmp_path)
    assert back.ecall.read("c") == 3
    assert back.ecall.unseal(blob) == b"in the checkpoint"
    assert name in record_names(world, "a")
    assert pid_running(back.info.pid)
