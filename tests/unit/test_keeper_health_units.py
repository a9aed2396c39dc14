"""The socket keeper's edges (issue 9, item 8): what a service starts inherits none of
systemd's variables meant for the service; ``--keep-socket`` is a finite number of
seconds; a systemd unit's socket is left to the unit (no service of anyone else
binds over it, and an agent waits for the unit's)."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from platform_fixtures import World, wait_until

from migsgx import cli
from migsgx.errors import ConfigError
from migsgx.sgx import listener as listener_module
from migsgx.sgx.keepers import SERVICE_ONLY_ENV, KeeperLink
from migsgx.sgx.listener import Listener, held_by_systemd
from migsgx.sgx.service import PlatformService
from migsgx.sgx.spawn import wait_for_unit


def _environ(pid: int) -> set[str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return {entry.split(b"=", 1)[0].decode() for entry in raw.split(b"\0") if entry}


def _gone(pid: int) -> bool:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)  # (ours to reap when this process is a subreaper)
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except OSError:
        return True


def test_the_keeper_and_the_warm_spare_inherit_no_systemd_variable(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``NOTIFY_SOCKET`` (and ``LISTEN_*``) are the service's: a keeper or an enclave that
    inherited them could say ``READY=1`` or take descriptor 3 as the service."""

    for name in SERVICE_ONLY_ENV:
        monkeypatch.setenv(name, "1" if name != "NOTIFY_SOCKET" else "/nonexistent/notify")
    monkeypatch.setenv("LISTEN_PID", "1")  # (not this process: no socket passed)
    path = Path(tempfile.mkdtemp(prefix="sock-", dir="/tmp")) / "run" / "enclave.sock"
    service = PlatformService(world.host_a, path, log_dir=path.parent.parent / "logs",
                              sandbox=False, warm_spare=True, keep_socket=60)  # fmt: skip
    service.bind()
    try:
        link = service._socket._keeper
        assert link is not None
        assert wait_until(lambda: link.state == "running", timeout=30)
        assert wait_until(lambda: service._spare is not None, timeout=30)
        keeper_pid, spare = link.pid, service._spare
        assert keeper_pid is not None and spare is not None
        for pid in (keeper_pid, spare[0].pid):
            assert _environ(pid).isdisjoint(SERVICE_ONLY_ENV), pid
    finally:
        service.shutdown()
        listener_module._notify_address.clear()
    assert wait_until(lambda: _gone(keeper_pid), timeout=30)


@pytest.mark.parametrize("value", ["inf", "nan", "Infinity", "NaN"])
def test_keep_socket_must_be_a_finite_number_of_seconds(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
    value: str,
) -> None:  # fmt: skip
    """Refused as bad usage (exit 2) before anything starts: ``inf`` would keep a dead
    service's socket for ever, and ``nan`` gave it up at once, silently."""

    def started(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("the service must not start")

    monkeypatch.setattr("migsgx.sgx.service.PlatformService", started)
    with pytest.raises(SystemExit) as exited:
        cli.main(["platform", "serve", "--state", str(tmp_path), "--keep-socket", value])
    err = capsys.readouterr().err
    assert exited.value.code == cli.EXIT_USAGE, err
    assert "--keep-socket" in err and "not a number of seconds" in err
    assert "Traceback" not in err


def _held_as_systemd_does(path: Path) -> socket.socket:
    """A listener at ``path`` whose last ``listen`` was by a process that ended (the
    unit's service that died), as systemd holds it in the restart window."""

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen()
    relisten = f"import socket; socket.socket(fileno={sock.fileno()}).listen(64)"
    subprocess.run([sys.executable, "-c", relisten], pass_fds=(sock.fileno(),), check=True)
    return sock


def test_a_systemd_unit_s_socket_is_left_to_the_unit(tmp_path: Path) -> None:
    """In the unit's restart window (``RestartSec=``) the socket listens (systemd holds
    it) and no service does: a service started by anyone else (an agent) is refused
    before it binds over the unit's socket, and the agent waits for the unit's."""

    state = tmp_path / "state"
    state.mkdir()
    path = tmp_path / "run" / "enclave.sock"
    path.parent.mkdir()
    held = _held_as_systemd_does(path)  # (what systemd holds)
    marker = Listener(state, path, group=None).systemd_path
    assert not held_by_systemd(marker, path)
    assert not wait_for_unit(state, path, timeout=0)  # no unit: the agent starts its own
    marker.write_text(f"{path.stat().st_dev} {path.stat().st_ino}\n")  # (its service's)
    assert held_by_systemd(marker, path)
    with pytest.raises(ConfigError, match="systemd's socket unit holds"):
        Listener(state, path, group=None, keep_for=0).open()
    assert path.stat().st_ino == int(marker.read_text().split()[1])  # not bound over
    with pytest.raises(ConfigError, match="did not listen within"):
        wait_for_unit(state, path, timeout=0)  # (its service never comes here)
    held.close()  # the unit stopped: a stale file, nothing listens
    assert not held_by_systemd(marker, path)
    fresh = Listener(state, path, group=None, keep_for=0)
    fresh.open()
    try:
        assert not marker.exists()
    finally:
        fresh.close()


def test_platform_status_says_what_the_service_said_of_its_socket(
    world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    """``migsgx platform status``: the socket's origin and keeper, and whether the
    service runs; a service that ended for good leaves nothing to say (exit 3)."""

    path = Path(tempfile.mkdtemp(prefix="sock-", dir="/tmp")) / "run" / "enclave.sock"
    state = world.host_a.state_dir
    argv = ["platform", "status", "--state", str(state), "--socket", str(path)]
    service = PlatformService(world.host_a, path, log_dir=path.parent.parent / "logs",
                              sandbox=False, keep_socket=0)  # fmt: skip
    service.bind()
    try:
        with pytest.raises(SystemExit) as exited:
            cli.main(argv)
        assert exited.value.code == cli.EXIT_OK
        said = json.loads(capsys.readouterr().out)
        assert said["origin"] == "bound" and said["keeper"] == "none"
        assert said["service_pid"] == os.getpid() and said["socket"] == str(path)
        # (this test process is no `platform serve`: not taken for the service)
        assert said["running"] is False
    finally:
        service.shutdown()
    with pytest.raises(SystemExit) as exited:
        cli.main(argv)
    assert exited.value.code == cli.EXIT_CONFIG
    assert "no platform service runs for" in capsys.readouterr().err


def test_a_keeper_that_does_not_start_is_said(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A keeper that ends before its hello (here: its socket's path names no socket)
    leaves the socket unkept: the service's log and status say so, not silence."""

    changes: list[str] = []
    link = KeeperLink("0" * 32, tmp_path / "enclave.sock", 1.0, lambda: changes.append("x"))
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(tmp_path / "elsewhere.sock"))
        sock.listen()
        link.start(sock)
        try:
            assert wait_until(lambda: changes and link.state == "missing", timeout=30)
            assert link.status() == {"keeper": "missing", "keeper_pid": None,
                                     "keeper_restarts": 0}  # fmt: skip
        finally:
            link.close()
    assert "WARNING: the socket keeper did not start" in capsys.readouterr().err
