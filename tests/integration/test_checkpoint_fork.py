"""Checkpoints never fork an enclave (issue 9, item 3): real enclave processes, host a.

A checkpoint restores only after its source committed (the gate in the platform
store moved to committed in the update that retired the source), at most once
(the restore consumes the gate in the update that installs the state), and never
after an abort (the gate, and with it half the stream key, is gone).  The seen
cases: ``__ckpt_out``, ``__mig_dump``, ``__mig_abort`` and then a restore of the
directory gave a second live copy; with persistent state, an old checkpoint
restored after the source had moved on brought old counter values back.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.register_assert_rewrite("state_helpers", "pstore_image")

from pstore_image import checkpoint_out, counting, record_names, restored  # noqa: E402
from state_helpers import Launcher, World, pid_running, wait_gone  # noqa: E402

from migsgx.datapath.checkpoint import restore_enclave  # noqa: E402
from migsgx.errors import CheckpointGateError, ReplayError, RollbackError  # noqa: E402

pytest_plugins = ["state_helpers", "pstore_image"]
pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


def gates(world: World) -> set[str]:
    return {n for n in record_names(world, "a") if n.startswith("!ckpt-")}


def restore_is_refused(world: World, launch: Launcher, directory: Path) -> None:
    """A restore of ``directory`` fails before anything runs, and leaves no enclave."""

    before = world.enclave_pids()
    with pytest.raises(CheckpointGateError):
        sock, info, _ = restore_enclave(directory, 0, world.socket("a"))
        launch.track(info.pid)
        sock.close()
    for pid in world.enclave_pids() - before:
        assert wait_gone(pid), f"the refused restore left enclave {pid} running"


def test_an_aborted_checkpoint_never_restores(
    world: World, launch: Launcher, pstore: str, name: str, tmp_path: Path
) -> None:
    client = counting(launch, pstore, name, 5)
    out = checkpoint_out(client, tmp_path)  # __ckpt_out, __mig_ring, __mig_dump
    assert len(gates(world)) == 1
    client.reattach(out.abort())  # __mig_abort: the source runs on
    assert gates(world) == set()  # the gate (half the key) is gone
    assert client.ecall.increment("c") == 6

    restore_is_refused(world, launch, tmp_path)
    assert client.ecall.increment("c") == 7  # still the one copy


def test_a_pending_checkpoint_does_not_restore_while_its_source_runs(
    world: World, launch: Launcher, pstore: str, name: str, tmp_path: Path
) -> None:
    client = counting(launch, pstore, name, 1)
    out = checkpoint_out(client, tmp_path)
    restore_is_refused(world, launch, tmp_path)  # written, never committed
    client.reattach(out.abort())
    assert client.ecall.increment("c") == 2


def test_an_old_checkpoint_cannot_roll_counters_back(
    world: World, launch: Launcher, pstore: str, name: str, tmp_path: Path
) -> None:
    client = counting(launch, pstore, name, 10)
    old_blob = client.ecall.seal(b"old", "c")  # 11
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    out = checkpoint_out(client, first)
    client.reattach(out.abort())
    new_blob = client.ecall.seal(b"new", "c")  # 12
    pid = client.info.pid

    # The source moves on by a committed checkpoint: its record retires.
    out = checkpoint_out(client, second)
    out.commit()
    assert wait_gone(pid)
    assert name not in record_names(world, "a")

    restore_is_refused(world, launch, first)  # would bring counter 11 back
    back = restored(launch, world, second)
    assert back.ecall.read("c") == 12
    assert back.ecall.unseal(new_blob) == b"new"
    with pytest.raises(RollbackError):
        back.ecall.unseal(old_blob)
    assert gates(world) == set()


def test_a_committed_checkpoint_restores_exactly_once(
    world: World, launch: Launcher, pstore: str, name: str, tmp_path: Path
) -> None:
    client = counting(launch, pstore, name, 3)
    pid = client.info.pid
    out = checkpoint_out(client, tmp_path)
    out.commit()
    assert wait_gone(pid)

    back = restored(launch, world, tmp_path)
    assert back.ecall.increment("c") == 4
    with pytest.raises(ReplayError):
        restored(launch, world, tmp_path)
    assert back.ecall.increment("c") == 5 and pid_running(back.info.pid)
