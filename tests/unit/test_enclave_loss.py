"""A source enclave dead before the decision: its own status (11), named, never 6.

``migsgx migrate`` (and ``checkpoint``) said 6, "did not move: the source runs
as before", while the application ran on without that enclave's state.  Which
enclaves count (:meth:`_Migration._lost_enclaves`), how they are named, what the
command line and a storm make of it.
"""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import cbor2
import pytest

from migsgx import cli
from migsgx.agent.applink import HandedEnclave
from migsgx.agent.enclave_loss import LostEnclave, lost_error, lost_in_journal
from migsgx.agent.source import MigrateOptions, _Migration
from migsgx.agent.source_state import _Transfer
from migsgx.agent.tls import AgentIdentity
from migsgx.errors import (
    InDoubtError,
    MigrationError,
    SourceEnclaveLostError,
    SourceGoneError,
)
from migsgx.host.appctl import info_to_wire
from migsgx.host.client import EnclaveInfo
from migsgx.lab.storm_checks import honest_exit
from migsgx.lab.storm_faults import SOURCE_ENCLAVE, parse

MR = bytes(range(32))


def _info(pid: int) -> EnclaveInfo:
    return EnclaveInfo(pid=pid, mr_enclave=MR, mr_signer=b"\x02" * 32, isv_prod_id=1,
                       isv_svn=1, debug=False, memory_size=1 << 20, thread_slots=2,
                       ecalls=("put",))  # fmt: skip


def _dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()  # (reaped: the number names no process)
    return child.pid


@pytest.fixture
def migration(tmp_path: Path) -> Iterator[_Migration]:
    """A migration of a live process whose first enclave is dead, its second alive."""

    with subprocess.Popen(["sleep", "60"]) as source, subprocess.Popen(["sleep", "60"]) as alive:
        ours, theirs = socket.socketpair()
        try:
            opts = MigrateOptions(pid=source.pid, to=("127.0.0.1", 9),
                                  identity=AgentIdentity(tmp_path / "agent"))  # fmt: skip
            m = _Migration(opts)
            m.source = m.driver.locate(str(source.pid))
            m.transfers = [
                _Transfer(HandedEnclave(0, _info(_dead_pid()), {}, ours)),
                _Transfer(HandedEnclave(1, _info(alive.pid), {}, theirs)),
            ]
            yield m
        finally:
            ours.close()
            theirs.close()
            source.kill()
            alive.kill()


def test_a_dead_enclave_that_was_never_asked_to_commit_is_lost(migration: _Migration) -> None:
    cause = MigrationError("enclave 0 did not migrate")
    [lost] = migration._lost_enclaves(cause)
    assert (lost.index, lost.mr_enclave, lost.migration_id) == (0, MR.hex(), "")
    assert lost.pid == migration.transfers[0].handed.info.pid
    # (the early handshake's transfers, given up when the freeze failed, count too)
    migration.abandoned, migration.transfers = migration.transfers, []
    assert [e.index for e in migration._lost_enclaves(cause)] == [0]


def test_asked_to_commit_it_is_lost_only_where_the_store_records_no_commit(
    migration: _Migration,
) -> None:
    dead = migration.transfers[0]
    dead.asked_to_commit = True
    assert migration._lost_enclaves(MigrationError("x")) == []  # (no id: it may have)
    dead.outgoing = SimpleNamespace(migration_id=b"\x07" * 16)  # type: ignore[assignment]
    [lost] = migration._lost_enclaves(MigrationError("x"))  # (an empty store: no COMMIT)
    assert lost.migration_id == "07" * 16


@pytest.mark.parametrize("case", ["committed", "resume-sent", "in-doubt", "in-doubt-cause",
                                  "source-gone", "source-dead"])  # fmt: skip
def test_no_loss_is_said_where_the_outcome_is_another(migration: _Migration, case: str) -> None:
    exc: Exception = MigrationError("x")
    if case == "committed":
        migration.committed = True
    elif case == "resume-sent":
        migration.resume_sent = True
    elif case == "in-doubt":
        exc = InDoubtError("x")
    elif case == "in-doubt-cause":
        exc.__cause__ = InDoubtError("x")
    elif case == "source-gone":
        exc = SourceGoneError("x")
    else:  # (the application ended: 8 says so)
        migration.source = SimpleNamespace(root=_dead_pid())  # type: ignore[assignment]
    assert migration._lost_enclaves(exc) == []


def test_the_error_names_each_lost_enclave_and_exits_11() -> None:
    lost = [LostEnclave(0, MR.hex(), 4242, "ab" * 16)]
    err = lost_error(lost, "the migration", MigrationError("enclave 0 did not migrate"))
    assert isinstance(err, SourceEnclaveLostError) and not isinstance(err, MigrationError)
    assert f"enclave 0 (MRENCLAVE {MR.hex()}, pid 4242, migration id {'ab' * 16})" in str(err)
    assert "its state is gone" in str(err) and "nothing can bring it back" in str(err)
    assert err.context["lost"] == [lost[0].to_dict()]
    assert cli._exit_code(err) == cli.EXIT_SOURCE_ENCLAVE_LOST == 11
    assert cli._exit_code(MigrationError("x")) == cli.EXIT_MIGRATION == 6


def test_the_journal_names_them_from_its_enclave_notes() -> None:
    note = cbor2.dumps({"info": info_to_wire(_info(77)), "image_files": {}}).hex()
    data = {"source_lost": [1, "x", -1], "enclaves": ["zz", note], "enclave_mids": ["", "cd"]}
    assert lost_in_journal(data) == [LostEnclave(1, MR.hex(), 77, "cd")]
    assert lost_in_journal({}) == []
    # A damaged note still names the index (its measurement unknown).
    assert lost_in_journal({"source_lost": [0], "enclaves": ["zz"]}) == [LostEnclave(0, "", 0)]


@pytest.mark.parametrize(
    "code, outcome, spec, honest",
    [
        (11, "lost", "tool.before-commit:kill-source-enclave", True),
        (6, "lost", "tool.before-commit:kill-source-enclave", False),  # (before: taken)
        (6, "stayed", "tool.before-commit:drop-data", True),
        (11, "stayed", "tool.before-commit:drop-data", False),
        (11, "lost", "agent.after-claim:kill-enclave", False),
        (10, "lost", "agent.after-claim:kill-enclave", True),
    ],
)  # fmt: skip
def test_a_storm_counts_a_lost_source_enclave_as_lost_with_11(
    code: int, outcome: str, spec: str, honest: bool
) -> None:
    fault = parse(spec)
    assert honest_exit(code, outcome, fault) is honest
    if "kill-source-enclave" in spec:
        assert fault.may_lose == SOURCE_ENCLAVE
