"""Worker processes of ``migsgx bench state``: one per role, driven over stdin/stdout.

Each worker is a separate process so that its memory can be measured on its
own.  Commands arrive as JSON lines on stdin, answers leave as JSON lines on
stdout.  Roles:

``source``  launches the model enclave on host a, fills SIZE of secret weights,
            then on ``migrate`` detaches and drives :class:`OutgoingEnclave`.
``dest``    listens on loopback and drives :class:`IncomingEnclave` into host b.
``raw-send``/``raw-recv``  the same ring -> TCP -> ring path with no enclave
            and no crypto: the transport's own speed, for comparison.
``raw-fill``/``raw-drain`` the processes on the far side of those rings.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from ...datapath.incoming import IncomingEnclave
from ...datapath.outgoing import OutgoingEnclave
from ...datapath.ring import ShmRing
from ...datapath.ring_spec import RingRole, RingSpec
from ...datapath.slots import drain_ring, fill_ring
from ...datapath.transport import ring_to_socket, socket_to_ring, tune_socket
from ...enclave.memory import EnclaveMemory
from ...host.client import EnclaveClient
from .. import memstat
from .figures import cpu_seconds
from .sched import set_policy

COLS = 1024


def say(**msg: Any) -> None:
    sys.stdout.write(json.dumps(msg) + "\n")
    sys.stdout.flush()


def hear() -> dict[str, Any]:
    line = sys.stdin.readline()
    if not line:
        raise SystemExit(0)
    msg: dict[str, Any] = json.loads(line)
    return msg


def _touched(size: int) -> bytearray:
    buf = bytearray(size)
    view = memoryview(buf)
    for off in range(0, size, 4096):
        view[off] = 1
    return buf


def _resolved() -> None:
    """Resolve the loopback name once, before the measured window.

    A host name's first resolution loads the IDNA codec and ``unicodedata`` (about
    100 pages faulted in): a migration tool has done that at its start, when it
    reached its agent, but this worker's first connection is the migration's own,
    and its memory and faults would be counted as the transfer's.
    """

    socket.getaddrinfo("127.0.0.1", None, type=socket.SOCK_STREAM)


def source(args: dict[str, Any]) -> None:
    client = EnclaveClient.launch(args["image"], socket_path=args["socket"])
    rows = args["size"] // (COLS * 4)
    digest = client.ecall.generate(rows, COLS, 7)
    _resolved()
    say(ready=True, pid=os.getpid(), enclave_pid=client.info.pid, digest=digest)
    cmd = hear()
    t0 = time.monotonic()
    sock = client.detach()
    out = OutgoingEnclave(
        sock, client.info, client.image_files,
        chunk_size=cmd["chunk"], slots=cmd["slots"], mode=cmd["mode"],
    )  # fmt: skip
    peer = socket.create_connection(("127.0.0.1", cmd["port"]))
    stats = out.transfer(peer)
    t_loaded = time.monotonic()
    say(loaded=True, stats=stats)
    hear()  # commit
    t_commit = time.monotonic()
    # out.commit(), in its steps: the destination runs once the token was delivered;
    # the source's release (its wipe) comes after.
    out.decide()
    out.deliver()
    t_active = time.monotonic()
    out.release()
    t1 = time.monotonic()
    say(done=True, seconds=t1 - t0 - (t_commit - t_loaded), loaded_seconds=t_loaded - t0,
        commit_seconds=t1 - t_commit, active_seconds=t_active - t_commit,
        commit=[t_commit, t_active], release=[t_active, t1])  # fmt: skip
    hear()


class _RestAtLaunch(threading.Thread):
    """The destination enclave's resident set just after its launch, its peak reset.

    The enclave exists only once ``receive`` launched it, and the load follows
    the attested handshake (round trips with the source), so a thread that
    waits for its pid takes its rest before the ring or the state arrive.
    Its pid and shared pages at rest then go to ``pidfile``, where the benchmark finds them.
    """

    def __init__(self, incoming: IncomingEnclave, pidfile: str = "", policy: str = "") -> None:
        super().__init__(name="bench-dest-rest", daemon=True)
        self.incoming = incoming
        self.pidfile = pidfile
        self.policy = policy
        self.stop = threading.Event()
        self.measured = threading.Event()
        self.rest: dict[str, int] = {}
        self.launch_cpu = 0.0

    def launched(self) -> None:
        """The engine's hook right after the launch: wait for the rest, which the
        destination enclave's prefault ahead (its next step) would otherwise raise."""

        self.measured.wait(10.0)

    def run(self) -> None:
        while self.incoming.info is None and not self.stop.is_set():
            time.sleep(0.001)
        info = self.incoming.info
        if info is None:
            return
        window = memstat.PeakWindow.start([info.pid])
        self.rest = {"pid": info.pid, "rss": window.rest[info.pid],
                     "file": window.files[info.pid]}  # fmt: skip
        self.launch_cpu = cpu_seconds(info.pid)
        self.measured.set()
        if self.policy:
            set_policy(info.pid, self.policy)  # (A/B) before the load starts
        if self.pidfile:
            # For the benchmark's sampler of shared pages (which runs elsewhere:
            # it allocates as it reads, and this process is measured), with the
            # enclave's shared pages at rest, read before it maps its ring.
            shared = memstat.shared_excess(info.pid)
            part = Path(self.pidfile + ".part")
            part.write_text(f"{info.pid} {shared}")
            part.replace(self.pidfile)  # whole or not at all for the reader


def dest(args: dict[str, Any]) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    say(ready=True, pid=os.getpid(), port=listener.getsockname()[1])
    conn, _ = listener.accept()
    incoming, offer = IncomingEnclave.accept_offer(conn, args["socket"])
    incoming.prefault = bool(args.get("prefault", False))
    incoming.prefault_ahead = bool(args.get("ahead", True))
    incoming.huge_pages = bool(args.get("huge", False))
    watcher = _RestAtLaunch(incoming, args.get("pidfile", ""), args.get("policy", ""))
    incoming.launched = watcher.launched
    watcher.start()
    try:
        stats = incoming.receive(conn, offer)
    finally:
        watcher.stop.set()
        watcher.join()
    assert incoming.info is not None
    say(loaded=True, enclave_pid=incoming.info.pid, stats=stats, enclave_rest=watcher.rest,
        enclave_launch_cpu=watcher.launch_cpu)  # fmt: skip
    sock = incoming.wait_commit(timeout=600)
    client = EnclaveClient(sock, incoming.info, image_files=incoming.image.files)
    say(active=True, digest=client.ecall.digest())
    hear()
    client.destroy()


def _ring_child(role: str, ring: ShmRing, size: int, chunk: int) -> subprocess.Popen[str]:
    memfd, bell = ring.peer_fds()
    proc = subprocess.Popen(
        [sys.executable, "-m", "migsgx.lab.bench.state_worker", role,
         json.dumps({"memfd": memfd, "bell": bell, "slots": ring.spec.slots,
                     "slot_size": ring.spec.slot_size, "size": size, "chunk": chunk})],
        pass_fds=(memfd, bell), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    ring.peer_handed_over()
    assert proc.stdout is not None
    proc.stdout.readline()  # its buffer is touched and ready
    return proc


def _go(proc: subprocess.Popen[str]) -> None:
    assert proc.stdin is not None
    proc.stdin.write(json.dumps({"go": True}) + "\n")
    proc.stdin.flush()


def raw_send(args: dict[str, Any]) -> None:
    ring = ShmRing.create(args["slots"], args["chunk"], RingRole.CONSUMER)
    child = _ring_child("raw-fill", ring, args["size"], args["chunk"])
    _resolved()  # (as the source: the baseline's window starts as the migration's)
    say(ready=True)
    hear()
    sock = socket.create_connection(("127.0.0.1", args["port"]))
    tune_socket(sock)
    _go(child)
    ring_to_socket(ring, sock, timeout=120)
    child.wait()
    say(sent=True)
    hear()


def raw_recv(args: dict[str, Any]) -> None:
    ring = ShmRing.create(args["slots"], args["chunk"], RingRole.PRODUCER)
    child = _ring_child("raw-drain", ring, args["size"], args["chunk"])
    listener = socket.create_server(("127.0.0.1", 0))
    say(ready=True, port=listener.getsockname()[1])
    conn, _ = listener.accept()
    tune_socket(conn)
    t0 = time.perf_counter()
    _go(child)
    socket_to_ring(conn, ring, timeout=120)
    assert child.stdout is not None
    child.stdout.readline()  # drained
    say(received=True, seconds=time.perf_counter() - t0)
    hear()


def _attach(args: dict[str, Any], role: RingRole) -> ShmRing:
    return ShmRing.attach(args["memfd"], args["bell"], RingSpec(args["slots"], args["slot_size"]),
                          role)  # fmt: skip


def raw_fill(args: dict[str, Any]) -> None:
    ring = _attach(args, RingRole.PRODUCER)
    buf = _touched(args["size"])
    say(ready=True)
    hear()
    fill_ring(ring, buf, args["chunk"], timeout=120)
    ring.wait_drained(120)


def raw_drain(args: dict[str, Any]) -> None:
    """A destination enclave's load with the cipher replaced by a copy.

    Into fresh memory, as an enclave's is.
    """

    ring = _attach(args, RingRole.CONSUMER)
    memory = EnclaveMemory(args["size"])
    say(ready=True)
    hear()
    drain_ring(ring, memory.view(0, args["size"]), timeout=120)
    say(drained=True)


ROLES = {
    "source": source,
    "dest": dest,
    "raw-send": raw_send,
    "raw-recv": raw_recv,
    "raw-fill": raw_fill,
    "raw-drain": raw_drain,
}


def main() -> None:
    role, raw = sys.argv[1], sys.argv[2]
    ROLES[role](json.loads(raw))


if __name__ == "__main__":
    main()
