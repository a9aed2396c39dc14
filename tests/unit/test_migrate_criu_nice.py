"""``migsgx migrate --criu-nice N``: CRIU's dump starts N nicer than the tool's threads.

The dump goes through the real launch path (the pid driver, ``Criu.dump``, its
``nsenter`` into the task's namespaces, ``criu swrk``); the CRIU binary is a
script that writes down the niceness it was started with and exits, so the
dump fails right after the launch and nothing is frozen.  The tool's thread
gets its own niceness back afterwards.  Bad values are the documented usage
error (exit 2), before anything runs.
"""

from __future__ import annotations

import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest

from migsgx import cli
from migsgx.agent.source import MigrateOptions, _Migration
from migsgx.agent.tls import AgentIdentity
from migsgx.criu import Criu
from migsgx.errors import MigSGXError
from migsgx.system import niceness as nice

NICER = 3


def _fake_criu(tmp_path: Path) -> tuple[Path, Path]:
    """A ``criu`` that records its own niceness (field 19 of /proc/self/stat)."""

    seen = tmp_path / "criu-niceness"
    binary = tmp_path / "criu"
    binary.write_text(f"#!/bin/sh\ncut -d' ' -f19 /proc/$$/stat > {seen}\nexit 1\n")
    binary.chmod(0o755)
    return binary, seen


def _dump_in_thread(migration: _Migration, images: Path) -> dict[str, Any]:
    """``_dump`` in a fresh thread (its niceness is its own), with that thread's niceness
    before and after, and the error the failed dump raised."""

    out: dict[str, Any] = {}

    def body() -> None:
        out["before"] = nice.current()
        try:
            migration._dump(images, {})
        except MigSGXError as exc:
            out["error"] = exc
        out["after"] = nice.current()

    thread = threading.Thread(target=body)
    thread.start()
    thread.join(60)
    assert not thread.is_alive()
    return out


@pytest.mark.parametrize("criu_nice", [0, NICER])
def test_the_niceness_reaches_the_criu_that_dumps(tmp_path: Path, criu_nice: int) -> None:
    binary, seen = _fake_criu(tmp_path)
    with subprocess.Popen(["sleep", "60"]) as workload:
        try:
            opts = MigrateOptions(
                pid=workload.pid, to=("127.0.0.1", 9), identity=AgentIdentity(tmp_path / "agent"),
                criu=Criu(binary), work_dir=tmp_path, criu_nice=criu_nice,
            )  # fmt: skip
            migration = _Migration(opts)
            migration.source = migration.driver.locate(str(workload.pid))
            images = tmp_path / "images"
            images.mkdir()
            ran = _dump_in_thread(migration, images)
        finally:
            workload.kill()
    assert "error" in ran  # (the script answers no request: the dump fails)
    assert int(seen.read_text()) == min(19, ran["before"] + criu_nice)
    assert ran["after"] == ran["before"]  # the tool's own niceness back


@pytest.mark.parametrize("value", ["20", "-20", "three"])
def test_a_bad_value_is_a_usage_error(capsys: pytest.CaptureFixture[str], value: str) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["migrate", "1", "--to", "127.0.0.1:9", "--criu-nice", value])
    assert exited.value.code == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert "--criu-nice" in err
