"""``migsgx bench live``: live (pre-copy) against stop-and-copy enclave migration.

One invocation, two emulated hosts (two platform services, different root
secrets) joined by TCP on loopback, real enclave processes.  The model enclave
holds SIZE of weights; a client thread keeps changing random pages of them
through ECALLs (``scribble``) at a set rate, and records when each call
returns.  The same enclave then migrates back and forth between the hosts,
alternating stop-and-copy and live, ``repeat`` times each.  Per run:

* ``downtime_seconds``: from the freeze (the application hands its enclave
  connection over; ECALLs wait) to the destination enclave running (COMMIT
  verified there);
* ``client_gap_seconds``: the longest time between two returning ECALLs of the
  client during the migration (what the client feels);
* ``total_seconds``: from the first byte offered to the destination running;
* ``bytes_sent`` (and ÷ enclave size), ``rounds``, ``stop_rule``;
* ``verify_seconds``: the source's part of the memory digest check after the
  freeze (the segments its write log names since the rounds tagged them;
  ``verify_bytes`` read), inside the live downtime, reported apart (with
  ``downtime_without_verify_seconds``; the destination's part,
  ``destination_verify_seconds``, overlaps it);
  ``freeze_to_loaded_seconds`` and ``commit_seconds`` split the downtime;
  ``setup_in_downtime_seconds`` is the destination launch and handshake that
  today's stop-and-copy runs after the freeze;
* tracking overhead: the client's mean ECALL time while the rounds run, over
  its mean before the migration;
* ``freeze_steps`` (live): where the downtime goes, step by step on the
  critical path (:func:`freeze_steps`), and the destination enclave's own
  steps beside them; the mode's ``freeze_steps`` holds each step's median;
* with ``pid``, ``live_post_copy_pid``: ``migrate PID --live`` of the model
  app under the same writer (:mod:`.live_pid`), with its post-copy window.

Figures are medians with min/max over the runs (``spread``), every run kept
in ``runs``.  Not a test: numbers only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import socket
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...core.stoprules import PAGE, StopRules
from ...datapath.incoming import IncomingEnclave
from ...datapath.live import LiveOutgoingEnclave
from ...datapath.outgoing import OutgoingEnclave
from ...errors import ConfigError, MigSGXError
from ...host.client import EnclaveClient
from ...limits import DEFAULT_CHUNK_SIZE
from ..hosts import Deployment, running_services
from .live_figures import freeze_steps, paired, step_medians, summary

COLS = 1024
BATCH_PAGES = 32
MODES = ("stop_and_copy", "live")
UNSETTLED = "live_unsettled"  # --ab-settle: live with settle=0, right after each live run
ROUND_FIGURES = ("round", "pages", "bytes", "seconds", "scan_seconds", "tag_seconds")


class Writer:
    """The client: ``scribble`` calls at ``rate`` bytes of pages per second, timed."""

    def __init__(self, client: EnclaveClient, rate: int, *, paused: bool = False) -> None:
        self.client = client
        self.rate = rate
        self.done: list[tuple[float, float]] = []  # (start, end) of each ECALL
        self.resumed: list[float] = []  # when each stretch of calls began (after a pause)
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._running = threading.Event()
        if not paused:
            self._running.set()
        self._thread = threading.Thread(target=self._run, name="bench-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        period = BATCH_PAGES * PAGE / self.rate if self.rate > 0 else 0.05
        pages = BATCH_PAGES if self.rate > 0 else 0
        seed = 0
        next_at = time.monotonic()
        while not self._stop.is_set():
            if not self._running.is_set():
                self._running.wait(0.1)
                next_at = time.monotonic()
                continue
            t0 = time.monotonic()
            try:
                self.client.ecall.scribble(pages, seed)
            except BaseException as exc:
                self.error = exc
                return
            self.done.append((t0, time.monotonic()))
            seed += 1
            next_at += period
            pause = next_at - time.monotonic()
            if pause > 0:
                self._stop.wait(pause)
            else:
                next_at = time.monotonic()  # behind: do not burst to catch up

    def gap(self, start: float, end: float) -> float:
        """The longest pause between returning ECALLs that overlaps [start, end].

        Only calls since the writer last resumed before ``start`` count: the time
        it was paused (another enclave's turn to move) is not a gap the client saw.
        """

        since = max((r for r in self.resumed if r <= start), default=float("-inf"))
        ends = [e for _, e in self.done if e >= since]
        longest = 0.0
        for a, b in itertools.pairwise(ends):
            if b >= start and a <= end:
                longest = max(longest, b - a)
        return longest

    def mean_call(self, start: float, end: float) -> float:
        calls = [e - s for s, e in self.done if s >= start and e <= end]
        return statistics.fmean(calls) if calls else 0.0

    def pause(self) -> None:
        """No more calls after the one in flight (another enclave's turn to move)."""

        self._running.clear()

    def resume(self) -> None:
        self.resumed.append(time.monotonic())
        self._running.set()

    def stop(self) -> None:
        self._stop.set()
        self._running.set()
        self._thread.join(60)
        if self.error is not None:
            raise MigSGXError(f"the benchmark's client failed: {self.error}") from self.error


@dataclass
class _Destination:
    """IncomingEnclave in a thread; notes the moment the destination enclave runs."""

    platform_socket: Path
    listener: socket.socket = field(init=False)
    sock: socket.socket | None = None
    incoming: IncomingEnclave | None = None
    active_at: float = 0.0
    error: BaseException | None = None

    def __post_init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self._thread = threading.Thread(target=self._run, name="bench-destination", daemon=True)
        self._thread.start()

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.listener.getsockname()[:2]
        return str(host), int(port)

    def _run(self) -> None:
        try:
            conn, _ = self.listener.accept()
            self.incoming, offer = IncomingEnclave.accept_offer(conn, self.platform_socket)
            self.incoming.receive(conn, offer)
            self.sock = self.incoming.wait_commit(timeout=600)
            self.active_at = time.monotonic()
        except BaseException as exc:
            self.error = exc
        finally:
            self.listener.close()

    def join(self) -> socket.socket:
        self._thread.join(600)
        if self.error is not None or self.sock is None:
            raise MigSGXError(f"the destination failed: {self.error}") from self.error
        return self.sock


def _migrate(
    client: EnclaveClient,
    writer: Writer,
    to_socket: Path,
    mode: str,
    rules: StopRules,
    progress: Callable[[str], None] | None,
) -> tuple[dict[str, Any], socket.socket, OutgoingEnclave]:
    dest = _Destination(to_socket)
    peer = socket.create_connection(dest.address, timeout=30)
    t_start = time.monotonic()
    try:
        if mode.startswith("live"):
            live = LiveOutgoingEnclave(
                client.open_side_channel(), client.info, client.image_files, rules=rules
            )
            out: OutgoingEnclave = live
            pre = live.precopy(peer)
            t_rounds_end = time.monotonic()
            t_freeze = time.monotonic()
            stats = live.finish(client.detach())
        else:
            t_rounds_end = t_start
            t_freeze = time.monotonic()
            out = OutgoingEnclave(client.detach(), client.info, client.image_files)
            stats = out.transfer(peer)
            pre = {}
        t_loaded = time.monotonic()
        # As the tool does: the source enclave is released (wiped, gone) only
        # after the application runs on at the destination, off the client's path.
        out.decide()
        t_decided = time.monotonic()
        out.deliver()
    finally:
        with contextlib.suppress(OSError):
            peer.close()
    sock = dest.join()
    downtime = dest.active_at - t_freeze
    final = stats.get("final", {})
    dest_final = stats.get("destination", {})
    rounds = pre.get("rounds", [])
    figures = {
        "downtime_seconds": downtime,
        "total_seconds": dest.active_at - t_start,
        "bytes_sent": stats["bytes"],
        "rounds": len(rounds),
        "stop_rule": pre.get("stop_rule"),
        # The memory digest check: the source's pass is inside the downtime, the
        # destination's runs at the same time (docs/spec/precopy.md, section 3).
        "verify_seconds": final.get("verify_seconds", 0.0),
        "verify_bytes": final.get("verify_bytes", 0),
        "destination_verify_seconds": dest_final.get("verify_seconds", 0.0),
        "downtime_without_verify_seconds": downtime - final.get("verify_seconds", 0.0),
        # Where the downtime goes: up to the verified LOADED, then the commit.
        "freeze_to_loaded_seconds": t_loaded - t_freeze,
        "commit_seconds": dest.active_at - t_loaded,
        # Stop-and-copy as migsgx runs it today launches the destination enclave
        # and runs the handshake after the freeze; this part of it could move out.
        "setup_in_downtime_seconds": (
            0.0 if mode.startswith("live") else stats["launch_seconds"] + stats["handshake_seconds"]
        ),
        "final_pages": final.get("final_pages"),
        "digest_bytes": final.get("digest_bytes"),
        "freeze_steps": (
            freeze_steps(stats, t_freeze, t_loaded, t_decided, dest.active_at)
            if mode.startswith("live")
            else None
        ),
        # A repair round (precopy.md, 3.3) only follows a hidden write: None here.
        "repair": stats.get("repair"),
        "_window": (t_start, dest.active_at, t_rounds_end),
        "per_round": [{k: r.get(k) for k in ROUND_FIGURES} for r in rounds],
    }
    if progress is not None:
        progress(f"{mode}: downtime {downtime:.3f} s, {len(rounds)} rounds")
    return figures, sock, out


@contextlib.contextmanager
def _two_hosts() -> Iterator[tuple[Path, list[Path]]]:
    with tempfile.TemporaryDirectory(prefix="migsgx-bench-live-") as tmp:
        dep = Deployment.create(Path(tmp), names=["a", "b"])
        image = dep.signed_image("model")
        with running_services(dep.hosts) as services:
            yield image, [s.socket for s in services]


@dataclass
class _Workload:
    """One size: its enclave (on host ``here``), its writer, its runs per mode."""

    size: int
    client: EnclaveClient
    writer: Writer
    baseline: float
    runs: dict[str, list[dict[str, Any]]]
    here: int = 0


def _one_mode(
    w: _Workload, sockets: list[Path], mode: str, rules: StopRules,
    progress: Callable[[str], None] | None,
) -> None:  # fmt: skip
    figures, sock, source = _migrate(w.client, w.writer, sockets[1 - w.here], mode, rules,
                                     progress)  # fmt: skip
    w.client.reattach(sock)
    source.release()
    w.here = 1 - w.here
    t_start, t_end, t_rounds_end = figures.pop("_window")
    time.sleep(0.3)  # the client runs on the destination for a while
    figures["client_gap_seconds"] = w.writer.gap(t_start, t_end)
    figures["bytes_over_size"] = figures["bytes_sent"] / w.size
    if mode.startswith("live") and w.baseline > 0:
        during = w.writer.mean_call(t_start, t_rounds_end)
        figures["tracking_overhead"] = during / w.baseline if during else None
    figures["loadavg"] = os.getloadavg()
    w.runs[mode].append(figures)


def run_sizes(
    sizes: list[int],
    rate: int,
    repeat: int = 3,
    *,
    rules: StopRules | None = None,
    progress: Callable[[str], None] | None = None,
    pid: bool = False,
    ab_settle: bool = False,
) -> list[dict[str, Any]]:
    """Both modes on the same workload, for every size, ``repeat`` times, interleaved.

    Every size's enclave lives on the same two hosts at once; repeat ``i``
    migrates each size in turn (stop-and-copy, then live), so that a ratio
    between sizes pairs runs that saw the same machine
    (:func:`~.live_figures.size_ratio`).  Only the enclave that moves has
    its writer running.

    With ``ab_settle``, each live run is followed by one with ``settle=0``
    (``live_unsettled``: the first round under the target stops), and
    ``settle_ab`` holds the paired ratios (unsettled over settled) of the
    downtime and of the final transfer's pages.  With ``pid``, then
    ``repeat`` runs of ``migrate PID --live`` of the model app under the same
    writer per size (:mod:`.live_pid`: pre-copy of its enclave, post-copy of
    its process; root): ``live_post_copy_pid``, with ``migrate``'s default
    stop rules.
    """

    load_at_start = os.getloadavg()
    sizes = [size // (COLS * 4) * (COLS * 4) for size in sizes]
    if not sizes or not all(1 << 20 <= size <= 7 << 30 for size in sizes):
        raise ConfigError("--enclave-size must be between 1 MiB and 7 GiB")
    if rate < 0 or repeat < 1:
        raise ConfigError("--dirty-rate must be >= 0 and --repeat >= 1")
    rules = rules or StopRules()
    modes = (*MODES, UNSETTLED) if ab_settle else MODES
    unsettled = dataclasses.replace(rules, settle=0.0)
    loads: list[_Workload] = []
    with _two_hosts() as (image, sockets):
        try:
            for size in sizes:
                client = EnclaveClient.launch(image, socket_path=sockets[0])
                writer = Writer(client, rate, paused=True)
                loads.append(_Workload(size, client, writer, 0.0, {m: [] for m in modes}))
                client.ecall.generate(size // (COLS * 4), COLS, 7)
            for w in loads:
                w.writer.resume()
                time.sleep(0.5)  # a baseline of ECALL times before any migration
                w.baseline = w.writer.mean_call(0.0, time.monotonic())
                w.writer.pause()
            for _ in range(repeat):
                for w in loads:
                    w.writer.resume()
                    for mode in modes:
                        _one_mode(w, sockets, mode,
                                  unsettled if mode == UNSETTLED else rules, progress)  # fmt: skip
                    w.writer.pause()
            for w in loads:
                w.writer.stop()
        finally:
            for w in loads:
                with contextlib.suppress(MigSGXError, OSError):
                    w.client.destroy()
    results = []
    for w in loads:
        out: dict[str, Any] = {
            "enclave_bytes": w.size,
            "dirty_rate_bytes_per_s": rate,
            "chunk_bytes": DEFAULT_CHUNK_SIZE,
            "repeat": repeat,
            "rules": rules.__dict__,
        }
        for mode in modes:
            medians, spread = summary(w.runs[mode])
            out[mode] = {**medians, "spread": spread, "runs": w.runs[mode]}
            if mode.startswith("live"):
                out[mode]["freeze_steps"] = step_medians(w.runs[mode])
        if ab_settle:
            out["settle_ab"] = paired(w.runs["live"], w.runs[UNSETTLED])
        sc, lv = out["stop_and_copy"]["downtime_seconds"], out["live"]["downtime_seconds"]
        out["live_over_stop_and_copy_downtime"] = lv / sc if sc else None
        results.append(out)
    if pid:
        from .live_pid import FIGURES as PID_FIGURES
        from .live_pid import run_pid

        for out in results:
            pid_runs = run_pid(out["enclave_bytes"], rate, repeat)
            medians, spread = summary(pid_runs, PID_FIGURES)
            out["live_post_copy_pid"] = {**medians, "spread": spread, "runs": pid_runs}
            if progress is not None:
                progress(f"pid --live: downtime {medians.get('downtime_seconds', 0):.3f} s, "
                         f"window {medians.get('post_copy_window_seconds', 0):.3f} s")  # fmt: skip
    machine = {
        "cpus": os.cpu_count(),
        "kernel": os.uname().release,
        "uptime_seconds": float(Path("/proc/uptime").read_text().split()[0]),
        "loadavg_at_start": load_at_start,
        "loadavg_at_end": os.getloadavg(),
    }
    for out in results:
        out["machine"] = machine
    return results


def run(size: int, rate: int, repeat: int = 3, **options: Any) -> dict[str, Any]:
    """One size (:func:`run_sizes`)."""

    return run_sizes([size], rate, repeat, **options)[0]
