#!/usr/bin/env python3
"""Measure the bulk path of a migration with four real processes; print JSON.

    producer (source enclave) --ring--> sender --TCP--> receiver --ring--> consumer
                                                                 (destination enclave)

The producer seals its memory chunk by chunk with AES-256-GCM straight into ring
slots (nonce = 11-byte counter || last-chunk flag); the consumer opens each
chunk straight into its own memory.  The untrusted processes create the rings
and hand them over with ``send_ring_fds``, as the runtime and agents do.

Modes
    ``sealed``      the pipeline above;
    ``raw``         the same path with plain copies instead of crypto (the
                    transport baseline: ``raw_transport_bytes_per_s``);
    ``sequential``  seal everything into a staging buffer, send it all, then
                    open it all (staging buffers are shared memory, like slots).

Throughput is the enclave size over the time from the producer's first chunk to
the consumer's last.  Memory overhead is the sum over the four processes of
(peak resident set during the transfer - resident set at rest), with peaks
reset through ``/proc/PID/clear_refs`` once every process is idle and ready.
Enclave memory (source and destination) is resident before the rest is taken.

The machine may be shared: before each run the probe waits (``--quiet``) for
other load to stop, measures the CPU time other processes took during the run,
and leaves runs they disturbed out of the medians (``clean_runs`` counts the
rest).  Configurations are run round robin, so that what disturbance remains
spreads over all of them.  Besides throughput, the CPU seconds the four
processes spent per GiB are reported: a figure that contention moves less.

Examples::

    transport_probe.py --chunks 64K,128K,256K,1M --slots 2,3,4 --modes sealed,raw \
        --sched other,batch --repeat 4 --progress
    transport_probe.py --chunks 128K --slots 2 --modes sealed,raw,sequential --sched batch
    transport_probe.py --chunks 128K --slots 2 --affinity none,P0S0R1C1 --threads 1,2
    transport_probe.py --chunks 128K,1M --slots 2 --modes sealed,raw --netns
"""

from __future__ import annotations

import argparse
import itertools
import json
import mmap
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import numpy
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from migsgx.datapath import transport
from migsgx.datapath.ring import RingRole, ShmRing, recv_ring_fds, send_ring_fds
from migsgx.lab import memstat

TAG = 16
ROLES = ("producer", "sender", "receiver", "consumer")
NETNS = ("migsgx-probe-src", "migsgx-probe-dst")
VETH_ADDRS = ("10.250.77.1", "10.250.77.2")


@dataclass(frozen=True)
class Config:
    mode: str  # sealed | raw | sequential
    size: int
    chunk: int  # plaintext bytes per chunk
    slots: int
    affinity: str  # "none" or e.g. "P0S0R1C1"
    threads: int  # sealing/opening threads per enclave process
    sockbuf: int  # 0 = kernel autotuning
    netns: bool
    sched: str  # "other" or "batch" (SCHED_BATCH: no wake-up preemption)
    copy_in: bool = False  # consumer copies each slot to private memory before opening

    @property
    def slot_size(self) -> int:
        return self.chunk + TAG if self.mode != "raw" else self.chunk

    @property
    def nchunks(self) -> int:
        return -(-self.size // self.chunk)

    def cpu(self, role: str) -> int | None:
        if self.affinity == "none":
            return None
        spec = self.affinity
        at = spec.index(role[0].upper())
        return int(spec[at + 1])


# --- control channel: one JSON object per seqpacket message -------------------------------
def send_msg(sock: socket.socket, **msg: Any) -> None:
    sock.send(json.dumps(msg).encode())


def recv_msg(sock: socket.socket, timeout: float | None = 120.0) -> dict[str, Any]:
    sock.settimeout(timeout)
    data = sock.recv(1 << 16)
    if not data:
        raise RuntimeError("control peer closed")
    msg = json.loads(data)
    if not isinstance(msg, dict):
        raise RuntimeError("control message is not an object")
    if "error" in msg:
        raise RuntimeError(f"worker failed: {msg['error']}")
    return msg


# --- the sealed stream --------------------------------------------------------------------
def nonce(counter: int, final: bool) -> bytes:
    return counter.to_bytes(11, "big") + (b"\x01" if final else b"\x00")


def chunk_bounds(cfg: Config, k: int) -> tuple[int, int]:
    start = k * cfg.chunk
    return start, min(start + cfg.chunk, cfg.size)


def produce(cfg: Config, ring: ShmRing, mem: memoryview, aead: AESGCM | None) -> None:
    """Seal (or copy) every chunk into the ring, keeping ``threads`` chunks in flight."""

    pool = ThreadPoolExecutor(cfg.threads) if cfg.threads > 1 and aead else None
    inflight: deque[tuple[int, int, bool, Future[None] | None]] = deque()

    def seal(k: int, final: bool, out: memoryview) -> None:
        start, end = chunk_bounds(cfg, k)
        if aead is None:
            out[: end - start] = mem[start:end]
        else:
            aead.encrypt_into(nonce(k, final), mem[start:end], None, out[: end - start + TAG])

    def retire() -> None:
        index, n, final, fut = inflight.popleft()
        if fut is not None:
            fut.result()
        ring.publish(index, n, final)

    for k in range(cfg.nchunks):
        final = k == cfg.nchunks - 1
        start, end = chunk_bounds(cfg, k)
        index, slot = ring.acquire()
        n = end - start + (TAG if aead else 0)
        if pool is None:
            seal(k, final, slot)
            inflight.append((index, n, final, None))
        else:
            inflight.append((index, n, final, pool.submit(seal, k, final, slot)))
        if len(inflight) >= cfg.threads:
            retire()
    while inflight:
        retire()
    if pool is not None:
        pool.shutdown()


def consume(
    cfg: Config,
    ring: ShmRing,
    mem: memoryview,
    aead: AESGCM | None,
    private: memoryview | None = None,
) -> None:
    """Open (or copy) every chunk into ``mem``; with ``private``, copy each slot there first.

    Copying in first keeps a hostile untrusted side from changing the bytes between
    authentication and decryption (a double fetch).
    """

    pool = ThreadPoolExecutor(cfg.threads) if cfg.threads > 1 and aead else None
    inflight: deque[tuple[int, Future[None]]] = deque()
    if pool is not None:
        private = None  # one buffer cannot serve several threads

    def open_chunk(k: int, final: bool, view: memoryview) -> None:
        start, end = chunk_bounds(cfg, k)
        if len(view) != end - start + (TAG if aead else 0):
            raise RuntimeError(f"chunk {k} has {len(view)} bytes")
        if private is not None:
            private[: len(view)] = view
            view = private[: len(view)]
        if aead is None:
            mem[start:end] = view
        else:
            aead.decrypt_into(nonce(k, final), view, None, mem[start:end])

    for k in range(cfg.nchunks):
        index, view, final = ring.next()
        if final != (k == cfg.nchunks - 1):
            raise RuntimeError("stream ended early or late")
        if pool is None:
            open_chunk(k, final, view)
            ring.release(index)
            continue
        inflight.append((index, pool.submit(open_chunk, k, final, view)))
        if len(inflight) >= cfg.threads:
            i, fut = inflight.popleft()
            fut.result()
            ring.release(i)
    while inflight:
        i, fut = inflight.popleft()
        fut.result()
        ring.release(i)
    if pool is not None:
        pool.shutdown()


def sealed_total(cfg: Config) -> int:
    return cfg.size + cfg.nchunks * TAG


# --- workers --------------------------------------------------------------------------
class Worker:
    """One of the four processes.  Phases, each answered on the control channel:

    ``ready`` (memory mapped, crypto initialised, receiver listening), ``link`` (TCP
    connected: the hosts' channel exists before a migration), then the parent takes
    the resting sizes; ``go`` (rings or staging memory set up), ``start``
    (producer only), ``done``, ``exit``.
    """

    def __init__(self, role: str, cfg: Config, fds: dict[str, int]) -> None:
        self.role = role
        self.cfg = cfg
        self.ctl = socket.socket(fileno=fds["ctl"])
        self.handover = socket.socket(fileno=fds["handover"])
        self.mem = memoryview(b"")
        self.aead: AESGCM | None = None
        self.listener: socket.socket | None = None
        self.sock: socket.socket | None = None
        self.fds = fds
        self.ring: ShmRing | None = None
        self.private: memoryview | None = None

    def run(self) -> None:
        try:
            self.ready()
            self.link()
            recv_msg(self.ctl)  # go
            if self.cfg.mode == "sequential":
                self.sequential()
            else:
                self.pipelined()
            # Unmap nothing before the parent has read our peak: the kernel's record
            # of a peak that was unmapped may miss a few dozen pages (memstat).
            recv_msg(self.ctl, timeout=None)  # exit
            if self.ring is not None:
                self.ring.close()
        except Exception as exc:
            send_msg(self.ctl, error=f"{self.role}: {type(exc).__name__}: {exc}")
            raise

    def ready(self) -> None:
        cpu = self.cfg.cpu(self.role)
        if cpu is not None:
            os.sched_setaffinity(0, {cpu})
        if self.cfg.sched == "batch":
            os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
        if self.role in ("producer", "consumer"):
            mapping = mmap.mmap(self.fds["mem"], self.cfg.size, mmap.MAP_SHARED | mmap.MAP_POPULATE)
            self.mem = memoryview(mapping)
            if self.cfg.mode != "raw":
                self.aead = AESGCM(bytes.fromhex(os.environ["PROBE_KEY"]))
                warm_crypto()
        extra: dict[str, Any] = {}
        if self.role == "receiver":
            self.listener = socket.create_server((fds_addr(self.cfg, self.role), 0))
            extra["port"] = self.listener.getsockname()[1]
        send_msg(self.ctl, ready=True, **extra)

    def link(self) -> None:
        msg = recv_msg(self.ctl)
        if self.role == "sender":
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self.sock.connect((msg["addr"], msg["port"]))
        elif self.role == "receiver":
            assert self.listener is not None
            self.sock, _ = self.listener.accept()
        if self.sock is not None:
            transport.tune_socket(self.sock, buffer_size=self.cfg.sockbuf or None)
        send_msg(self.ctl, linked=True)

    def pipelined(self) -> None:
        cfg = self.cfg
        if self.role == "producer":
            ring = recv_ring_fds(self.handover, RingRole.PRODUCER, timeout=30)
            send_msg(self.ctl, set=True)
            recv_msg(self.ctl)  # start
            t0 = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
            produce(cfg, ring, self.mem, self.aead)
            ring.wait_drained(timeout=60)
            send_msg(self.ctl, done=True, t0=t0)
        elif self.role == "consumer":
            ring = recv_ring_fds(self.handover, RingRole.CONSUMER, timeout=30)
            if cfg.copy_in:
                # Kept until exit: the peak must be read while it is mapped.
                self.private = memoryview(bytearray(cfg.slot_size))
            send_msg(self.ctl, set=True)
            consume(cfg, ring, self.mem, self.aead, self.private)
            send_msg(self.ctl, done=True, t1=time.clock_gettime_ns(time.CLOCK_MONOTONIC))
        elif self.role == "sender":
            assert self.sock is not None
            ring = ShmRing.create(cfg.slots, cfg.slot_size, RingRole.CONSUMER)
            send_ring_fds(self.handover, ring)
            send_msg(self.ctl, set=True)
            transport.ring_to_socket(ring, self.sock, timeout=60)
            transport.shutdown_quietly(self.sock)
            send_msg(self.ctl, done=True)
        else:
            assert self.sock is not None
            ring = ShmRing.create(cfg.slots, cfg.slot_size, RingRole.PRODUCER)
            send_ring_fds(self.handover, ring)
            send_msg(self.ctl, set=True)
            transport.socket_to_ring(self.sock, ring, timeout=60)
            ring.wait_drained(timeout=60)
            send_msg(self.ctl, done=True)
        self.ring = ring

    def sequential(self) -> None:
        """Dump everything into staging memory, send it all, then load it all."""

        cfg = self.cfg
        total = sealed_total(cfg)
        sealed = cfg.chunk + TAG
        if self.role in ("sender", "receiver"):
            staging_fd = os.memfd_create("migsgx-staging", os.MFD_CLOEXEC)
            os.ftruncate(staging_fd, total)
            socket.send_fds(self.handover, [b"staging"], [staging_fd])
        else:
            _, got, _, _ = socket.recv_fds(self.handover, 16, 1)
            staging_fd = got[0]
        staging = memoryview(mmap.mmap(staging_fd, total, mmap.MAP_SHARED))
        os.close(staging_fd)
        send_msg(self.ctl, set=True)
        if self.role == "producer":
            assert self.aead is not None
            recv_msg(self.ctl)  # start
            t0 = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
            for k in range(cfg.nchunks):
                start, end = chunk_bounds(cfg, k)
                out = staging[k * sealed : k * sealed + end - start + TAG]
                self.aead.encrypt_into(
                    nonce(k, k == cfg.nchunks - 1), self.mem[start:end], None, out
                )
            self.handover.send(b"dumped")
            send_msg(self.ctl, done=True, t0=t0)
        elif self.role == "sender":
            assert self.sock is not None
            self.handover.recv(16)
            transport.send_buffer(self.sock, staging, chunk_size=sealed)
            transport.shutdown_quietly(self.sock)
            send_msg(self.ctl, done=True)
        elif self.role == "receiver":
            assert self.sock is not None
            lengths = transport.recv_buffer(self.sock, staging, max_chunk=sealed)
            self.handover.send(len(lengths).to_bytes(4, "big"))
            send_msg(self.ctl, done=True)
        else:
            assert self.aead is not None
            if int.from_bytes(self.handover.recv(16), "big") != cfg.nchunks:
                raise RuntimeError("wrong number of chunks")
            for k in range(cfg.nchunks):
                start, end = chunk_bounds(cfg, k)
                view = staging[k * sealed : k * sealed + end - start + TAG]
                self.aead.decrypt_into(
                    nonce(k, k == cfg.nchunks - 1), view, None, self.mem[start:end]
                )
            send_msg(self.ctl, done=True, t1=time.clock_gettime_ns(time.CLOCK_MONOTONIC))


def warm_crypto() -> None:
    """Run AES-GCM once, as an enclave at rest has: the library's lazy set-up is not migration."""

    aead = AESGCM(bytes(32))
    plain = bytearray(4096)
    sealed = bytearray(4096 + TAG)
    aead.encrypt_into(bytes(12), plain, None, sealed)
    aead.decrypt_into(bytes(12), sealed, None, plain)


def fds_addr(cfg: Config, role: str) -> str:
    if not cfg.netns:
        return "127.0.0.1"
    return VETH_ADDRS[1] if role == "receiver" else VETH_ADDRS[0]


# --- orchestration ----------------------------------------------------------------------
class Memory:
    """Source and destination enclave memory as memfds the enclave workers map."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.src_fd = os.memfd_create("probe-src")
        self.dst_fd = os.memfd_create("probe-dst")
        for fd in (self.src_fd, self.dst_fd):
            os.ftruncate(fd, size)
        self.src = mmap.mmap(self.src_fd, size, mmap.MAP_SHARED)
        self.dst = mmap.mmap(self.dst_fd, size, mmap.MAP_SHARED)
        block = os.urandom(1 << 20)
        for off in range(0, size, len(block)):
            n = min(len(block), size - off)
            self.src[off : off + n] = block[:n]
        # Number every page, so that a misplaced chunk cannot go unnoticed.
        words = numpy.frombuffer(self.src, dtype=numpy.uint64)
        words[:: 4096 // 8] = numpy.arange(size // 4096, dtype=numpy.uint64)
        del words

    def clear_destination(self) -> None:
        numpy.frombuffer(self.dst, dtype=numpy.uint8)[:] = 0

    def intact(self) -> bool:
        src = numpy.frombuffer(self.src, dtype=numpy.uint64)
        dst = numpy.frombuffer(self.dst, dtype=numpy.uint64)
        step = 1 << 20
        differs = numpy.empty(step, dtype=bool)
        for at in range(0, len(src), step):
            n = min(step, len(src) - at)
            numpy.not_equal(src[at : at + n], dst[at : at + n], out=differs[:n])
            if differs[:n].any():
                return False
        return True


@contextmanager
def network_namespaces(enabled: bool) -> Iterator[None]:
    """Two namespaces joined by a veth pair at 10.250.77.1/2; removed afterwards."""

    if not enabled:
        yield
        return
    src, dst = NETNS
    cmds = [
        ["ip", "netns", "add", src],
        ["ip", "netns", "add", dst],
        ["ip", "link", "add", "mgp0", "netns", src, "type", "veth", "peer", "mgp1", "netns", dst],
        ["ip", "-n", src, "addr", "add", f"{VETH_ADDRS[0]}/30", "dev", "mgp0"],
        ["ip", "-n", dst, "addr", "add", f"{VETH_ADDRS[1]}/30", "dev", "mgp1"],
        ["ip", "-n", src, "link", "set", "mgp0", "up"],
        ["ip", "-n", dst, "link", "set", "mgp1", "up"],
        ["ip", "-n", src, "link", "set", "lo", "up"],
        ["ip", "-n", dst, "link", "set", "lo", "up"],
    ]
    try:
        for cmd in cmds:
            subprocess.run(cmd, check=True)
        yield
    finally:
        for ns in NETNS:
            subprocess.run(["ip", "netns", "del", ns], check=False, stderr=subprocess.DEVNULL)


def cpu_times() -> tuple[int, int]:
    """All CPUs' (total, idle) jiffies so far, from /proc/stat."""

    with open("/proc/stat", encoding="ascii") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    return sum(values), values[3] + values[4]  # idle + iowait


def busy_fraction(window: float = 0.3) -> float:
    """How busy the machine's CPUs are over a short window."""

    total0, idle0 = cpu_times()
    time.sleep(window)
    total1, idle1 = cpu_times()
    return 1.0 - (idle1 - idle0) / max(1, total1 - total0)


def wait_for_quiet(limit: float, threshold: float = 0.1) -> float:
    """Wait (at most ``limit`` seconds) until other work leaves the CPUs idle."""

    deadline = time.monotonic() + limit
    busy = busy_fraction()
    while busy > threshold and time.monotonic() < deadline:
        time.sleep(0.5)
        busy = busy_fraction()
    return busy


def run_once(cfg: Config, memory: Memory, key: bytes, quiet: float = 0.0) -> dict[str, Any]:
    memory.clear_destination()
    background = wait_for_quiet(quiet) if quiet > 0 else None
    procs: dict[str, subprocess.Popen[bytes]] = {}
    ctl: dict[str, socket.socket] = {}
    ring_src = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ring_dst = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    handover = {
        "producer": ring_src[0],
        "sender": ring_src[1],
        "receiver": ring_dst[0],
        "consumer": ring_dst[1],
    }
    try:
        for role in ROLES:
            mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            ctl[role] = mine
            fds = {"ctl": theirs.fileno(), "handover": handover[role].fileno()}
            if role in ("producer", "consumer"):
                fds["mem"] = memory.src_fd if role == "producer" else memory.dst_fd
            argv = [sys.executable, os.path.abspath(__file__), "--worker", role]
            argv += [json.dumps(asdict(cfg)), json.dumps(fds)]
            if cfg.netns and role in ("sender", "receiver"):
                argv = ["ip", "netns", "exec", NETNS[0 if role == "sender" else 1], *argv]
            procs[role] = subprocess.Popen(
                argv, pass_fds=list(fds.values()), env={**os.environ, "PROBE_KEY": key.hex()}
            )
            theirs.close()
        for sock in handover.values():
            sock.close()
        ready = {role: recv_msg(ctl[role]) for role in ROLES}
        addr = fds_addr(cfg, "receiver")
        for role in ROLES:
            send_msg(ctl[role], link=True, addr=addr, port=ready["receiver"]["port"])
        for role in ROLES:
            recv_msg(ctl[role])  # linked
        window = memstat.PeakWindow.start(p.pid for p in procs.values())
        for role in ROLES:
            send_msg(ctl[role], go=True)
        for role in ROLES:
            recv_msg(ctl[role])  # set
        before = {role: counters(procs[role].pid) for role in ROLES}
        machine_before = cpu_times()
        send_msg(ctl["producer"], start=True)
        done = {role: recv_msg(ctl[role]) for role in ROLES}
        machine_after = cpu_times()
        per_process = window.overhead()
        after = {role: counters(procs[role].pid) for role in ROLES}
        for role in ROLES:
            send_msg(ctl[role], exit=True)
        for proc in procs.values():
            proc.wait(timeout=30)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for sock in ctl.values():
            sock.close()
    seconds = (done["consumer"]["t1"] - done["producer"]["t0"]) / 1e9
    # CPU time spent by anything else on the machine during the transfer.
    ticks = os.sysconf("SC_CLK_TCK")
    busy = (machine_after[0] - machine_before[0]) - (machine_after[1] - machine_before[1])
    ours = sum(after[role]["cpu_s"] - before[role]["cpu_s"] for role in ROLES)
    foreign = max(0.0, busy / ticks - ours)
    overhead = sum(per_process.values())
    by_role = {role: per_process[procs[role].pid] for role in ROLES}
    return {
        "seconds": seconds,
        "bytes_per_s": cfg.size / seconds,
        "overhead_bytes": overhead,
        "overhead_pct": 100.0 * overhead / cfg.size,
        "overhead_by_role": by_role,
        "background_busy": background,
        "foreign_cpu_s": foreign,
        "activity_by_role": {
            role: {k: after[role][k] - before[role][k] for k in after[role]} for role in ROLES
        },
        "intact": memory.intact(),
    }


def counters(pid: int) -> dict[str, float]:
    """CPU seconds and context switches of a process so far."""

    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    result = {"cpu_s": (int(fields[11]) + int(fields[12])) / ticks}
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name == "voluntary_ctxt_switches":
                result["voluntary_switches"] = int(value)
            elif name == "nonvoluntary_ctxt_switches":
                result["involuntary_switches"] = int(value)
    return result


def summarize(cfg: Config, every: list[dict[str, Any]], max_foreign: float) -> dict[str, Any]:
    """Medians over the runs that other work on the machine did not disturb.

    A run is disturbed when other processes used more than ``max_foreign`` of one
    CPU during it.  If every run was, all count, and ``clean_runs`` says 0.
    """

    clean = [s for s in every if s["foreign_cpu_s"] <= max_foreign * s["seconds"]]
    samples = clean or every
    rates = [s["bytes_per_s"] for s in samples]
    return {
        **asdict(cfg),
        "clean_runs": len(clean),
        "ring_bytes": cfg.slots * cfg.slot_size if cfg.mode != "sequential" else 0,
        "bytes_per_s": statistics.median(rates),
        "bytes_per_s_min": min(rates),
        "bytes_per_s_max": max(rates),
        "overhead_bytes": statistics.median(s["overhead_bytes"] for s in samples),
        "overhead_bytes_max": max(s["overhead_bytes"] for s in samples),
        "overhead_pct": statistics.median(s["overhead_pct"] for s in samples),
        "cpu_s_per_gib": statistics.median(
            sum(a["cpu_s"] for a in s["activity_by_role"].values()) * (1 << 30) / cfg.size
            for s in samples
        ),
        "intact": all(s["intact"] for s in samples),
        "samples": every,
    }


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper().removesuffix("IB").removesuffix("B")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="1G", help="enclave memory size (default 1G)")
    parser.add_argument("--chunks", default="64K,128K,256K,1M", help="plaintext chunk sizes")
    parser.add_argument("--slots", default="2,3,4", help="slot counts")
    parser.add_argument("--modes", default="sealed,raw", help="sealed, raw, sequential")
    parser.add_argument("--affinity", default="none", help="none or e.g. P0S0R1C1, comma list")
    parser.add_argument("--threads", default="1", help="crypto threads per enclave process")
    parser.add_argument("--sockbuf", default="0", help="fixed socket buffer sizes (0 = auto)")
    parser.add_argument("--sched", default="other", help="other, batch (comma list)")
    parser.add_argument("--netns", action="store_true", help="sender and receiver over veth")
    parser.add_argument(
        "--copy-in",
        default="no",
        help="consumer copies each slot before opening it: no, yes (comma list)",
    )
    parser.add_argument("--progress", action="store_true", help="a line per run on stderr")
    parser.add_argument(
        "--max-foreign",
        type=float,
        default=0.1,
        help="runs where other processes used more than this share of a CPU are left out",
    )
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--quiet",
        type=float,
        default=20.0,
        help="before each run, wait up to this many seconds for other load to stop",
    )
    parser.add_argument(
        "--worker", nargs=3, metavar=("ROLE", "CONFIG", "FDS"), help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)

    if args.worker:
        role, cfg_json, fds_json = args.worker
        Worker(role, Config(**json.loads(cfg_json)), json.loads(fds_json)).run()
        return 0

    size = parse_size(args.size)
    if size <= 0 or size % 4096:
        parser.error("--size must be a positive multiple of 4096 (enclave memory is pages)")
    grid = itertools.product(
        args.modes.split(","),
        map(parse_size, args.chunks.split(",")),
        map(int, args.slots.split(",")),
        args.affinity.split(","),
        map(int, args.threads.split(",")),
        map(parse_size, args.sockbuf.split(",")),
        args.sched.split(","),
        [{"no": False, "yes": True}[v] for v in args.copy_in.split(",")],
    )
    configs = list(
        dict.fromkeys(
            Config(
                mode,
                size,
                chunk,
                0 if mode == "sequential" else slots,
                aff,
                thr,
                buf,
                args.netns,
                sched,
                copy_in and mode != "raw",
            )
            for mode, chunk, slots, aff, thr, buf, sched, copy_in in grid
        )
    )
    key = AESGCM.generate_key(256)
    memory = Memory(size)
    results = []
    with network_namespaces(args.netns):
        # Round robin, so that load from elsewhere on the machine spreads evenly.
        samples: dict[Config, list[dict[str, Any]]] = {cfg: [] for cfg in configs}
        for rep in range(args.repeat):
            for n, cfg in enumerate(configs, 1):
                sample = run_once(cfg, memory, key, args.quiet)
                samples[cfg].append(sample)
                if args.progress:
                    print(
                        f"[{rep + 1}/{args.repeat} {n}/{len(configs)}] {cfg.mode} "
                        f"{cfg.chunk >> 10}K x{cfg.slots} {cfg.affinity}/{cfg.sched}: "
                        f"{sample['bytes_per_s'] / (1 << 30):.2f} GiB/s "
                        f"(other load {sample['foreign_cpu_s'] / sample['seconds']:.2f} CPU)",
                        file=sys.stderr,
                        flush=True,
                    )
        for cfg in configs:
            results.append(summarize(cfg, samples[cfg], args.max_foreign))
            print(summary_line(results[-1]), file=sys.stderr, flush=True)
    report = {
        "probe": "transport",
        "machine": {
            "cpus": os.cpu_count(),
            "kernel": platform.release(),
            "python": sys.version.split()[0],
        },
        "size": size,
        "repeat": args.repeat,
        "results": results,
    }

    # Compare each sealed run with the raw and the sequential run of the same setup.
    def setup(r: dict[str, Any], *ignore: str) -> tuple[Any, ...]:
        return tuple(r[k] for k in Config.__dataclass_fields__ if k not in ("mode", *ignore))

    raw = {setup(r): r["bytes_per_s"] for r in results if r["mode"] == "raw"}
    sequential = {
        setup(r, "slots", "sched", "affinity"): r["bytes_per_s"]
        for r in results
        if r["mode"] == "sequential"
    }
    for r in results:
        if r["mode"] != "sealed":
            continue
        if setup(r) in raw:
            r["raw_transport_bytes_per_s"] = raw[setup(r)]
            r["fraction_of_raw"] = r["bytes_per_s"] / raw[setup(r)]
        if setup(r, "slots", "sched", "affinity") in sequential:
            r["speedup_over_sequential"] = (
                r["bytes_per_s"] / sequential[setup(r, "slots", "sched", "affinity")]
            )
    json.dump(report, sys.stdout, indent=1)
    print()
    return 0


def summary_line(r: dict[str, Any]) -> str:
    return (
        f"{r['mode']:<10} chunk={r['chunk'] >> 10:>5}K slots={r['slots']} aff={r['affinity']:<9}"
        f" thr={r['threads']} sockbuf={r['sockbuf'] >> 10}K sched={r['sched']}"
        f"{' copy-in' if r['copy_in'] else ''}"
        f"  {r['bytes_per_s'] / (1 << 30):5.2f} GiB/s"
        f" [{r['bytes_per_s_min'] / (1 << 30):.2f}-{r['bytes_per_s_max'] / (1 << 30):.2f}]"
        f"  overhead {r['overhead_bytes'] / 1024:8.0f} KiB"
        f" ({r['overhead_pct']:.3f} %)  cpu {r['cpu_s_per_gib']:.2f} s/GiB"
        f"  clean {r['clean_runs']}/{len(r['samples'])}  intact={r['intact']}"
    )


if __name__ == "__main__":
    sys.exit(main())
