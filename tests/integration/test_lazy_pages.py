"""Post-copy of process pages with real CRIU lazy pages between namespaced hosts.

The tree moves while its memory stays behind: the destination runs it at once
and pulls pages from the source, in CRIU's mutual TLS with agent identities.
Every acknowledged write must be present afterwards; a source lost inside the
window must end in :class:`SourceLostError` with the destination tree dead.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest
from platform_fixtures import shared_world
from proc_helpers import HostsFactory, KillLater, SpawnFactory, ask, server_program, start_server

from migsgx import _proc
from migsgx.agent.tls import issue_agent_identity
from migsgx.containers.postcopy import PostCopyRestore, lazy_dump, served_port
from migsgx.criu import Criu, InNetns, InTaskNamespaces
from migsgx.errors import SourceLostError
from migsgx.lab.netns import Host
from migsgx.system.process import process_state, tree_pids

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

PAGES = 8192  # 32 MiB of random memory, most of it pulled lazily
# "put K HEX" writes 8 bytes at page K and answers "ok" once they are in memory;
# "get K" answers them; "sum" hashes the whole blob.
WRITER = server_program(
    """
    pages = int(args[0])
    blob = bytearray(os.urandom(pages * 4096))
    """,
    """
    if words[0] == b"put":
        k = int(words[1])
        blob[k * 4096:k * 4096 + 8] = bytes.fromhex(words[2].decode())
        reply = b"ok"
    elif words[0] == b"get":
        k = int(words[1])
        reply = blob[k * 4096:k * 4096 + 8].hex().encode()
    else:
        reply = hashlib.sha256(blob).hexdigest().encode()
    """,
)


def start_writer(spawn: SpawnFactory, host: Host, tmp_path: Path) -> tuple[int, int]:
    """The writer in a pid namespace of its own (the source tree lives on while it
    serves pages, so the restored tree cannot reuse its pids); returns (pid, port)."""

    launcher, port = start_server(
        spawn, tmp_path, WRITER, str(PAGES), bind="0.0.0.0", host=host,
        prefix=["unshare", "--pid", "--fork", "setsid"],
    )  # fmt: skip
    return tree_pids(launcher.pid)[1], port


class Writes:
    """A write loop: random pages, random values, each remembered once acknowledged."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.acked: dict[int, str] = {}

    def run(self, host: Host, address: str, port: int, count: int) -> None:
        for _ in range(count):
            k, value = self.rng.randrange(PAGES), self.rng.randbytes(8).hex()
            assert ask(f"put {k} {value}", port, via=host, address=address) == "ok"
            self.acked[k] = value

    def check(self, host: Host, address: str, port: int) -> None:
        for k, value in self.acked.items():
            answer = ask(f"get {k}", port, via=host, address=address)
            assert answer == value, f"page {k} lost its write"


class LazySource:
    """The source half in a thread: a lazy dump; its images are copied at post-dump."""

    def __init__(self, criu: Criu, pid: int, tmp_path: Path, tls: tuple[Path, Path, Path]):
        self.src_dir = tmp_path / "src-images"
        self.dst_dir = tmp_path / "dst-images"
        self.src_dir.mkdir()
        self.images_ready = threading.Event()
        self.error: BaseException | None = None

        def notify(script: str, _pid: int) -> None:
            if script == "post-dump":
                shutil.copytree(self.src_dir, self.dst_dir)  # the agents stream them
                self.images_ready.set()

        def work() -> None:
            try:
                lazy_dump(
                    criu, pid, self.src_dir, tls=tls, notify=notify,
                    enter=InTaskNamespaces(pid),
                )  # fmt: skip
            except BaseException as exc:
                self.error = exc
            finally:
                self.images_ready.set()

        self.thread = threading.Thread(target=work, name="lazy-dump", daemon=True)
        self.thread.start()

    def port(self) -> int:
        assert self.images_ready.wait(60)
        assert self.error is None, self.error
        return served_port(self.src_dir, timeout=30, alive=self.thread.is_alive)


Tls = tuple[Path, Path, Path]


def identities(tmp_path: Path, src: Host, dst: Host) -> tuple[Tls, Tls]:
    """Agent identities for both hosts; CRIU checks the source's name against its address."""

    world = shared_world()
    a = issue_agent_identity(world.ca_dir, tmp_path / "src-agent", "src", [src.address])
    b = issue_agent_identity(world.ca_dir, tmp_path / "dst-agent", "dst", [dst.address])
    return (a.ca, a.cert, a.key), (b.ca, b.cert, b.key)


@dataclass
class Serving:
    """The writer on host ``src``, written to from ``dst``, its lazy dump serving pages."""

    src: Host
    dst: Host
    dst_tls: Tls
    pid: int  # the writer's
    port: int  # the writer's
    writes: Writes
    source: LazySource
    served: int  # the port of the source's page server

    @classmethod
    def start(
        cls, criu: Criu, hosts: HostsFactory, spawn: SpawnFactory, tmp_path: Path,
        *, subnet: int, seed: int, count: int,
    ) -> Serving:  # fmt: skip
        """Two hosts on ``subnet``; ``count`` writes, then the dump, until it serves."""

        net = hosts("lzs", "lzd", subnet=subnet)
        src, dst = net["lzs"], net["lzd"]
        src_tls, dst_tls = identities(tmp_path, src, dst)
        pid, port = start_writer(spawn, src, tmp_path)
        writes = Writes(seed)
        writes.run(dst, src.address, port, count)
        source = LazySource(criu, pid, tmp_path, src_tls)
        return cls(src, dst, dst_tls, pid, port, writes, source, source.port())

    def restore(self, criu: Criu) -> PostCopyRestore:
        """The destination half, pulling from the source's page server."""

        return PostCopyRestore(
            criu, self.source.dst_dir, (self.src.address, self.served), tls=self.dst_tls,
            enter=InNetns(self.dst.netns),
        )  # fmt: skip


def test_post_copy_keeps_every_acknowledged_write(
    criu: Criu,
    hosts: HostsFactory,
    spawn: SpawnFactory,
    kill_later: KillLater,
    subreaper: None,
    tmp_path: Path,
) -> None:
    move = Serving.start(criu, hosts, spawn, tmp_path, subnet=41, seed=1, count=200)
    src, dst, pid, port, writes, source = (
        move.src,
        move.dst,
        move.pid,
        move.port,
        move.writes,
        move.source,
    )
    post = move.restore(criu)
    try:
        new_pid = kill_later(post.restore())
        # The write loop goes on at the destination while its pages still come in.
        writes.run(src, dst.address, port, 200)
        report = post.wait(60)
    finally:
        post.close()
    source.thread.join(60)
    assert source.error is None, source.error
    assert report.window_seconds > 0
    writes.check(src, dst.address, port)
    assert process_state(new_pid) in ("R", "S")  # it runs (on a CPU or waiting), not held
    assert not os.path.exists(f"/proc/{pid}")  # the source tree died after serving


def test_source_lost_in_the_window_kills_the_destination_tree(
    criu: Criu,
    hosts: HostsFactory,
    spawn: SpawnFactory,
    kill_later: KillLater,
    subreaper: None,
    tmp_path: Path,
) -> None:
    move = Serving.start(criu, hosts, spawn, tmp_path, subnet=42, seed=2, count=20)
    dst, pid, source = move.dst, move.pid, move.source
    # The source fails after its images left and before a page was pulled: its
    # CRIU, the only server of the pages, dies.  (The tree itself is left alone:
    # its stderr file must keep the size the images recorded.)
    found = _descendants_with(f"dump --rpc -t {pid}".encode())
    assert found, "the source's CRIU is not running"
    for swrk in found:
        os.kill(swrk, signal.SIGKILL)
    source.thread.join(30)
    assert source.error is not None

    post = move.restore(criu)
    try:
        with pytest.raises(SourceLostError) as caught:
            kill_later(post.restore())
            post.wait(30)
    finally:
        post.close()
    assert "destination tree was killed" in str(caught.value)
    # Nothing of the tree runs on the destination, with or without its pages.
    assert [p for p in dst.pids() if b"blob = bytearray" in _cmdline(p)] == []


def _cmdline(pid: int) -> bytes:
    return b"\0".join(_proc.argv(pid))


def _descendants_with(word: bytes) -> list[int]:
    """Our descendants whose command line holds ``word`` (the source's CRIU here)."""

    return [pid for pid in _proc.descendants(os.getpid()) if word in _cmdline(pid)]


def test_source_lost_while_the_tree_runs_never_yields_missing_pages(
    criu: Criu,
    hosts: HostsFactory,
    spawn: SpawnFactory,
    kill_later: KillLater,
    subreaper: None,
    tmp_path: Path,
) -> None:
    """The source's link is throttled to 1 Mbit/s, so the 32 MiB cannot all have
    come (minutes) when the tree runs and a client asks it for a page; the source
    then dies.  The client gets the right value or none, never a zero page, and
    the wait ends in SourceLostError with the tree dead."""

    move = Serving.start(criu, hosts, spawn, tmp_path, subnet=43, seed=3, count=20)
    src, dst, pid, port, source = move.src, move.dst, move.pid, move.port, move.source
    server = _descendants_with(f"dump --rpc -t {pid}".encode())
    assert server, "the source's CRIU is not running"
    subprocess.run(
        ["tc", "-n", src.netns, "qdisc", "add", "dev", "eth0", "root", "tbf",
         "rate", "1mbit", "burst", "32kbit", "latency", "10s"],
        check=True,
    )  # fmt: skip

    post = move.restore(criu)
    k, value = next(iter(move.writes.acked.items()))
    answers: list[str] = []

    def reader() -> None:
        try:
            answers.append(ask(f"get {k}", port, via=src, address=dst.address))
        except OSError:
            pass

    try:
        new_pid = kill_later(post.restore())
        client = threading.Thread(target=reader, daemon=True)
        client.start()
        assert post.daemon.poll() is None  # the window is open: pages are still missing
        for p in server:
            os.kill(p, signal.SIGKILL)  # the source dies inside the window
        with pytest.raises(SourceLostError) as caught:
            post.wait(30)
        client.join(15)
    finally:
        post.close()
    assert "destination tree was killed" in str(caught.value)
    assert not client.is_alive()
    assert answers in ([], [""], [value])  # never another value (a zero page)
    assert process_state(new_pid) in ("", "Z", "X")
    source.thread.join(30)
