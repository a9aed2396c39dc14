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

from ...core.rounds import PAGE, StopRules
from ...datapath.engine import DEFAULT_CHUNK, IncomingEnclave, OutgoingEnclave
from ...datapath.live import LiveOutgoingEnclave
from ...errors import ConfigError, MigSGXError
from ...host.client import EnclaveClient
from ..hosts import Deployment, running_services

COLS = 1024
BATCH_PAGES = 32
MODES = ("stop_and_copy", "live")
UNSETTLED = "live_unsettled"  # --ab-settle: live with settle=0, right after each live run
ROUND_FIGURES = ("round", "pages", "bytes", "seconds", "scan_seconds", "tag_seconds")
FIGURES = (
    "downtime_seconds",
    "client_gap_seconds",
    "total_seconds",
    "bytes_sent",
    "bytes_over_size",
    "rounds",
    "verify_seconds",
    "verify_bytes",
    "destination_verify_seconds",
    "downtime_without_verify_seconds",
    "freeze_to_loaded_seconds",
    "commit_seconds",
    "setup_in_downtime_seconds",
    "tracking_overhead",
)


class Writer:
    """The client: ``scribble`` calls at ``rate`` bytes of pages per second, timed."""

    def __init__(self, client: EnclaveClient, rate: int) -> None:
        self.client = client
        self.rate = rate
        self.done: list[tuple[float, float]] = []  # (start, end) of each ECALL
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        period = BATCH_PAGES * PAGE / self.rate if self.rate > 0 else 0.05
        pages = BATCH_PAGES if self.rate > 0 else 0
        seed = 0
        next_at = time.monotonic()
        while not self._stop.is_set():
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
        """The longest pause between returning ECALLs that overlaps [start, end]."""

        ends = [e for _, e in self.done]
        longest = 0.0
        for a, b in itertools.pairwise(ends):
            if b >= start and a <= end:
                longest = max(longest, b - a)
        return longest

    def mean_call(self, start: float, end: float) -> float:
        calls = [e - s for s, e in self.done if s >= start and e <= end]
        return statistics.fmean(calls) if calls else 0.0

    def stop(self) -> None:
        self._stop.set()
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


#: The live freeze on the critical path, in order (``freeze_steps``).
FREEZE_STEPS = (
    "handover", "quiesce", "final_scan", "final_send", "source_digest", "digest_send",
    "destination_tail", "loaded_verify", "decide", "deliver",
)  # fmt: skip


def freeze_steps(
    stats: dict[str, Any], t_freeze: float, t_loaded: float, t_decided: float, t_active: float
) -> dict[str, Any]:
    """Where a live downtime goes: seconds per step from the freeze to the destination running.

    Every process stamps its steps with CLOCK_MONOTONIC (one clock on the
    host), so the source driver's, the source enclave's and this driver's
    steps lie end to end: ``handover`` (the final frame, the ring), the
    enclave's ``quiesce``, ``final_scan`` (the last PAGEMAP_SCAN), ``final_send``
    (last pages and small state into the ring), ``source_digest``,
    ``digest_send`` (until the ring drained), ``destination_tail`` (the
    destination's check and LOADED back), ``loaded_verify``, ``decide`` (the
    durable COMMIT), ``deliver`` (the token until the destination runs).
    ``other`` is what the steps leave out of the downtime.  The destination
    enclave's own steps, which overlap the source's, are under ``destination``.
    """

    timeline = stats.get("timeline", {})
    driver, enclave = timeline.get("source_driver", {}), timeline.get("source_enclave", {})
    try:
        marks = [
            ("handover", t_freeze, enclave["quiesce"][0]),
            *((k, *enclave[k]) for k in FREEZE_STEPS[1:6]),
            ("destination_tail", enclave["digest_send"][1], driver["loaded_wait"][1]),
            ("loaded_verify", *driver["loaded_verify"]),
            ("decide", driver["loaded_verify"][1], t_decided),
            ("deliver", t_decided, t_active),
        ]
    except (KeyError, IndexError, TypeError):
        return {}
    steps: dict[str, Any] = {name: float(b) - float(a) for name, a, b in marks}
    steps["other"] = (t_active - t_freeze) - sum(steps.values())
    dest = stats.get("destination", {}).get("timeline", {}).get("destination_enclave", {})
    steps["destination"] = {k: float(v[1]) - float(v[0]) for k, v in dest.items()}
    return steps


def _step_medians(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median seconds of each freeze step over the runs (``destination`` likewise)."""

    steps = [r["freeze_steps"] for r in runs if r.get("freeze_steps")]
    if not steps:
        return {}
    out: dict[str, Any] = {}
    for key in (*FREEZE_STEPS, "other"):
        values = [s[key] for s in steps if key in s]
        if values:
            out[key] = statistics.median(values)
    dest = [s.get("destination", {}) for s in steps]
    out["destination"] = {k: statistics.median([d[k] for d in dest if k in d]) for k in dest[0]}
    return out


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _paired(settled: list[dict[str, Any]], unsettled: list[dict[str, Any]]) -> dict[str, Any]:
    """Per pair (same repeat, back to back), unsettled over settled; medians and spread."""

    out: dict[str, Any] = {}
    for key in ("downtime_seconds", "final_pages", "rounds", "bytes_sent"):
        ratios = [
            float(u[key]) / float(s[key])
            for s, u in zip(settled, unsettled, strict=True)
            if _number(s.get(key)) and _number(u.get(key)) and s[key]
        ]
        if ratios:
            out[f"{key}_unsettled_over_settled"] = {
                "median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)
            }  # fmt: skip
    return out


def _summary(
    runs: list[dict[str, Any]], keys: tuple[str, ...] = FIGURES
) -> tuple[dict[str, Any], dict[str, Any]]:
    medians: dict[str, Any] = {}
    spread: dict[str, Any] = {}
    for key in keys:
        values = [r[key] for r in runs if isinstance(r.get(key), (int, float))]
        if values:
            medians[key] = statistics.median(values)
            spread[key] = {"min": min(values), "max": max(values)}
    return medians, spread


@contextlib.contextmanager
def _two_hosts() -> Iterator[tuple[Path, list[Path]]]:
    with tempfile.TemporaryDirectory(prefix="migsgx-bench-live-") as tmp:
        dep = Deployment.create(Path(tmp), names=["a", "b"])
        image = dep.signed_image("model")
        with running_services(dep.hosts) as services:
            yield image, [s.socket for s in services]


def run(
    size: int,
    rate: int,
    repeat: int = 3,
    *,
    rules: StopRules | None = None,
    progress: Callable[[str], None] | None = None,
    pid: bool = False,
    ab_settle: bool = False,
) -> dict[str, Any]:
    """Both modes on the same workload, ``repeat`` times each, alternating.

    With ``ab_settle``, each live run is followed by one with ``settle=0``
    (``live_unsettled``: the first round under the target stops), and
    ``settle_ab`` holds the paired ratios (unsettled over settled) of the
    downtime and of the final transfer's pages.

    With ``pid``, then ``repeat`` runs of ``migrate PID --live`` of the model
    app under the same writer (:mod:`.live_pid`: pre-copy of its enclave,
    post-copy of its process; root): ``live_post_copy_pid``.  The default
    stop rules there are ``migrate``'s.
    """

    load_at_start = os.getloadavg()
    size = size // (COLS * 4) * (COLS * 4)
    if not 1 << 20 <= size <= 7 << 30:
        raise ConfigError("--enclave-size must be between 1 MiB and 7 GiB")
    if rate < 0 or repeat < 1:
        raise ConfigError("--dirty-rate must be >= 0 and --repeat >= 1")
    rules = rules or StopRules()
    modes = (*MODES, UNSETTLED) if ab_settle else MODES
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
    unsettled = dataclasses.replace(rules, settle=0.0)
    with _two_hosts() as (image, sockets):
        client = EnclaveClient.launch(image, socket_path=sockets[0])
        try:
            client.ecall.generate(size // (COLS * 4), COLS, 7)
            writer = Writer(client, rate)
            time.sleep(0.5)  # a baseline of ECALL times before any migration
            here = 0
            baseline_end = time.monotonic()
            baseline = writer.mean_call(0.0, baseline_end)
            for _ in range(repeat):
                for mode in modes:
                    figures, sock, source = _migrate(
                        client, writer, sockets[1 - here], mode,
                        unsettled if mode == UNSETTLED else rules, progress,
                    )  # fmt: skip
                    client.reattach(sock)
                    source.release()
                    here = 1 - here
                    t_start, t_end, t_rounds_end = figures.pop("_window")
                    time.sleep(0.3)  # the client runs on the destination for a while
                    figures["client_gap_seconds"] = writer.gap(t_start, t_end)
                    figures["bytes_over_size"] = figures["bytes_sent"] / size
                    if mode.startswith("live") and baseline > 0:
                        during = writer.mean_call(t_start, t_rounds_end)
                        figures["tracking_overhead"] = during / baseline if during else None
                    runs[mode].append(figures)
            writer.stop()
        finally:
            client.destroy()
    out: dict[str, Any] = {
        "enclave_bytes": size,
        "dirty_rate_bytes_per_s": rate,
        "chunk_bytes": DEFAULT_CHUNK,
        "repeat": repeat,
        "rules": rules.__dict__,
    }
    for mode in modes:
        medians, spread = _summary(runs[mode])
        out[mode] = {**medians, "spread": spread, "runs": runs[mode]}
        if mode.startswith("live"):
            out[mode]["freeze_steps"] = _step_medians(runs[mode])
    if ab_settle:
        out["settle_ab"] = _paired(runs["live"], runs[UNSETTLED])
    if pid:
        from .live_pid import FIGURES as PID_FIGURES
        from .live_pid import run_pid

        pid_runs = run_pid(size, rate, repeat)
        medians, spread = _summary(pid_runs, PID_FIGURES)
        out["live_post_copy_pid"] = {**medians, "spread": spread, "runs": pid_runs}
        if progress is not None:
            progress(f"pid --live: downtime {medians.get('downtime_seconds', 0):.3f} s, "
                     f"window {medians.get('post_copy_window_seconds', 0):.3f} s")  # fmt: skip
    sc, lv = out["stop_and_copy"]["downtime_seconds"], out["live"]["downtime_seconds"]
    out["live_over_stop_and_copy_downtime"] = lv / sc if sc else None
    out["machine"] = {
        "cpus": os.cpu_count(),
        "kernel": os.uname().release,
        "loadavg_at_start": load_at_start,
        "loadavg_at_end": os.getloadavg(),
    }
    return out
