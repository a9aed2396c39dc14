"""A restore's journal fields that ``migsgx recover --checkpoint`` acts on: the
enclaves' descriptions (``infos``) and the held tree (``restore-held.json``).
Anything damaged reads as nothing (no attach, no process touched)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import cbor2
import pytest

from migsgx.agent.ckpt_journal import HELD, held_tree, restore_infos, start_time
from migsgx.host.appctl import info_to_wire
from migsgx.host.client import EnclaveInfo

INFO = EnclaveInfo(
    pid=4242, mr_enclave=bytes(32), mr_signer=bytes(range(32)), isv_prod_id=1, isv_svn=2,
    debug=False, memory_size=1 << 20, thread_slots=4, ecalls=("get", "put"),
)  # fmt: skip


def test_infos_round_trip() -> None:
    packed = bytes(cbor2.dumps([info_to_wire(INFO), info_to_wire(INFO)])).hex()
    assert restore_infos({"infos": packed}) == [INFO, INFO]


@pytest.mark.parametrize(
    "value",
    [
        None, 7, "", "zz", "a", cbor2.dumps(5).hex(), cbor2.dumps([5]).hex(),
        cbor2.dumps([{"pid": "x"}]).hex(), cbor2.dumps([{**info_to_wire(INFO), "x": 1}]).hex(),
        bytes(cbor2.dumps([info_to_wire(INFO)]))[:-3].hex(),
    ],
)  # fmt: skip
def test_damaged_infos_read_as_none(value: object) -> None:
    assert restore_infos({"infos": value}) == []


def _held(directory: Path, record: object) -> None:
    path = directory / HELD
    path.write_text(json.dumps(record))
    path.chmod(0o600)


def test_held_tree_is_only_a_stopped_process_with_its_start_time(tmp_path: Path) -> None:
    assert held_tree(tmp_path) is None  # (none recorded)
    me = os.getpid()
    _held(tmp_path, {"pid": me, "start": start_time(me)})
    assert held_tree(tmp_path) is None  # (it runs: not held)
    for record in ({"pid": me, "start": ""}, {"pid": -1, "start": "1"}, {"pid": "1"}, [1]):
        _held(tmp_path, record)
        assert held_tree(tmp_path) is None


@pytest.fixture
def stopped() -> Iterator[int]:
    """A child process, stopped (as CRIU leaves a restored tree held)."""

    proc = subprocess.Popen(["sleep", "60"])
    try:
        os.kill(proc.pid, signal.SIGSTOP)
        os.waitpid(proc.pid, os.WUNTRACED)
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()


def test_held_tree_names_a_stopped_process_only_from_an_own_file(
    tmp_path: Path, stopped: int
) -> None:
    record = {"pid": stopped, "start": start_time(stopped)}
    _held(tmp_path, record)
    assert held_tree(tmp_path) == stopped
    _held(tmp_path, {**record, "start": record["start"] + "0"})  # (another start: reused)
    assert held_tree(tmp_path) is None
    _held(tmp_path, record)
    (tmp_path / HELD).chmod(0o666)  # (others may write it: orders nothing)
    assert held_tree(tmp_path) is None
    (tmp_path / HELD).unlink()
    target = tmp_path / "elsewhere.json"
    target.write_text(json.dumps(record))
    target.chmod(0o600)
    (tmp_path / HELD).symlink_to(target)  # (a link: orders nothing)
    assert held_tree(tmp_path) is None
