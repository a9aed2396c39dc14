"""``__mig_watch`` and ``__mig_hold`` between driver and enclave runtimes of either age.

Both ends in memory over a real socket pair: the driver's own
:func:`~migsgx.agent.watch_ask.ask_all`, and on the other end either the
enclave's real reader (an :class:`~migsgx.enclave.app_channel.AppChannel`
serving in a thread, as in the enclave process) or the reader of an enclave
runtime launched before the one-message form (a plain frame read, then up to
10 s for the one-byte ``W`` message; copied from that runtime, since a rolling
upgrade meets it).  The cells: the driver's form is what an older runtime reads;
the new reader takes both forms; a ``W`` or ``H`` that comes after its call's
wait ended is passed over and the next frame read as it was sent; a bare frame
is still refused without the old 10 s stall.
"""

from __future__ import annotations

import os
import select
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from ecall_frames import answer as _answer
from ecall_frames import send_ecall as _send
from ecall_frames import send_hold, send_with_fds

from migsgx.agent.watch_ask import ask_all
from migsgx.channel import ECALL, ECALL_FRAME_MAX, HOLD_BYTE, WATCH_BYTE
from migsgx.enclave import app_channel
from migsgx.enclave.app_channel import AppChannel
from migsgx.wire import HEADER, recv_frame, send_frame

NONCE = b"the-drivers-nonce-0123456789"


def _migrator() -> SimpleNamespace:
    return SimpleNamespace(role=None, committed=False, discarded=False, dumping=False,
                           dumped=False, checkpoint=None,
                           instance=SimpleNamespace(retired=False))  # fmt: skip


class Bed:
    """The enclave's real reader on one end of a socket pair, the driver's end, and a
    duplicate of the driver's end held by the enclave (``__mig_hold`` with the nonce)."""

    def __init__(self) -> None:
        self.enclave, self.driver = socket.socketpair()
        self.driver.settimeout(20)
        self.channel = AppChannel(self.enclave)
        self.channel.instance = SimpleNamespace()  # type: ignore[assignment]
        self.channel.migrator = _migrator()  # type: ignore[assignment]
        self.reader = threading.Thread(target=self.channel.serve, daemon=True)
        self.reader.start()
        answer = _answer(self.driver, send_hold(self.driver, NONCE, [self.driver.fileno()]))
        assert answer["t"] == "ret", answer

    def close(self) -> None:
        self.channel.hold.drop()
        self.driver.close()
        self.reader.join(5)
        self.enclave.close()


@pytest.fixture
def bed() -> Iterator[Bed]:
    bed = Bed()
    yield bed
    bed.close()


@pytest.fixture
def pidfd() -> Iterator[int]:
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    fd = os.pidfd_open(sleeper.pid)
    yield fd
    os.close(fd)
    sleeper.kill()
    sleeper.wait()


@pytest.fixture
def logged(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    lines: list[str] = []
    monkeypatch.setattr(app_channel, "log", lines.append)
    return lines


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_no_frame_header_begins_with_a_follow_up_byte() -> None:
    """The reader tells a late ``W``/``H`` from a header by its first byte: a header's
    is the top byte of a length of at most the cap."""

    top = HEADER.pack(ECALL_FRAME_MAX)[:1]
    assert top < WATCH_BYTE and top < HOLD_BYTE


def test_the_drivers_watch_is_what_the_new_reader_takes(bed: Bed, pidfd: int) -> None:
    """The driver's own ``ask_all``: the frame, then ``W`` with the pidfds."""

    [(answer, why)] = ask_all([(bed.driver, NONCE, [pidfd])])
    assert answer is not None and answer["t"] == "ret" and answer["value"] == 1, (answer, why)
    assert _answer(bed.driver, _send(bed.driver, "__mig_held", [NONCE]))["t"] == "ret"


def test_pidfds_on_the_frame_are_still_taken(bed: Bed, pidfd: int) -> None:
    call_id = send_with_fds(bed.driver, "__mig_watch", [NONCE], [pidfd])
    answer = _answer(bed.driver, call_id)
    assert answer["t"] == "ret" and answer["value"] == 1, answer


def test_a_late_w_after_a_refused_watch_is_passed_over(
    bed: Bed, pidfd: int, logged: list[str]
) -> None:
    """A preempted driver's ``W`` comes after the reader's wait ended (the refusal is
    read first: no sleep).  Before, the reader took ``W`` and three bytes of the next
    frame for a header, answered a bad frame and ended: the enclave exited after an
    abort.  Now the ``W`` is passed over, its pidfd closed, the next frame answered."""

    watch = _send(bed.driver, "__mig_watch", [NONCE])
    refused = _answer(bed.driver, watch)
    assert (refused["t"], refused["code"]) == ("err", "protocol"), refused
    before = _open_fds()
    socket.send_fds(bed.driver, [WATCH_BYTE], [pidfd])
    answer = _answer(bed.driver, _send(bed.driver, "__mig_held", [NONCE]))
    assert answer["t"] == "ret", answer
    assert any("late W" in line for line in logged), logged
    assert _open_fds() == before  # (the pidfd the reader received is closed)
    assert bed.reader.is_alive()


def test_a_late_h_after_a_refused_hold_is_passed_over(bed: Bed, logged: list[str]) -> None:
    """A ``__mig_hold`` frame whose ``H`` is not there when something else follows is
    refused at once; its ``H`` coming after is passed over the same way, the duplicate
    held and the stream in step."""

    hold = _send(bed.driver, "__mig_hold", [NONCE])
    held = _send(bed.driver, "__mig_held", [NONCE])
    refused = _answer(bed.driver, hold)
    assert (refused["t"], refused["code"]) == ("err", "protocol"), refused
    assert _answer(bed.driver, held)["t"] == "ret"
    mine, other = socket.socketpair()
    with mine, other:
        socket.send_fds(bed.driver, [HOLD_BYTE], [mine.fileno()])
        answer = _answer(bed.driver, _send(bed.driver, "__mig_held", [NONCE]))
        assert answer["t"] == "ret", answer
        mine.close()
        # The reader closed its copy: the other end reads end of file.
        assert select.select([other], [], [], 10)[0] and other.recv(1) == b""
    assert any("late H" in line for line in logged), logged
    assert bed.channel.hold.held


def test_a_bare_watch_frame_is_still_refused_without_the_old_stall(bed: Bed) -> None:
    """Nothing follows the frame: refused after the reader's short wait (the old reader
    waited 10 s; the driver's socket gives up after 5), then the stream in step."""

    bed.driver.settimeout(5)
    watch = _send(bed.driver, "__mig_watch", [NONCE])
    refused = _answer(bed.driver, watch)
    assert (refused["t"], refused["code"]) == ("err", "protocol"), refused
    assert _answer(bed.driver, _send(bed.driver, "__mig_held", [NONCE]))["t"] == "ret"


# --- an enclave runtime launched before the one-message form --------------------------------
def _old_runtime(sock: socket.socket, seen: list[tuple[str, Any]]) -> None:
    """The reader of an enclave runtime older than the one-message form: each frame
    read plainly (descriptors on it dropped); after ``__mig_watch``, up to 10 s for
    the one-byte ``W`` message with the pidfds, its first byte taken whatever it is."""

    while True:
        try:
            msg = recv_frame(sock, ECALL, max_size=ECALL_FRAME_MAX)
        except Exception as exc:
            seen.append(("bad frame", type(exc).__name__))
            return
        seen.append((msg["fn"], None))
        if msg["fn"] != "__mig_watch":
            continue
        ready, _, _ = select.select([sock], [], [], 10)
        if not ready:
            seen.append(("no W", None))
            return
        data, fds, _, _ = socket.recv_fds(sock, 1, 16)
        for fd in fds:
            os.close(fd)
        if data != WATCH_BYTE or not fds:
            seen.append(("out of step", data))
            return
        seen.append(("W", len(fds)))
        send_frame(sock, {"t": "ret", "id": msg["id"], "value": len(fds)},
                   max_size=ECALL_FRAME_MAX)  # fmt: skip


def test_an_older_runtime_takes_the_drivers_watch(pidfd: int) -> None:
    """A rolling upgrade: the new driver watches an enclave launched before it, and
    the application's ``resume`` sends ``__mig_unhold`` right after.  Before, the
    pidfds rode on the frame, the old reader dropped them and waited for its ``W``,
    the driver gave up after 2 s, and the ``__mig_unhold`` frame's first byte was
    taken for the ``W``: the stream out of step, the state lost after an abort."""

    enclave, driver = socket.socketpair()
    seen: list[tuple[str, Any]] = []
    old = threading.Thread(target=_old_runtime, args=(enclave, seen), daemon=True)
    old.start()
    try:
        [(answer, why)] = ask_all([(driver, NONCE, [pidfd])])
        _send(driver, "__mig_unhold", [])  # (the application's resume, at once)
        driver.shutdown(socket.SHUT_WR)
        old.join(20)
        assert seen == [("__mig_watch", None), ("W", 1), ("__mig_unhold", None),
                        ("bad frame", "ConnectionClosedError")], seen  # fmt: skip
        assert answer is not None and answer["t"] == "ret" and answer["value"] == 1, why
    finally:
        driver.close()
        enclave.close()
