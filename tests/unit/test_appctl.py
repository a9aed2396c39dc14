"""The application's migration control, in one process: fake enclaves on socketpairs."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from migsgx.agent.applink import AppLink, find_control
from migsgx.channel import ECALL
from migsgx.errors import FrameError, ProtocolError
from migsgx.host.appctl import (
    APPCTL,
    AppControlError,
    MigrationControl,
    info_from_wire,
    info_to_wire,
    recv_frame_fds,
    send_frame_fds,
)
from migsgx.host.client import EnclaveClient, EnclaveInfo
from migsgx.wire import recv_frame, send_frame


def make_info(pid: int) -> EnclaveInfo:
    return EnclaveInfo(
        pid=pid,
        mr_enclave=bytes([pid % 256]) * 32,
        mr_signer=b"\x02" * 32,
        isv_prod_id=1,
        isv_svn=1,
        debug=False,
        memory_size=1 << 20,
        thread_slots=4,
        ecalls=("echo",),
    )


class FakeEnclave:
    """The enclave end of an ECALL connection: echoes ECALLs, acknowledges detach."""

    def __init__(self, name: str, delay: float = 0.0) -> None:
        self.name = name
        self.delay = delay
        self.app_end, self.end = socket.socketpair()
        self.sides: list[socket.socket] = []
        self.calls: list[str] = []
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        while True:
            try:
                msg = recv_frame(self.end, ECALL)
            except Exception:
                return
            if msg["t"] == "detach":
                send_frame(self.end, {"t": "detached"})
            elif msg["t"] == "ecall" and msg["fn"] == "__mig_side":
                _, fds, _, _ = socket.recv_fds(self.end, 1, 1)
                self.sides.append(socket.socket(fileno=fds[0]))
                send_frame(self.end, {"t": "ret", "id": msg["id"], "value": None})
            elif msg["t"] == "ecall":
                self.calls.append(msg["fn"])
                time.sleep(self.delay)
                send_frame(
                    self.end, {"t": "ret", "id": msg["id"], "value": [self.name, *msg["args"]]}
                )

    def close(self) -> None:
        self.end.close()


@pytest.fixture
def enclaves() -> Iterator[list[FakeEnclave]]:
    made = [FakeEnclave("a"), FakeEnclave("b", delay=0.2)]
    yield made
    for e in made:
        e.close()


@pytest.fixture
def app(enclaves: list[FakeEnclave]) -> Iterator[tuple[MigrationControl, list[EnclaveClient]]]:
    clients = [
        EnclaveClient(e.app_end, make_info(100 + i), image_files={"enclave.toml": b"x"})
        for i, e in enumerate(enclaves)
    ]
    control = MigrationControl(clients).start()
    yield control, clients
    control.close()


def link_to(control: MigrationControl) -> AppLink:
    found = find_control(os.getpid())
    assert found is not None and found[1] == control.name
    return AppLink(found[0], found[1], timeout=10)


def test_resume_has_each_enclave_let_its_duplicate_go(
    app: tuple[MigrationControl, list[EnclaveClient]], enclaves: list[FakeEnclave]
) -> None:
    """After an abort an enclave keeps its driver's duplicate of the connection
    (``__mig_hold``) until the application has it back: ``resume`` says so, on each
    connection, before it answers (``docs/spec/app-control.md``, section 6)."""

    control, _clients = app
    link = link_to(control)
    handed = link.prepare(timeout=5)
    assert [e.calls for e in enclaves] == [[], []]
    assert link.resume([h.sock for h in handed]) == 2
    for h in handed:
        h.sock.close()
    assert [e.calls for e in enclaves] == [["__mig_unhold"], ["__mig_unhold"]]


def test_prepare_hands_over_and_resume_gives_back(
    app: tuple[MigrationControl, list[EnclaveClient]],
) -> None:
    control, clients = app
    link = link_to(control)
    assert link.status() == {"t": "state", "pid": link.pid, "enclaves": 2, "handed_over": False}

    handed = link.prepare(timeout=5)
    assert [h.info.pid for h in handed] == [100, 101]
    assert handed[0].image_files == {"enclave.toml": b"x"}
    assert all(c.detached for c in clients)
    assert link.status()["handed_over"] is True

    # A caller waits while the enclave is away ...
    result: list[object] = []
    caller = threading.Thread(target=lambda: result.append(clients[0].ecall.echo(1)))
    caller.start()
    time.sleep(0.1)
    assert result == []
    # ... the new owner can use the connection meanwhile ...
    send_frame(handed[0].sock, {"t": "ecall", "id": 9, "fn": "echo", "args": [2]})
    assert recv_frame(handed[0].sock, ECALL) == {"t": "ret", "id": 9, "value": ["a", 2]}
    # ... and after the resume the caller carries on.
    assert link.resume([h.sock for h in handed]) == 2
    for h in handed:
        h.sock.close()
    caller.join(5)
    assert result == [["a", 1]]
    assert clients[1].ecall.echo(3) == ["b", 3]


def test_side_channels_leave_the_application_attached(
    app: tuple[MigrationControl, list[EnclaveClient]], enclaves: list[FakeEnclave]
) -> None:
    control, clients = app
    link = link_to(control)
    sides = link.side()
    assert [h.info.pid for h in sides] == [100, 101]
    assert not any(c.detached for c in clients)
    assert link.status()["handed_over"] is False
    assert clients[0].ecall.echo(1) == ["a", 1]  # ECALLs go on
    # Each side channel reaches its enclave.
    for handed, enclave in zip(sides, enclaves, strict=True):
        handed.sock.sendall(b"ping")
        assert enclave.sides[-1].recv(4) == b"ping"
        handed.sock.close()
    # The hand-over still works afterwards, in the same order.
    handed = link.prepare(timeout=5)
    assert [h.info.pid for h in handed] == [100, 101]
    assert link.resume([h.sock for h in handed]) == 2


def test_attach_takes_new_connections_and_identities(
    app: tuple[MigrationControl, list[EnclaveClient]],
) -> None:
    control, clients = app
    link = link_to(control)
    handed = link.prepare(timeout=5)
    fresh = [FakeEnclave("a2"), FakeEnclave("b2")]
    try:
        assert link.attach([f.app_end for f in fresh], [make_info(7), make_info(8)]) == 2
        assert [c.info.pid for c in clients] == [7, 8]
        assert clients[0].ecall.echo("x") == ["a2", "x"]
        assert clients[1].ecall.echo("y") == ["b2", "y"]
    finally:
        for f in fresh:
            f.close()
        for h in handed:
            h.sock.close()


def test_prepare_waits_for_an_ecall_in_flight(
    app: tuple[MigrationControl, list[EnclaveClient]],
) -> None:
    control, clients = app
    link = link_to(control)
    result: list[object] = []
    caller = threading.Thread(target=lambda: result.append(clients[1].ecall.echo("slow")))
    caller.start()
    time.sleep(0.05)
    handed = link.prepare(timeout=5)
    assert result == [["b", "slow"]]  # it finished before the hand-over
    link.resume([h.sock for h in handed])
    caller.join(5)


def test_requests_out_of_order_are_refused(
    app: tuple[MigrationControl, list[EnclaveClient]],
) -> None:
    control, _ = app
    link = link_to(control)
    with pytest.raises(AppControlError, match="no enclaves are handed over"):
        link.resume([])
    handed = link.prepare(timeout=5)
    with pytest.raises(AppControlError, match="handed over already"):
        link.prepare(timeout=5)
    with pytest.raises(AppControlError, match="expected 2 enclave connections"):
        link.resume([handed[0].sock])
    assert link.status()["handed_over"] is True
    with pytest.raises(AppControlError, match="while a migration is under way"):
        control.add(EnclaveClient(FakeEnclave("c").app_end, make_info(3)))
    link.resume([h.sock for h in handed])


def test_a_failed_detach_leaves_every_enclave_attached(
    enclaves: list[FakeEnclave],
) -> None:
    good = EnclaveClient(enclaves[0].app_end, make_info(1))
    dead_end, gone = socket.socketpair()
    gone.close()
    dead = EnclaveClient(dead_end, make_info(2))
    time.sleep(0.05)  # its reader sees the closed channel
    control = MigrationControl([good, dead]).start()
    try:
        with pytest.raises(AppControlError, match="refused prepare"):
            link_to(control).prepare(timeout=2)
        assert not good.detached
        assert good.ecall.echo(5) == ["a", 5]
    finally:
        control.close()


def test_descriptors_travel_with_their_frame() -> None:
    a, b = socket.socketpair()
    x, y = socket.socketpair()
    with a, b, x, y:
        send_frame_fds(a, {"t": "ok", "enclaves": 1}, [x.fileno()], max_size=1 << 16)
        msg, fds = recv_frame_fds(b, APPCTL, max_size=1 << 16)
        assert msg == {"t": "ok", "enclaves": 1} and len(fds) == 1
        with socket.socket(fileno=fds[0]) as got:
            got.sendall(b"hi")
            assert y.recv(2) == b"hi"


def test_too_many_descriptors_are_refused() -> None:
    a, b = socket.socketpair()
    extra = [socket.socketpair() for _ in range(3)]
    with a, b:
        send_frame_fds(
            a, {"t": "ok", "enclaves": 3}, [p[0].fileno() for p in extra], max_size=1 << 16
        )
        with pytest.raises(FrameError, match="too many descriptors"):
            recv_frame_fds(b, APPCTL, max_size=1 << 16, max_fds=2)
    for p, q in extra:
        p.close()
        q.close()


def test_enclave_info_round_trip_and_checks() -> None:
    info = make_info(42)
    assert info_from_wire(info_to_wire(info)) == info.__dict__
    bad = info_to_wire(info) | {"isv_svn": True}
    with pytest.raises(ProtocolError, match="isv_svn"):
        info_from_wire(bad)
    with pytest.raises(ProtocolError, match="unexpected"):
        info_from_wire(info_to_wire(info) | {"extra": 1})
