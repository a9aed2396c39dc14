"""A storm's timeline of a fault (:mod:`migsgx.lab.storm_timeline`): the steps marked
(:mod:`migsgx._trace`), who noticed, and when the source answered again."""

from __future__ import annotations

import pytest

from migsgx import _trace
from migsgx.lab.storm_timeline import back_after, by_kind, fault_time, marks, noticed, timeline

STDERR = """\
migsgx step: prepare at 100.000000
migsgx fault: tool.before-images:stall-control at 101.000000
migsgx step: control-failed at 105.100000
migsgx step: failed at 105.400000
migsgx step: roll-back at 105.500000
migration aborted: AgentError: no answer to images_done from the destination: timed out
migsgx step: enclaves-aborted at 105.700000
migsgx step: destination-aborted at 105.700400
migsgx step: handed-back at 105.900000
migsgx: error [migration]: migration aborted, the source runs on: no answer ... timed out
"""


def test_steps_from_the_fault_on_in_seconds_since_it() -> None:
    at = fault_time(STDERR)
    assert at == 101.0
    assert [m[1] for m in marks(STDERR)][:2] == ["prepare", "tool.before-images:stall-control"]
    got = timeline(STDERR, at, {"tool-end": 106.2, "answer": 105.6, "write": None})
    assert got == {
        "control-failed": 4.1, "failed": 4.4, "roll-back": 4.5, "answer": 4.6,
        "enclaves-aborted": 4.7, "destination-aborted": 4.7, "handed-back": 4.9,
        "tool-end": 5.2,
    }  # fmt: skip
    assert list(got) == sorted(got, key=got.__getitem__)  # in the order they happened


def test_the_source_is_back_after_its_last_outage() -> None:
    # answering every 0.05 s, frozen from 101.2 to 105.6, answering again
    answers = [100.0 + i * 0.05 for i in range(25)] + [105.6, 105.65, 105.7]
    assert back_after(answers, 101.0) == pytest.approx(105.6)
    # it never stopped answering: back at its first answer after the fault
    assert back_after([100.9, 101.02, 101.07], 101.0) == pytest.approx(101.02)
    # frozen at the fault with a PING in flight, answered as it thawed
    assert back_after([100.95, 104.3, 104.35], 101.0) == pytest.approx(104.3)
    assert back_after([100.0], 101.0) is None
    # answering until 101.5, then not while watched (to 104): not back
    assert back_after([100.95, 101.2, 101.5], 101.0, until=104.0) is None
    assert back_after([100.95, 101.2, 103.8], 101.0, until=104.0) == pytest.approx(103.8)


def test_who_noticed_the_fault() -> None:
    assert noticed("migsgx: error [migration]: ... timed out", 6) == "tool: liveness"
    assert noticed("migsgx: error [migration]: ... [Errno 104] Connection reset by peer",
                   6) == "tool: EOF"  # fmt: skip
    assert noticed("", -9) == "guardian: the tool died"
    assert noticed("", 0) == ""


def test_per_kind_the_spread_back_and_each_step_median() -> None:
    rows = [
        ("connection stall", 4.6, {"roll-back": 4.5, "answer": 4.6}),
        ("connection stall", 5.6, {"roll-back": 5.5, "answer": 5.6}),
        ("connection stall", 4.8, {"roll-back": 4.7, "answer": 4.8}),
        ("none", None, {}),
    ]
    got = by_kind(rows)
    assert list(got) == ["connection stall"]
    assert got["connection stall"]["back_seconds"] == {
        "min": 4.6, "median": 4.8, "max": 5.6, "runs": 3,
    }  # fmt: skip
    assert got["connection stall"]["steps_median"] == {"roll-back": 4.7, "answer": 4.8}


def test_a_step_is_marked_only_when_traced(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv(_trace.TRACE_ENV, raising=False)
    _trace.step("roll-back")
    assert capsys.readouterr().err == ""
    monkeypatch.setenv(_trace.TRACE_ENV, "1")
    _trace.step("roll-back")
    (found,) = marks(capsys.readouterr().err)
    assert found[:2] == ("step", "roll-back")


def test_the_probe_asks_on_one_connection_and_waits_out_a_freeze() -> None:
    """A source that stops answering for a while: the PING in flight is answered when
    it runs again, on the same connection (no new one reaches its listener)."""

    import socket
    import threading
    import time

    from migsgx.lab.storm_timeline import Probe

    made: list[socket.socket] = []
    frozen = threading.Event()

    def serve(end: socket.socket) -> None:
        with end, end.makefile("rwb") as stream:
            for line in stream:
                if frozen.is_set():
                    time.sleep(0.6)  # (the freeze: answered once it is over)
                    frozen.clear()
                stream.write(b"PONG\n" if line == b"PING\n" else b"ERR\n")
                stream.flush()

    def connect() -> socket.socket:
        ours, theirs = socket.socketpair()
        threading.Thread(target=serve, args=(theirs,), daemon=True).start()
        made.append(ours)
        return ours

    probe = Probe(connect, interval=0.01)
    probe.start()
    assert probe.wait_answer(5.0)
    at = time.monotonic()
    frozen.set()
    time.sleep(0.8)
    probe.finish()
    assert len(made) == 1
    back = back_after(probe.answers, at, probe.ended)
    assert back is not None and back - at >= 0.5
