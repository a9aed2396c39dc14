"""``migsgx bench state``: pipelined against sequential enclave-state migration.

One invocation runs, on two emulated hosts (two platform services, different
root secrets) connected by TCP on loopback, with real enclave processes:

* a pipelined migration of an enclave holding SIZE of secret weights;
* a sequential migration (dump all, then transfer all, then load all) of the
  same state;
* the raw transport: the same datapath (enclave-side fill and drain loops,
  rings, drivers, TCP, fresh destination memory faulted in beside the load)
  with the cipher replaced by a copy, in four processes without enclaves;
* the machine's single-core AES-256-GCM speed.

``seconds`` runs from the source's freeze to the destination running (dump,
transfer, load, LOADED, COMMIT); ``total_seconds`` adds the destination
enclave's launch and the attested handshake, which happen before the freeze.

Memory overhead (``peak_extra_bytes``) is summed over every process that takes
part (source enclave, source end, destination end, destination enclave):
its peak resident set during the migration above its resident set at rest (just
before, on the source side; just after its launch for the destination enclave,
less the enclave memory it loaded, which is the state and not overhead), less
the pages of library code it faulted in meanwhile (``code_faulted_bytes``,
reported beside it: see :mod:`migsgx.lab.memstat`).
Peaks are reset through ``/proc/PID/clear_refs``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import IO, Any

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ...core.stream import TAG_SIZE
from ...errors import ConfigError, MigSGXError
from ...limits import DEFAULT_CHUNK_SIZE, DEFAULT_SLOTS
from .. import memstat
from ..hosts import Deployment, running_services
from .bound import pipeline_bound, process_cpu, process_switches, stage_cpu
from .figures import cpu_seconds, loadavg, machine_state, shift_timeline, summarize
from .sched import set_policy

PAGE = 4096
ENCLAVES = ("source_enclave", "destination_enclave")


class Worker:
    def __init__(self, role: str, args: dict[str, Any]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "migsgx.lab.bench.state_worker", role, json.dumps(args)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def ask(self, **msg: Any) -> None:
        stdin: IO[str] | None = self.proc.stdin
        assert stdin is not None
        stdin.write(json.dumps(msg) + "\n")
        stdin.flush()

    def answer(self) -> dict[str, Any]:
        stdout: IO[str] | None = self.proc.stdout
        assert stdout is not None
        line = stdout.readline()
        if not line:
            code = self.proc.wait()
            raise MigSGXError(f"benchmark worker exited with {code}")
        reply: dict[str, Any] = json.loads(line)
        return reply

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.ask(quit=True)
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()


@contextmanager
def workers() -> Iterator[list[Worker]]:
    started: list[Worker] = []
    try:
        yield started
    finally:
        for w in started:
            w.stop()


def migrate_once(
    image: Path,
    sock_a: Path,
    sock_b: Path,
    size: int,
    chunk: int,
    slots: int,
    mode: str,
    *,
    prefault: bool = False,
    ahead: bool = True,
    policy: str = "",
    huge: bool = False,
) -> dict[str, Any]:
    with workers() as live:
        src = Worker("source", {"image": str(image), "socket": str(sock_a), "size": size})
        live.append(src)
        pidfile = Path(tempfile.mkdtemp(prefix="migsgx-bench-pid-")) / "destination-enclave"
        dst = Worker("dest", {"socket": str(sock_b), "prefault": prefault, "ahead": ahead,
                              "pidfile": str(pidfile), "policy": policy, "huge": huge})  # fmt: skip
        live.append(dst)
        ready = src.answer()
        port = dst.answer()["port"]
        src_enclave = ready["enclave_pid"]
        if policy:
            # (A/B) every process of the migration; the destination enclave at its launch.
            for pid in (src.proc.pid, src_enclave, dst.proc.pid):
                set_policy(pid, policy)
        window = memstat.PeakWindow.start([src.proc.pid, src_enclave, dst.proc.pid])
        shared = memstat.SharedSampler([src.proc.pid, src_enclave, dst.proc.pid],
                                       discover=partial(_pid_in, pidfile))  # fmt: skip
        cpu0 = {pid: cpu_seconds(pid) for pid in (src.proc.pid, src_enclave, dst.proc.pid)}
        faults0 = {pid: memstat.minor_faults(pid) for pid in (src.proc.pid, dst.proc.pid)}
        events0 = memstat.kernel_events()
        src.ask(migrate=True, port=port, chunk=chunk, slots=slots, mode=mode)
        loaded = src.answer()
        dst_loaded = dst.answer()
        events = memstat.kernel_events()
        faults = {
            "source_driver": memstat.minor_faults(src.proc.pid) - faults0[src.proc.pid],
            "destination_driver": memstat.minor_faults(dst.proc.pid) - faults0[dst.proc.pid],
        }
        # The source enclave exits at the commit: read its figures while it lives.
        shared.stop()
        shutil.rmtree(pidfile.parent, ignore_errors=True)
        source_side = window.overhead()
        code: dict[int | str, int] = {
            pid: window.code_faulted(pid) for pid in (src.proc.pid, src_enclave)
        }
        cpu = {"source_enclave": cpu_seconds(src_enclave) - cpu0[src_enclave]}
        dst_enclave = dst_loaded["enclave_pid"]
        src.ask(commit=True)
        done = src.answer()
        active = dst.answer()
        dest_driver = window.overhead_of(dst.proc.pid)
        code[dst.proc.pid] = window.code_faulted(dst.proc.pid)
        # The destination enclave from just after its launch: what it holds
        # beyond the state it loaded (memory_bytes, fresh pages) and the code
        # it ran for the first time.
        rest = dst_loaded["enclave_rest"]
        launch = memstat.PeakWindow({dst_enclave: rest["rss"]}, {dst_enclave: rest["file"]})
        code["destination_enclave"] = launch.code_faulted(dst_enclave)
        dest_enclave = max(0, launch.overhead_of(dst_enclave) - _pages(stats_memory(loaded)))
        # Each shared page (the rings) by its share, as Pss counts it: once in the sum.
        dest_shared = shared.discount(dst_enclave)
        cpu["source_driver"] = cpu_seconds(src.proc.pid) - cpu0[src.proc.pid]
        cpu["destination_driver"] = cpu_seconds(dst.proc.pid) - cpu0[dst.proc.pid]
        cpu["destination_enclave"] = cpu_seconds(dst_enclave)  # since its launch
        if active["digest"] != ready["digest"]:
            raise MigSGXError("the migrated state differs from the source's")
        rss_by_process = {
            "source_driver": source_side[src.proc.pid],
            "source_enclave": source_side[src_enclave],
            "destination_driver": dest_driver,
            "destination_enclave": dest_enclave,
        }
        discount = {
            "source_driver": shared.discount(src.proc.pid),
            "source_enclave": shared.discount(src_enclave),
            "destination_driver": shared.discount(dst.proc.pid),
            "destination_enclave": dest_shared,
        }
        per_process = {k: max(0, v - discount[k]) for k, v in rss_by_process.items()}
        code_by_process = {
            "source_driver": code[src.proc.pid],
            "source_enclave": code[src_enclave],
            "destination_driver": code[dst.proc.pid],
            "destination_enclave": code["destination_enclave"],
        }
        stats = dict(loaded["stats"])
        switches = process_switches(stats)
        raw_timeline = dict(stats.pop("timeline", {}))
        raw_timeline.update(stats.get("destination", {}).pop("timeline", {}))
        raw_timeline.setdefault("source_driver", {}).update(
            commit=done["commit"], release=done["release"]
        )
        return {
            # From the source's freeze (quiesce, dump) to the destination running
            # (LOADED verified, COMMIT delivered and confirmed ``active``): the
            # stop-and-copy of the state.  The source's release (its wipe) follows,
            # while the destination already runs: ``seconds_to_release`` includes it.
            "seconds": stats["transfer_seconds"] + done["active_seconds"],
            "seconds_to_release": stats["transfer_seconds"] + done["commit_seconds"],
            # Everything, including the destination enclave's launch and the
            # attested handshake, which happen while the source still serves.
            "total_seconds": done["seconds"],
            "transfer_seconds": stats["transfer_seconds"],
            # From LOADED: decide, deliver and the source's release (its wipe).
            "commit_seconds": done["commit_seconds"],
            "active_seconds": done["active_seconds"],
            # Shared pages by their share (Pss): the memory the machine gave up.
            "peak_extra_bytes": sum(per_process.values()),
            "peak_extra_by_process": per_process,
            # The same with shared pages whole in every process that maps them (VmHWM).
            "peak_extra_rss_bytes": sum(rss_by_process.values()),
            "peak_extra_rss_by_process": rss_by_process,
            # Libraries' code faulted in during the window (page cache, shared):
            # not in peak_extra_bytes; with it, the peaks as VmHWM shows them.
            "code_faulted_bytes": sum(code_by_process.values()),
            "code_faulted_by_process": code_by_process,
            "cpu_seconds": sum(cpu.values()),
            "cpu_by_process": cpu,
            # The frozen window's alone (freeze to LOADED), by process and by stage.
            "window_cpu_by_process": process_cpu(stats),
            "window_cpu_by_stage": stage_cpu(stats),
            # How often each process slept and woke (or was preempted) in that window.
            "window_switches_by_process": switches,
            "switches_per_chunk": sum(switches.values()) / max(1, -(-size // chunk)),
            # Of the destination enclave's, what its launch took (before the handshake).
            "destination_enclave_launch_cpu_seconds": float(dst_loaded["enclave_launch_cpu"]),
            # What a first touch cost beyond its faults would show in (the drivers' page
            # faults from before the handshake to LOADED; the machine's kernel counters
            # over the same span, other users' included).
            "minor_faults_by_process": faults,
            "kernel_events": {k: v - events0.get(k, 0) for k, v in events.items()},
            "phases": stats,
            "timeline": shift_timeline(raw_timeline),
        }


def _pid_in(path: Path) -> dict[int, int]:
    """The destination enclave's pid and its shared pages at rest, once its worker wrote them."""

    try:
        pid, rest = (int(x) for x in path.read_text().split())
    except (OSError, ValueError):
        return {}  # not yet (or half written)
    return {pid: rest}


def stats_memory(loaded: dict[str, Any]) -> int:
    """The enclave memory in use that the migration carried (the source's dump says)."""

    return int(loaded["stats"]["memory_bytes"])


def _pages(n: int) -> int:
    return (n + PAGE - 1) // PAGE * PAGE


def raw_transport(size: int, chunk: int, slots: int) -> float:
    with workers() as live:
        recv = Worker("raw-recv", {"size": size, "chunk": chunk, "slots": slots})
        live.append(recv)
        port = recv.answer()["port"]
        send = Worker("raw-send", {"size": size, "chunk": chunk, "slots": slots, "port": port})
        live.append(send)
        send.answer()
        send.ask(go=True)
        seconds = float(recv.answer()["seconds"])
        send.answer()
        return size / seconds


def aes_gcm_speed(chunk: int, total: int = 256 << 20) -> float:
    """Single-core AES-256-GCM ``encrypt_into`` over cold buffers, bytes per second."""

    aead = AESGCM(AESGCM.generate_key(bit_length=256))
    src = bytearray(os.urandom(1 << 20)) * max(1, total >> 20)
    out = bytearray(chunk + TAG_SIZE)
    view = memoryview(src)
    nonce = bytes(12)
    t0 = time.perf_counter()
    outv = memoryview(out)
    for off in range(0, len(src), chunk):
        piece = view[off : off + chunk]
        aead.encrypt_into(nonce, piece, None, outv[: len(piece) + TAG_SIZE])
    return len(src) / (time.perf_counter() - t0)


def one_run(
    image: Path,
    sock_a: Path,
    sock_b: Path,
    size: int,
    chunk: int,
    slots: int,
    ab_prefault: bool,
    ab_policy: str = "",
    flip: bool = False,
    ab_huge_pages: bool = False,
) -> dict[str, Any]:
    """Pipelined, sequential and raw transport side by side (those two first with ``flip``).

    With ``ab_prefault``, also a pipelined run whose destination does not
    fault its memory in ahead (from its launch, on the offer's hint; on by
    default), next to the pipelined one (A/B): ``pipelined_without_prefault``,
    ``prefault_speedup`` = seconds without / with, ``prefault_cpu_ratio`` =
    frozen-window CPU without / with.  With ``ab_policy``, also a pipelined
    run with every process under that scheduling policy: ``pipelined_POLICY``,
    ``POLICY_speedup`` and
    ``POLICY_cpu_ratio`` (frozen-window CPU with / without).  The variants run
    after the plain pipelined run, or before it with ``flip`` (every other run:
    a load that drifts through the invocation then favours neither side).
    With ``ab_huge_pages``, also a pipelined run whose destination enclave loads
    into 2 MiB pages: ``pipelined_huge_pages``, ``huge_pages_speedup`` (seconds,
    4 KiB / 2 MiB: above 1, huge pages helped), ``huge_pages_total_speedup``
    (with the launch, the handshake and the prefault ahead) and
    ``huge_pages_cpu_ratio`` (frozen-window CPU, the same way).
    """

    extra: dict[str, Any] = {}
    once = partial(migrate_once, image, sock_a, sock_b, size, chunk, slots, "pipelined")
    variants: list[tuple[str, dict[str, Any]]] = []
    if ab_prefault:
        variants.append(("pipelined_without_prefault", {"ahead": False}))
    if ab_policy:
        variants.append((f"pipelined_{ab_policy}", {"policy": ab_policy}))
    if ab_huge_pages:
        variants.append(("pipelined_huge_pages", {"huge": True}))
    seq = partial(migrate_once, image, sock_a, sock_b, size, chunk, slots, "sequential")
    if flip:  # the baselines, then the variants, before the pipelined run
        sequential, raw = seq(), raw_transport(size, chunk, slots)
        extra.update((name, once(**kw)) for name, kw in variants)
    pipelined = once()
    if not flip:
        extra.update((name, once(**kw)) for name, kw in variants)
        sequential, raw = seq(), raw_transport(size, chunk, slots)
    plain_cpu = sum(pipelined["window_cpu_by_process"].values())
    if ab_prefault:
        without = extra["pipelined_without_prefault"]
        extra["prefault_speedup"] = without["seconds"] / pipelined["seconds"]
        extra["prefault_cpu_ratio"] = sum(without["window_cpu_by_process"].values()) / plain_cpu
    if ab_policy:
        with_it = extra[f"pipelined_{ab_policy}"]
        extra[f"{ab_policy}_speedup"] = pipelined["seconds"] / with_it["seconds"]
        extra[f"{ab_policy}_cpu_ratio"] = sum(with_it["window_cpu_by_process"].values()) / plain_cpu
    if ab_huge_pages:
        huge = extra["pipelined_huge_pages"]
        extra["huge_pages_speedup"] = pipelined["seconds"] / huge["seconds"]
        extra["huge_pages_total_speedup"] = pipelined["total_seconds"] / huge["total_seconds"]
        extra["huge_pages_cpu_ratio"] = plain_cpu / sum(huge["window_cpu_by_process"].values())
    if variants:
        extra["variants_first"] = flip
    bound = pipeline_bound(pipelined, sequential, len(os.sched_getaffinity(0)))
    by_process = pipelined["peak_extra_by_process"]
    return {
        "pipelined": pipelined,
        "sequential": sequential,
        "raw_transport_bytes_per_s": raw,
        "baselines_first": flip,
        "sequential_over_pipelined": sequential["seconds"] / pipelined["seconds"],
        # The same up to the source's release (its wipe of the enclave's memory).
        "sequential_over_pipelined_to_release": (
            sequential["seconds_to_release"] / pipelined["seconds_to_release"]
        ),
        # What the cores allow, from this pair's CPU (migsgx.lab.bench.bound).
        "bound": bound,
        "pipelined_bytes_per_s": size / pipelined["transfer_seconds"],
        "pipelined_share_of_raw": size / pipelined["transfer_seconds"] / raw,
        "peak_extra_share": pipelined["peak_extra_bytes"] / size,
        "peak_extra_rss_share": pipelined["peak_extra_rss_bytes"] / size,
        # Each enclave's own, the larger of the two (the rest is the drivers').
        "peak_extra_enclave_share": max(by_process[k] for k in ENCLAVES) / size,
        "loadavg": loadavg(),
        **extra,
    }


def run(
    size: int,
    chunk: int = DEFAULT_CHUNK_SIZE,
    slots: int = DEFAULT_SLOTS,
    *,
    repeat: int = 3,
    ab_prefault: bool = False,
    ab_policy: str = "",
    ab_huge_pages: bool = False,
) -> dict[str, Any]:
    """``repeat`` paired runs in one invocation: medians on top, ``runs``, ``spread``."""

    if os.geteuid() != 0:
        raise ConfigError("bench state resets peak memory through /proc: run it as root")
    size = size // (1024 * 4) * (1024 * 4)
    if not 1 << 20 <= size <= 7 << 30:
        raise ConfigError("--size must be between 1 MiB and 7 GiB")
    if not 4096 <= chunk <= 16 << 20:
        raise ConfigError("--chunk must be between 4 KiB and 16 MiB")
    if repeat < 1:
        raise ConfigError("--repeat must be at least 1")
    before = loadavg()
    runs = []
    with tempfile.TemporaryDirectory(prefix="migsgx-bench-") as tmp:
        dep = Deployment.create(Path(tmp), names=["a", "b"])
        image = dep.signed_image("model")
        with running_services(dep.hosts) as (host_a, host_b):
            for i in range(repeat):
                one = one_run(image, host_a.socket, host_b.socket, size, chunk, slots,
                              ab_prefault, ab_policy, flip=i % 2 == 1,
                              ab_huge_pages=ab_huge_pages)  # fmt: skip
                runs.append(one)
    result = summarize(runs)
    result.update(
        enclave_bytes=size,
        chunk_bytes=chunk,
        ring_slots=slots,
        repeat=repeat,
        aes_gcm_bytes_per_s=aes_gcm_speed(chunk, max(16 << 20, min(size, 256 << 20))),
        machine=machine_state(before),
    )
    return result


def median_run(result: dict[str, Any], key: str = "pipelined") -> dict[str, Any]:
    """The run whose ``key`` seconds is the median (for the timeline plot)."""

    runs: list[dict[str, Any]] = result["runs"]
    ordered = sorted(runs, key=lambda r: float(r[key]["seconds"]))
    return ordered[len(ordered) // 2]


def plot(result: dict[str, Any], path: Path) -> None:
    """Timelines of the median pipelined and sequential runs, one panel each."""

    from .plot import plot_timelines

    size = result["enclave_bytes"] / (1 << 30)
    panels = []
    for mode in ("pipelined", "sequential"):
        r = median_run(result, mode)[mode]
        title = (f"{mode}, {size:.2f} GiB, chunk {result['chunk_bytes'] >> 10} KiB x "
                 f"{result['ring_slots']} slots: {r['seconds']:.2f} s frozen, "
                 f"cpu {r['cpu_seconds']:.2f} s (median run)")  # fmt: skip
        panels.append((title, r["timeline"], r["cpu_by_process"]))
    plot_timelines(panels, path)
