"""The best sequential/pipelined ratio a machine allows, from the CPU each stage spent.

A migration's frozen window has three CPU-bound stages, each in processes of
its own: *dump* (the source enclave seals chunks), *transfer* (the two drivers
move them over TCP: the sender copies into the socket, the receiver out of it)
and *load* (the destination enclave copies each slot privately, opens it into
its memory, faulting that memory in).  Sequential mode runs them one after the
other; pipelined mode overlaps them.  On ``cores`` cores a pipeline of
single-threaded processes cannot finish before

* its busiest process has run (each process is one thread on the data path), nor
* the total CPU spread over every core,

so ``best = max(busiest process, total / cores) + fixed``, where ``fixed`` is
what neither mode can overlap (the commit round trips after LOADED, up to the
destination's ``active``).

The same reasoning gives the sequential mode's floor, phase by phase (each
phase overlaps two processes: the enclave sealing beside the driver's drain
into staging, the send beside the receive, the ring's fill beside the
opening).  ``cpu_ratio`` = sequential floor / pipelined floor is the ratio a
quiet machine would show if both ran at their floors: unlike wall seconds, CPU
seconds hardly change with the machine's load, so this is the figure to read
on a loaded machine.  The best
ratio is then the measured sequential time over ``best``; how far the pipeline
is from it is ``pipelined seconds / best``.  CPU figures are the frozen
window's only (from the freeze, or the end of the handshake, to LOADED), read by
each process for itself (:func:`time.process_time`, all its threads).

Stages per mode (``stage_cpu``):

=========== ===================================== ============================================
stage       pipelined                             sequential
=========== ===================================== ============================================
dump        source enclave                        source enclave + source driver (staging)
transfer    source driver + destination driver    source driver's send + destination's receive
load        destination enclave                   destination driver (ring) + enclave
=========== ===================================== ============================================
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["pipeline_bound", "process_cpu", "process_switches", "sequential_floor", "stage_cpu"]


def process_cpu(phases: Mapping[str, Any]) -> dict[str, float]:
    """CPU seconds of each of the four processes in the frozen window of one migration.

    ``phases`` is the source's transfer statistics (with the destination's
    under ``destination``), as :meth:`OutgoingEnclave.transfer` returns them.
    """

    dest = phases["destination"]
    return {
        "source_enclave": float(phases["enclave_cpu_seconds"]),
        "source_driver": float(sum(phases["driver_cpu"].values())),
        "destination_driver": float(sum(dest["driver_cpu"].values())),
        "destination_enclave": float(dest["enclave_cpu_seconds"]),
    }


def process_switches(phases: Mapping[str, Any]) -> dict[str, int]:
    """Context switches of each process in the frozen window (each counted its own)."""

    dest = phases["destination"]
    return {
        "source_enclave": int(phases.get("enclave_switches", 0)),
        "source_driver": int(phases.get("driver_switches", 0)),
        "destination_driver": int(dest.get("driver_switches", 0)),
        "destination_enclave": int(dest.get("enclave_switches", 0)),
    }


def stage_cpu(phases: Mapping[str, Any]) -> dict[str, float]:
    """CPU seconds of the dump, transfer and load stages (see the table above)."""

    proc = process_cpu(phases)
    src = phases["driver_cpu"]
    dst = phases["destination"]["driver_cpu"]
    if phases["mode"] == "sequential":
        return {
            "dump": proc["source_enclave"] + float(src["dump"]),
            "transfer": float(src["send"]) + float(dst["receive"]),
            "load": float(dst["load"]) + proc["destination_enclave"],
        }
    return {
        "dump": proc["source_enclave"],
        "transfer": proc["source_driver"] + proc["destination_driver"],
        "load": proc["destination_enclave"],
    }


def sequential_floor(phases: Mapping[str, Any], cores: int) -> float:
    """The shortest a sequential run with these CPU figures takes on ``cores`` cores.

    ``phases`` of a sequential run; the sum over its three phases of
    max(busier of its two processes, their total / cores).
    """

    src = phases["driver_cpu"]
    dst = phases["destination"]["driver_cpu"]
    pairs = (
        (float(phases["enclave_cpu_seconds"]), float(src["dump"])),
        (float(src["send"]), float(dst["receive"])),
        (float(dst["load"]), float(phases["destination"]["enclave_cpu_seconds"])),
    )
    return sum(max(max(a, b), (a + b) / cores) for a, b in pairs)


def pipeline_bound(
    pipelined: Mapping[str, Any], sequential: Mapping[str, Any], cores: int
) -> dict[str, Any]:
    """The best pipelined time and ratio ``cores`` allow, given the pipelined run's CPU.

    ``pipelined`` and ``sequential`` are one run's results of each mode, with
    ``seconds``, ``active_seconds`` (LOADED to the destination running) and ``phases``.
    """

    if cores < 1:
        raise ValueError("cores must be at least 1")
    per_process = process_cpu(pipelined["phases"])
    total = sum(per_process.values())
    busiest = max(per_process, key=lambda k: per_process[k])
    fixed = float(pipelined["active_seconds"])
    best = max(per_process[busiest], total / cores) + fixed
    floor = sequential_floor(sequential["phases"], cores) + fixed
    return {
        "cores": cores,
        "total_cpu_seconds": total,
        "busiest_process": busiest,
        "busiest_cpu_seconds": per_process[busiest],
        "fixed_seconds": fixed,
        "best_pipelined_seconds": best,
        "best_ratio": float(sequential["seconds"]) / best,
        # 1.0: the pipeline runs as fast as the machine allows; above: what is left.
        "pipelined_over_best": float(pipelined["seconds"]) / best,
        "sequential_floor_seconds": floor,
        "sequential_over_floor": float(sequential["seconds"]) / floor,
        # Both modes at their floors: the ratio of a quiet machine, from CPU alone.
        "cpu_ratio": floor / best,
    }
