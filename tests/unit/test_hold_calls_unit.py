"""The hold calls any holder of an enclave connection can send, on the enclave's own reader.

An :class:`~migsgx.enclave.app_channel.AppChannel` serves one end of a socket
pair in a thread (the enclave's reader, as in the enclave process); the other
end is the driver's, and a second descriptor of it is what the application, or
a child of it, holds.  The migration's state is a plain stand-in for the
migrator (its flags are what the reader reads).  Beside it: the driver's watch
of several enclaves at once (fake enclaves that answer only once every one of
them has its frame), and ``EnclaveClient.destroy()`` on a connection whose
other holder must keep it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from ecall_frames import answer as _answer
from ecall_frames import call as _call
from ecall_frames import send_ecall as _send
from ecall_frames import send_hold, send_with_fds

from migsgx.agent.holders import watch_holders
from migsgx.channel import ECALL, ECALL_FRAME_MAX
from migsgx.enclave.app_channel import AppChannel
from migsgx.host.client import EnclaveClient, EnclaveInfo
from migsgx.wire import HEADER, decode_body, encode, recv_exactly, recv_frame

NONCE = b"the-drivers-nonce-0123456789"

#: The migration's flags per state: what the reader reads of the migrator.
STATES: dict[str, dict[str, Any]] = {
    "held, no abort yet": {},
    "checkpoint under way": {"role": "source"},
    "dumped (frozen)": {"role": "source", "dumping": True, "dumped": True},
    "undecided after LOADED": {"role": "source", "dumped": True},
    "decided COMMIT": {"role": "source", "dumped": True, "committed": True},
}


def _migrator(**flags: Any) -> SimpleNamespace:
    base = {"role": None, "committed": False, "discarded": False, "dumping": False,
            "dumped": False, "checkpoint": None}  # fmt: skip
    return SimpleNamespace(**{**base, **flags}, instance=SimpleNamespace(retired=False))


class Bed:
    """The enclave's reader on one end; the driver's end; a second descriptor of it."""

    def __init__(self) -> None:
        self.enclave, self.driver = socket.socketpair()
        self.channel = AppChannel(self.enclave)
        self.channel.instance = SimpleNamespace()  # type: ignore[assignment]
        self.channel.migrator = _migrator()  # type: ignore[assignment]
        self.app = socket.socket(fileno=os.dup(self.driver.fileno()))
        self.app.settimeout(20)
        self.driver.settimeout(20)
        self.reader = threading.Thread(target=self.channel.serve, daemon=True)
        self.reader.start()

    def close(self) -> None:
        self.channel.hold.drop()  # (then every other end closes: the reader reads EOF)
        self.app.close()
        self.driver.close()
        self.reader.join(5)
        self.enclave.close()


@pytest.fixture
def bed() -> Iterator[Bed]:
    bed = Bed()
    yield bed
    bed.close()


def _hold(sock: socket.socket, nonce: bytes, fd: int) -> dict[str, Any]:
    """``__mig_hold`` as the driver sends it: the frame, then ``H`` with the descriptor."""

    return _answer(sock, send_hold(sock, nonce, [fd]))


def _held_by_driver(bed: Bed, state: str) -> None:
    assert _hold(bed.driver, NONCE, bed.driver.fileno())["t"] == "ret"
    bed.channel.migrator = _migrator(**STATES[state])  # type: ignore[assignment]


@pytest.mark.parametrize("state", list(STATES))
def test_the_application_cannot_let_the_duplicate_go(bed: Bed, state: str) -> None:
    """Before, ``__mig_unhold`` closed the duplicate whoever sent it, in any state: the
    driver's death was then an end of file that took a frozen, dumped or committed
    state with it.  Now it is refused with a clear error, and the hold stays."""

    _held_by_driver(bed, state)
    answer = _call(bed.app, "__mig_unhold", [])
    assert answer["t"] == "err" and answer["code"] == "hold-kept", answer
    assert "refused" in answer["message"], answer
    assert bed.channel.hold.held
    assert _call(bed.driver, "__mig_held", [NONCE])["t"] == "ret"


@pytest.mark.parametrize("state", list(STATES))
def test_an_invented_nonce_takes_over_nothing(bed: Bed, state: str) -> None:
    """A ``__mig_hold`` of the application's own, with a nonce it invented and any
    descriptor, replaced the driver's duplicate (and so dropped it): refused now, its
    descriptor closed; ``__mig_held`` with an invented nonce is refused and drops
    nothing (as before)."""

    _held_by_driver(bed, state)
    mine, other = socket.socketpair()
    with mine, other:
        answer = _hold(bed.app, b"invented", mine.fileno())
        assert answer["t"] == "err" and answer["code"] == "hold-kept", answer
    answer = _call(bed.app, "__mig_held", [b"invented"])
    assert answer["t"] == "err" and answer["code"] == "not-this-hold", answer
    assert _call(bed.driver, "__mig_held", [NONCE])["t"] == "ret"


@pytest.mark.parametrize("after", ["abort answered, runs on", "discarded"])
def test_after_an_abort_the_application_lets_it_go(bed: Bed, after: str) -> None:
    """The application's ``resume`` sends ``__mig_unhold`` after an abort the enclave
    answered itself: the state is the source's to run on, the duplicate goes."""

    _held_by_driver(bed, "held, no abort yet")
    if after == "discarded":
        discarded = _migrator(role="destination", discarded=True)
        bed.channel.migrator = discarded  # type: ignore[assignment]
    else:
        bed.channel.hold.kept_after_abort()
    assert _call(bed.app, "__mig_unhold", [])["t"] == "ret"
    assert not bed.channel.hold.held


def test_a_migration_begun_after_the_abort_keeps_it_again(bed: Bed) -> None:
    _held_by_driver(bed, "held, no abort yet")
    bed.channel.hold.kept_after_abort()
    bed.channel.migrator = _migrator(**STATES["checkpoint under way"])  # type: ignore[assignment]
    answer = _call(bed.app, "__mig_unhold", [])
    assert answer["t"] == "err" and answer["code"] == "hold-kept", answer
    assert bed.channel.hold.held


def test_a_watch_frame_without_its_pidfds_puts_nothing_out_of_step(bed: Bed) -> None:
    """The application sends a bare ``__mig_watch``, and the driver's next call follows
    at once.  Before, the reader waited up to 10 s for the pidfds and then took the
    first byte of the driver's frame for them: the stream out of step, the driver's
    call never answered.  Now the frame is refused at once, the driver's call is
    answered, and the connection stays in step."""

    _held_by_driver(bed, "undecided after LOADED")
    watch = _send(bed.app, "__mig_watch", [b"invented"])
    held = _send(bed.driver, "__mig_held", [NONCE])
    first = recv_frame(bed.app, ECALL, max_size=ECALL_FRAME_MAX)
    second = recv_frame(bed.app, ECALL, max_size=ECALL_FRAME_MAX)
    assert (first["id"], first["t"]) == (watch, "err"), first
    assert (second["id"], second["t"]) == (held, "ret"), second
    assert _call(bed.driver, "__mig_held", [NONCE])["t"] == "ret"  # (still in step)


def test_a_watch_carries_its_pidfds_on_its_own_frame(bed: Bed) -> None:
    """The driver's ``__mig_watch`` in one message: the frame with its pidfds."""

    _held_by_driver(bed, "held, no abort yet")
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        pidfd = os.pidfd_open(sleeper.pid)
        call_id = send_with_fds(bed.driver, "__mig_watch", [NONCE], [pidfd])
        os.close(pidfd)
        answer = _answer(bed.driver, call_id)
        assert answer["t"] == "ret" and answer["value"] == 1, answer
    finally:
        sleeper.kill()
        sleeper.wait()


# --- the driver's watch of several enclaves: asked at once ---------------------------------
def _fake_enclave(end: socket.socket, everyone: threading.Barrier, answers: bool) -> None:
    """Reads one frame (its descriptors closed); answers it only once every enclave of
    the group has its frame (or never: a hung one)."""

    fds: list[int] = []
    header = b""
    while len(header) < HEADER.size:
        data, got, _, _ = socket.recv_fds(end, HEADER.size - len(header), 32)
        fds += got
        if not data:
            return
        header += data
    msg = decode_body(recv_exactly(end, HEADER.unpack(header)[0]), ECALL)
    for fd in fds:
        os.close(fd)
    try:
        everyone.wait(20)
    except threading.BrokenBarrierError:
        return
    if answers:
        end.sendall(encode({"t": "ret", "id": msg["id"], "value": len(fds)},
                           max_size=ECALL_FRAME_MAX))  # fmt: skip


@pytest.mark.parametrize("hung", [None, 1])
def test_the_watch_asks_every_enclave_at_once(hung: int | None) -> None:
    """Three enclaves that answer only once all three have their frame.  Before, the
    driver asked one, waited up to 5 s for it, then the next: the first two were taken
    for hung (the tree stayed stopped 5 s per enclave).  Now every frame is written
    first, and one deadline covers the group: all answer; a hung one costs one bound
    and the others are told."""

    if os.geteuid() != 0:
        pytest.skip("the driver asks the kernel which namespace a socket lives in (root)")
    pairs = [socket.socketpair() for _ in range(3)]
    everyone = threading.Barrier(3)
    fakes = [
        threading.Thread(target=_fake_enclave, args=(enclave, everyone, i != hung), daemon=True)
        for i, (_, enclave) in enumerate(pairs)
    ]
    for fake in fakes:
        fake.start()
    app = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        holders = [[os.getpid(), enclave.fileno(), "0", NONCE.hex()] for _, enclave in pairs]
        told = watch_holders([driver for driver, _ in pairs], holders, app.pid)
        assert told == [i for i in range(3) if i != hung]
    finally:
        everyone.abort()
        app.kill()
        app.wait()
        for driver, enclave in pairs:
            driver.close()
            enclave.close()


# --- EnclaveClient.destroy() on a connection another holder keeps --------------------------
def test_destroy_ends_only_this_holders_descriptor() -> None:
    """A holder's ``destroy()``: the enclave gets its ``destroy``, and no end of file.
    Before, ``shutdown`` acted on the socket itself, so on the enclave's held duplicate
    too: a frozen or committed enclave read end of file and ended with its state.  The
    holder's reader is stopped too: what the enclave sends next reaches the others."""

    enclave, app_end = socket.socketpair()
    duplicate = socket.socket(fileno=os.dup(app_end.fileno()))  # what the enclave holds
    info = EnclaveInfo(1, b"", b"", 0, 0, False, 0, 1, ())
    client = EnclaveClient(socket.socket(fileno=os.dup(app_end.fileno())), info)
    with enclave, app_end, duplicate:
        client.destroy()
        assert not client._reader.is_alive()
        assert recv_frame(enclave, ECALL, max_size=ECALL_FRAME_MAX)["t"] == "destroy"
        enclave.settimeout(0.0)
        with pytest.raises(BlockingIOError):
            enclave.recv(1)  # no end of file: the duplicate's holders keep the connection
        enclave.sendall(encode({"t": "ret", "id": 5, "value": 1}, max_size=ECALL_FRAME_MAX))
        duplicate.settimeout(10)
        assert recv_frame(duplicate, ECALL, max_size=ECALL_FRAME_MAX)["id"] == 5
