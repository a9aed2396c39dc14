"""Where a storm migration's seconds went, from its fault to the source answering again.

With ``$MIGSGX_TRACE`` set, the tool, its guardian and the container drivers
mark each step they reach on stderr (:func:`migsgx.agent.faults.step`:
``migsgx step: NAME at T``), as a fault hook marks its fault (``migsgx fault:
POINT:ACTION at T``); T is on the system-wide monotonic clock, the storm's
own.  The storm probes the source all the while (:class:`Probe`: ``PING``
every 50 ms) and its client keeps writing, each noting when it was answered.
This module reads all of it: the steps from the fault on (:func:`timeline`),
who noticed the fault and how (:func:`noticed`), and when the source answered
again, after the last interval of :data:`OUTAGE` seconds or more without an
answer that ends after the fault (:func:`back_after`): a source that never
stopped answering is back at its first answer after the fault.

Those are real times, not the tool's end: before, the source's seconds back
were taken with a ``PING`` sent only once the tool had ended and the storm had
restarted what the fault killed, which counted both.
"""

from __future__ import annotations

import bisect
import re
import socket
import threading
import time
from collections.abc import Callable, Iterable
from typing import Final

__all__ = [
    "OUTAGE",
    "Probe",
    "back_after",
    "by_kind",
    "fault_time",
    "marks",
    "noticed",
    "spread",
    "timeline",
]

#: Seconds without an answer that count as the source not answering (a loaded
#: machine answers a ``PING`` well within it; a frozen or stopped source never).
OUTAGE: Final = 0.5
#: One line of a mark: who (``fault`` or ``step``), what, and when.
_MARK: Final = re.compile(r"^migsgx (fault|step): (\S+) at (\d+(?:\.\d+)?)\s*$")

#: How the tool learnt of the fault, from its reason (the first that matches).
_NOTICED: Final = (
    ("liveness", ("timed out", "errno 110", "timeout")),
    ("corrupt record", ("bad_record_mac", "bad record mac", "decryption", "authenticat")),
    ("refused", ("destination: ", "refused")),
    ("EOF", ("eof", "closed", "reset", "broken pipe", "went away", "errno 104", "errno 32",
             "unexpected end", "no answer")),
    ("enclave gone", ("enclave-lost", "enclave process", "platform service is gone")),
)  # fmt: skip


def marks(text: str) -> list[tuple[str, str, float]]:
    """Every mark in ``text``: (``fault`` or ``step``, its name, its time), in order."""

    found = []
    for line in text.splitlines():
        match = _MARK.match(line.strip())
        if match:
            found.append((match[1], match[2], float(match[3])))
    return found


def fault_time(text: str) -> float | None:
    """When the fault happened: its last mark (a fault may mark more than once)."""

    times = [t for kind, _, t in marks(text) if kind == "fault"]
    return max(times) if times else None


def timeline(text: str, since: float, extra: dict[str, float | None]) -> dict[str, float]:
    """Each step marked in ``text`` at or after ``since`` (its first time), and the
    ``extra`` events, in seconds since ``since``, in the order they happened."""

    events: dict[str, float] = {}
    for kind, name, t in marks(text):
        if kind == "step" and t >= since and name not in events:
            events[name] = t
    for name, when in extra.items():
        if when is not None:
            events[name] = when
    return {n: round(t - since, 3) for n, t in sorted(events.items(), key=lambda e: e[1])}


def back_after(
    answers: Iterable[float], since: float, until: float | None = None, outage: float = OUTAGE
) -> float | None:
    """When the source answered again after ``since``: the answer that ended the last
    interval of ``outage`` seconds or more without one, or its first answer after
    ``since`` when there was none.  ``None`` if it did not answer after ``since``, or
    stopped answering for ``outage`` or more before ``until`` (the end of the watch:
    not back while watched)."""

    times = sorted(answers)
    start = bisect.bisect_left(times, since)
    if start == len(times) or (until is not None and until - times[-1] >= outage):
        return None
    back = times[start]
    previous = times[start - 1] if start else since
    for t in times[start:]:
        if t - previous >= outage:
            back = t
        previous = t
    return back


def noticed(reason: str, exit_status: int) -> str:
    """Who noticed the fault, and how: the guardian where the tool died (-9), else
    the tool, by what its reason says (a liveness bound, an end of file, a refusal...)."""

    if exit_status == -9:
        return "guardian: the tool died"
    text = reason.lower()
    for label, words in _NOTICED:
        if any(w in text for w in words):
            return f"tool: {label}"
    return "tool: other" if reason else ""


def spread(values: Iterable[float]) -> dict[str, float] | None:
    """min / median / max and how many (``None`` for none)."""

    ordered = sorted(values)
    if not ordered:
        return None
    return {"min": round(ordered[0], 3), "median": round(ordered[len(ordered) // 2], 3),
            "max": round(ordered[-1], 3), "runs": len(ordered)}  # fmt: skip


def by_kind(
    rows: Iterable[tuple[str, float | None, dict[str, float]]],
) -> dict[str, dict[str, object]]:
    """Per fault kind, over ``(kind, seconds back, timeline)`` of the migrations that
    stayed: the seconds back (:func:`spread`), and each step's median second."""

    kinds: dict[str, tuple[list[float], dict[str, list[float]]]] = {}
    for kind, back, steps in rows:
        if back is None:
            continue
        backs, per_step = kinds.setdefault(kind, ([], {}))
        backs.append(back)
        for name, seconds in steps.items():
            per_step.setdefault(name, []).append(seconds)
    result: dict[str, dict[str, object]] = {}
    for kind, (backs, per_step) in sorted(kinds.items()):
        medians = {n: sorted(v)[len(v) // 2] for n, v in per_step.items()}
        result[kind] = {
            "back_seconds": spread(backs),
            "steps_median": dict(sorted(medians.items(), key=lambda item: item[1])),
        }
    return result


class Probe(threading.Thread):
    """Asks the source ``PING`` every ``interval`` seconds on one connection and notes
    when it answered.

    One connection (``connect()``), kept: a source that is frozen or stopped
    answers a ``PING`` sent on it the moment it runs again, and no new
    connection reaches its listener meanwhile (CRIU refuses to dump a listener
    with connections waiting to be accepted).  Made again only once it broke
    (the source moved or ended).
    """

    def __init__(self, connect: Callable[[], socket.socket], interval: float = 0.05) -> None:
        super().__init__(name="migsgx-storm-probe", daemon=True)
        self._connect, self.interval = connect, interval
        self.answers: list[float] = []
        self.stop = threading.Event()
        #: When it stopped asking (:meth:`finish`).
        self.ended: float | None = None

    def run(self) -> None:
        conn: socket.socket | None = None
        while not self.stop.is_set():
            try:
                if conn is None:
                    conn = self._connect()
                    conn.settimeout(0.2)  # (to look at ``stop`` while the source is frozen)
                conn.sendall(b"PING\n")
                if self._answer(conn):
                    self.answers.append(time.monotonic())
            except OSError:
                if conn is not None:
                    conn.close()
                conn = None
                self.stop.wait(0.02)
                continue
            self.stop.wait(self.interval)
        if conn is not None:
            conn.close()

    def _answer(self, conn: socket.socket) -> bool:
        """Wait for the answer (as long as it takes, until :meth:`finish`)."""

        line = b""
        while not line.endswith(b"\n"):
            try:
                data = conn.recv(64)
            except TimeoutError:
                if self.stop.is_set():
                    raise
                continue
            if not data:
                raise ConnectionResetError("the source closed the probe's connection")
            line += data
        return line.startswith(b"PONG")

    def wait_answer(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for an answer from now on; whether one came."""

        since = time.monotonic()
        while time.monotonic() < since + timeout:
            if self.answers and self.answers[-1] >= since:
                return True
            time.sleep(0.02)
        return False

    def finish(self) -> float:
        """Stop asking; when (the end of the watch)."""

        self.stop.set()
        self.join(10)
        self.ended = time.monotonic()
        return self.ended
