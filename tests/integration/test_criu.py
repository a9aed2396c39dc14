"""Real CRIU, driven over RPC: checkpoint and restore of a live Python process."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from proc_helpers import (
    HostsFactory,
    KillLater,
    SpawnFactory,
    ask,
    server_program,
    start_server,
)

from migsgx import _proc
from migsgx.containers.base import HostConfig, RestoreRequest
from migsgx.containers.pid import PidDriver
from migsgx.criu import MIN_VERSION, Criu, DumpCancel, InNetns, InTaskNamespaces
from migsgx.criu.images import credentials_of
from migsgx.criu.pageserver import PageServer
from migsgx.criu.rpc import FEATURES_OFF_ENV
from migsgx.datapath.pagerelay import PageRelay, local_pair, relay_keys
from migsgx.errors import CriuError, PageStreamError
from migsgx.lab.netns import NETNS_DIR, terminate

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

# A process with state worth keeping: a counter and an 8 MiB random blob in
# memory, and a listening TCP socket; "inc" bumps and returns the counter, "sum"
# hashes the blob.
COUNTER_SERVER = server_program(
    """
    blob = os.urandom(8 << 20)
    counter = 0
    """,
    """
    if words[0] == b"inc":
        counter += 1
        reply = str(counter).encode()
    elif words[0] == b"sum":
        reply = hashlib.sha256(blob).hexdigest().encode()
    else:
        reply = b"?"
    """,
)


def wait_gone(proc: subprocess.Popen[bytes]) -> None:
    """Reap the dumped process: CRIU restores it under its old pid, which must be free."""

    assert proc.wait(timeout=5) == -9  # CRIU killed it once post-dump succeeded
    assert not os.path.exists(f"/proc/{proc.pid}")


def images(tmp_path: Path, name: str = "images") -> Path:
    path = tmp_path / name
    path.mkdir()
    return path


def test_check_version_and_features(criu: Criu) -> None:
    criu.check()
    version = criu.version()
    assert (version.major, version.minor) >= MIN_VERSION
    features = criu.features()
    assert set(features) == {"mem_track", "lazy_pages", "pidfd_store"}


@pytest.mark.parametrize("detached", [True, False], ids=["detached", "sibling"])
def test_dump_and_restore_keeps_memory_and_listener(
    criu: Criu,
    spawn: SpawnFactory,
    kill_later: KillLater,
    subreaper: None,
    tmp_path: Path,
    detached: bool,
) -> None:
    proc, port = start_server(spawn, tmp_path, COUNTER_SERVER)
    assert [ask("inc", port) for _ in range(3)] == ["1", "2", "3"]
    digest = ask("sum", port)

    seen: list[str] = []
    dump_dir = images(tmp_path)
    criu.dump(proc.pid, dump_dir, notify=lambda script, _pid: seen.append(script))
    assert seen.index("pre-dump") < seen.index("post-dump")
    assert (dump_dir / "inventory.img").exists()
    wait_gone(proc)

    restored: list[tuple[str, int]] = []
    new_pid = criu.restore(
        dump_dir,
        restore_detached=detached,
        notify=lambda script, p: restored.append((script, p)),
    )
    kill_later(new_pid)
    assert new_pid == proc.pid
    assert ("post-restore", proc.pid) in restored
    assert ask("inc", port) == "4"
    assert ask("sum", port) == digest


@pytest.mark.parametrize("spend", [True, False], ids=["spent", "whole"])
def test_the_pid_drivers_restore_spends_the_images_pages(
    criu: Criu,
    spawn: SpawnFactory,
    kill_later: KillLater,
    subreaper: None,
    tmp_path: Path,
    spend: bool,
) -> None:
    """An incoming migration's images are read once: CRIU frees each block of pages
    from them as it restores it; left whole when not asked (a checkpoint's)."""

    proc, port = start_server(spawn, tmp_path, COUNTER_SERVER)
    assert ask("inc", port) == "1"
    digest = ask("sum", port)
    dump_dir = images(tmp_path)
    criu.dump(proc.pid, dump_dir)
    wait_gone(proc)
    pages = list(dump_dir.glob("pages-*.img"))
    held = sum(p.stat().st_blocks * 512 for p in pages)
    assert held >= 8 << 20  # the blob's pages, stored
    driver = PidDriver(HostConfig(criu))
    restored = driver.restore(RestoreRequest(dump_dir, {}, tcp_close=False, spend_images=spend))
    kill_later(restored.pid)
    left = sum(p.stat().st_blocks * 512 for p in pages)
    assert all(p.stat().st_size for p in pages)  # (the files stay, their size too)
    if spend:
        assert left < 1 << 20, f"{left} bytes of pages left in the images"
    else:
        assert left == held
    os.kill(restored.pid, signal.SIGCONT)  # (restored stopped: leave_stopped)
    assert ask("inc", port) == "2"
    assert ask("sum", port) == digest


def test_post_dump_veto_keeps_source_running(
    criu: Criu, spawn: SpawnFactory, tmp_path: Path
) -> None:
    proc, port = start_server(spawn, tmp_path, COUNTER_SERVER)
    assert ask("inc", port) == "1"
    digest = ask("sum", port)

    class NotCommitted(Exception):
        pass

    def veto(script: str, _pid: int) -> None:
        if script == "post-dump":
            raise NotCommitted("destination did not confirm")

    with pytest.raises(CriuError) as caught:
        criu.dump(proc.pid, images(tmp_path), leave_running=False, notify=veto)
    assert isinstance(caught.value.__cause__, NotCommitted)
    assert "post-dump" in str(caught.value)
    assert caught.value.context["notify_script"] == "post-dump"
    # CRIU resumed the tasks instead of killing them: same process, same state.
    assert proc.poll() is None
    assert ask("inc", port) == "2"
    assert ask("sum", port) == digest


def test_migrate_between_network_namespaces(
    criu: Criu,
    hosts: HostsFactory,
    spawn: SpawnFactory,
    kill_later: KillLater,
    subreaper: None,
    tmp_path: Path,
) -> None:
    net = hosts("src", "dst")
    src, dst = net["src"], net["dst"]
    proc, port = start_server(spawn, tmp_path, COUNTER_SERVER, bind="0.0.0.0", host=src)
    assert ask("inc", port, via=dst, address=src.address) == "1"
    assert ask("inc", port, via=dst, address=src.address) == "2"

    dump_dir = images(tmp_path)
    criu.dump(proc.pid, dump_dir, enter=InTaskNamespaces(proc.pid))
    wait_gone(proc)
    new_pid = criu.restore(dump_dir, enter=InNetns(dst.netns))
    kill_later(new_pid)

    assert new_pid == proc.pid
    netns_inode = os.stat(NETNS_DIR / dst.netns).st_ino
    assert os.stat(f"/proc/{new_pid}/ns/net").st_ino == netns_inode
    assert ask("inc", port, via=src, address=dst.address) == "3"
    with pytest.raises(ConnectionRefusedError):
        ask("inc", port, via=dst, address=src.address)


def test_restore_of_garbled_images_reports_criu_error(criu: Criu, tmp_path: Path) -> None:
    bad = images(tmp_path)
    (bad / "inventory.img").write_bytes(b"not a criu image" * 4)
    with pytest.raises(CriuError) as caught:
        criu.restore(bad)
    err = caught.value
    assert err.context["action"] == "restore"
    assert err.context["log_path"] == str(bad / "restore.log")
    assert "inventory.img" in str(err)  # CRIU's own complaint, from its log


def test_dump_of_missing_process_reports_errno(criu: Criu, tmp_path: Path) -> None:
    with pytest.raises(CriuError) as caught:
        criu.dump(2**22 + 1, images(tmp_path))  # above the largest pid_max (2**22)
    assert caught.value.context["action"] == "dump"
    assert caught.value.context["log_path"].endswith("dump.log")


def test_pre_dump_refused_cleanly_without_memory_tracking(
    criu: Criu, spawn: SpawnFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A kernel without soft-dirty bits, played by the fault hook on any kernel."""

    real = criu.features()
    monkeypatch.setenv(FEATURES_OFF_ENV, "mem_track,lazy_pages")
    without = Criu(criu.binary)  # asks the kernel afresh (the answer is cached)
    # Only the named features go, whatever the kernel has (lazy pages work here).
    assert without.features() == {**real, "mem_track": False, "lazy_pages": False}
    proc, port = start_server(spawn, tmp_path, COUNTER_SERVER)
    pre = images(tmp_path, "pre")
    with pytest.raises(CriuError, match="memory tracking") as caught:
        without.pre_dump(proc.pid, pre)
    assert caught.value.context["action"] == "pre-dump"
    assert list(pre.iterdir()) == []  # refused before CRIU touched the tree
    with pytest.raises(CriuError, match="memory tracking"):
        without.dump(proc.pid, images(tmp_path, "tracked"), track_mem=True, leave_running=True)
    assert ask("inc", port) == "1"  # the tree runs on


def test_thread_credentials_read_from_a_real_dump(
    criu: Criu, spawn: SpawnFactory, tmp_path: Path
) -> None:
    """What a destination checks (``credentials_of``) is what the kernel said at the dump."""

    proc, _port = start_server(spawn, tmp_path, COUNTER_SERVER)
    status = Path(f"/proc/{proc.pid}/status").read_text().splitlines()
    caps = 0
    for line in status:
        if line.startswith(("CapInh:", "CapPrm:", "CapEff:", "CapBnd:", "CapAmb:")):
            caps |= int(line.split()[1], 16)
    dump_dir = images(tmp_path)
    criu.dump(proc.pid, dump_dir, leave_running=True)
    creds = credentials_of((dump_dir / f"core-{proc.pid}.img").read_bytes(), "core")
    assert creds is not None
    assert creds.capabilities == {bit for bit in range(64) if caps >> bit & 1}
    assert creds.capabilities  # root here holds capabilities: the bits are read, not zero


def test_pre_dump_follows_the_kernels_memory_tracking(
    criu: Criu, spawn: SpawnFactory, tmp_path: Path
) -> None:
    """Whatever this kernel has: a pre-dump where it tracks memory, a refusal where not."""

    proc, port = start_server(spawn, tmp_path, COUNTER_SERVER)
    pre = images(tmp_path, "pre")
    if criu.features()["mem_track"]:
        criu.pre_dump(proc.pid, pre)
        assert list(pre.glob("pages-*.img"))
    else:
        with pytest.raises(CriuError, match="memory tracking"):
            criu.pre_dump(proc.pid, pre)
    assert ask("inc", port) == "1"


@pytest.mark.parametrize(
    ("failing", "tree_survives"), [("post-restore", False), ("post-resume", True)]
)
def test_failed_restore_callback(
    criu: Criu,
    spawn: SpawnFactory,
    kill_later: KillLater,
    subreaper: None,
    tmp_path: Path,
    failing: str,
    tree_survives: bool,
) -> None:
    """A failed post-restore answer makes CRIU kill the tree; after resume it is too late."""

    proc, port = start_server(spawn, tmp_path, COUNTER_SERVER)
    assert ask("inc", port) == "1"
    dump_dir = images(tmp_path)
    criu.dump(proc.pid, dump_dir)
    wait_gone(proc)
    kill_later(proc.pid)

    def refuse(script: str, _pid: int) -> None:
        if script == failing:
            raise RuntimeError(f"refusing {script}")

    with pytest.raises(CriuError) as caught:
        criu.restore(dump_dir, notify=refuse)
    assert caught.value.context["notify_script"] == failing
    assert isinstance(caught.value.__cause__, RuntimeError)
    if tree_survives:
        assert caught.value.context["restored_pid"] == proc.pid
        assert ask("inc", port) == "2"
    else:
        assert "restored_pid" not in caught.value.context
        terminate(proc.pid, sig=0)  # CRIU's SIGKILL lands shortly after its answer
        with pytest.raises(ConnectionRefusedError):
            ask("inc", port)


# --- stopping a running dump (DumpCancel): reached from CRIU's own notifications ---
def test_a_cancel_refuses_the_next_step_and_the_tree_runs_on(
    criu: Criu, spawn: SpawnFactory, tmp_path: Path
) -> None:
    proc, port = start_server(spawn, tmp_path, COUNTER_SERVER)
    assert ask("inc", port) == "1"
    digest = ask("sum", port)
    cancel = DumpCancel()
    seen: list[str] = []

    def notify(script: str, _pid: int) -> None:
        seen.append(script)
        if script == "pre-dump":
            cancel.cancel("an enclave stream failed")  # before CRIU froze anything

    with pytest.raises(CriuError, match="cancelled: an enclave stream failed"):
        criu.dump(proc.pid, images(tmp_path), notify=notify, cancel=cancel)
    assert cancel.vetoed and cancel.stopped_early
    assert "post-dump" not in seen
    assert proc.poll() is None
    assert ask("inc", port) == "2"
    assert ask("sum", port) == digest


def test_a_cancel_shuts_the_page_connection_and_the_tree_runs_on(
    criu: Criu, spawn: SpawnFactory, tmp_path: Path
) -> None:
    proc, port = start_server(spawn, tmp_path, COUNTER_SERVER)
    assert ask("inc", port) == "1"
    digest = ask("sum", port)
    listener = socket.create_server(("127.0.0.1", 0))
    server_dir = images(tmp_path, "server")
    servers: list[PageServer] = []

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            servers.append(PageServer(criu.binary, server_dir, conn))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    cancel = DumpCancel()
    seen: list[str] = []

    def notify(script: str, _pid: int) -> None:
        seen.append(script)
        if script == "query-ext-files":
            # The tree is frozen, the page connection open, no page sent yet; this
            # step itself goes on, so only the broken connection can stop the dump.
            cancel.cancel("an enclave stream failed")

    try:
        with pytest.raises(CriuError):
            criu.dump(
                proc.pid, images(tmp_path), notify=notify, cancel=cancel,
                page_server=listener.getsockname()[:2],
            )  # fmt: skip
    finally:
        listener.close()
        thread.join(10)
        for server in servers:
            server.kill()
    assert cancel.broken == 1 and not cancel.vetoed
    assert "query-ext-files" in seen and "post-dump" not in seen
    assert proc.poll() is None
    assert ask("inc", port) == "2"
    assert ask("sum", port) == digest


def test_a_cancel_after_the_dump_touches_nothing() -> None:
    cancel = DumpCancel()
    cancel.bind(1, ("127.0.0.1", 9))
    cancel.unbind()
    cancel.cancel("too late")
    assert cancel.cancelled and not cancel.stopped_early


# --- the sealed page relay (datapath.pagerelay) between CRIU's dump and page server ---
def _relayed_page_server(
    criu: Criu, server_dir: Path
) -> tuple[int, PageServer, PageRelay, PageRelay]:
    """CRIU's end of the source pair, the page server, the source and destination relays."""

    key, session = bytes(range(32)), b"relay-test-sess1"
    src_ours, src_criu = local_pair()
    dst_ours, dst_criu = local_pair()
    wire_src, wire_dst = socket.socketpair()  # the TCP connection between the hosts
    with dst_criu:
        server = PageServer(criu.binary, server_dir, dst_criu)
    dest = PageRelay(dst_ours, wire_dst, **relay_keys(key, session, source=False)).start()
    source = PageRelay(src_ours, wire_src, **relay_keys(key, session, source=True)).start()
    return src_criu.detach(), server, source, dest


def test_dump_through_the_sealed_relay_restores(
    criu: Criu, spawn: SpawnFactory, kill_later: KillLater, subreaper: None, tmp_path: Path
) -> None:
    proc, port = start_server(spawn, tmp_path, COUNTER_SERVER)
    assert ask("inc", port) == "1"
    digest = ask("sum", port)
    server_dir = images(tmp_path, "server")
    fd, server, source, dest = _relayed_page_server(criu, server_dir)

    def notify(script: str, _pid: int) -> None:
        if script == "post-dump":
            source.wait(30)  # CRIU closed its end: both directions ended with their last frame

    dump_dir = images(tmp_path)
    try:
        criu.dump(proc.pid, dump_dir, page_fd=fd, notify=notify)
        server.wait(30)
        dest.finish(30)
    finally:
        server.kill()
        source.dispose()
        dest.dispose()
    assert source.sent == dest.received >= 8 << 20  # the blob went through the relays
    assert not list(dump_dir.glob("pages-*.img"))  # every page went to the page server
    wait_gone(proc)
    for path in dump_dir.iterdir():
        if not (server_dir / path.name).exists():
            shutil.copy(path, server_dir / path.name)
    kill_later(criu.restore(server_dir, log_file="restore.log"))
    assert ask("inc", port) == "2"
    assert ask("sum", port) == digest


def test_a_cancel_shuts_the_page_relay_and_the_tree_runs_on(
    criu: Criu, spawn: SpawnFactory, tmp_path: Path
) -> None:
    proc, port = start_server(spawn, tmp_path, COUNTER_SERVER)
    assert ask("inc", port) == "1"
    fd, server, source, dest = _relayed_page_server(criu, images(tmp_path, "server"))
    cancel = DumpCancel()
    cancel.add_stop(lambda: (source.abort("the dump was cancelled"), 1)[1])

    def notify(script: str, _pid: int) -> None:
        if script == "query-ext-files":
            cancel.cancel("an enclave stream failed")  # frozen; this step itself goes on

    try:
        with pytest.raises(CriuError):
            criu.dump(proc.pid, images(tmp_path), page_fd=fd, notify=notify, cancel=cancel)
        with pytest.raises(PageStreamError):
            dest.wait(30)  # the destination never saw the stream's last frame
    finally:
        server.kill()
        source.dispose()
        dest.dispose()
    assert cancel.cut == 1 and not cancel.broken and not cancel.vetoed
    assert proc.poll() is None
    assert ask("inc", port) == "2"


def wait_for_child(parent: int) -> int:
    """The first child of ``parent`` (``unshare --fork``'s), once it exists."""

    deadline = time.monotonic() + 10
    while not (children := _proc.children(parent)):
        assert time.monotonic() < deadline, f"{parent} started no child"
        time.sleep(0.01)
    return children[0]


def test_a_proc_directory_left_in_the_working_directory_does_not_fail_the_dump(
    criu: Criu, tmp_path: Path
) -> None:
    """A task whose ``/proc`` is not its pid namespace's (its own namespace, the host's
    ``/proc``) is dumped by CRIU through a ``proc.crtools`` directory it makes in the
    task's working directory.  Another dump of a task in the same directory at that
    moment holds that name (``EEXIST``: the dump failed, found by a storm running two
    migrations at once), and a dump cut short leaves it for good.  Dumps hold the
    directory's lock until their ``post-dump`` step, so only a left directory can be
    there then; an empty one is removed."""

    work = tmp_path / "work"
    work.mkdir()
    launcher = subprocess.Popen(
        [
            "unshare",
            "--pid",
            "--fork",
            "setsid",
            sys.executable,
            "-c",
            "import time; time.sleep(120)",
        ],
        cwd=work,
    )
    try:
        task = wait_for_child(launcher.pid)
        (work / "proc.crtools").mkdir()  # as a dump beside this one holds it
        criu.dump(task, images(tmp_path), enter=InTaskNamespaces(task))
        assert launcher.wait(timeout=10) != 0  # CRIU killed the tree once it was dumped
        assert not (work / "proc.crtools").exists()
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
