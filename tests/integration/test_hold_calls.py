"""The hold calls, sent by whoever holds a real enclave's connection (``channels.md`` 7.1).

A source enclave keeps a duplicate of its driver's end (``__mig_hold``) so that
no driver's death loses its state.  Every process that holds the connection
can send the hold calls: the application, or a child of it outside the fence.
Each cell drives a real enclave process (the platform service of host ``a``,
the real ECALL channel; a destination enclave on host ``b`` over TCP where a
migration is under way) into a state, then sends what such a holder can send,
on a second descriptor of the driver's own end:

* ``__mig_unhold`` and a ``__mig_hold`` of its own with a nonce it invented:
  refused (``hold-kept``) while the state may be the only copy (held before
  any abort, a checkpoint dumped and frozen, LOADED and undecided, COMMIT
  decided); the driver's hold answers ``__mig_held`` after it.  After an
  abort the enclave answered, the application lets it go (its ``resume``).
* a ``__mig_watch`` frame without its pidfds, the driver's next call right
  behind it: refused at once, the next call answered, the stream in step.
* ``EnclaveClient.destroy()`` of a holder: the enclave reads the ``destroy``
  and serves on (the runtime's serve-on loop), no end of file.

And the driver's watch of three enclaves, one stopped: the other two take
their sets.  Each cell ends with the state where it belongs, every write there.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

pytest.register_assert_rewrite("state_helpers")

from ecall_frames import answer as _answer  # noqa: E402
from ecall_frames import send_ecall as _send  # noqa: E402
from ecall_frames import send_hold  # noqa: E402
from state_helpers import (  # noqa: E402
    Launcher,
    World,
    fill_kvstore,
    migration_pair,
    start_transfer,
    wait_gone,
)

from migsgx.channel import ECALL, ECALL_FRAME_MAX  # noqa: E402
from migsgx.datapath.checkpoint import CheckpointOut  # noqa: E402
from migsgx.datapath.enclave_link import EnclaveLink  # noqa: E402
from migsgx.host.client import EnclaveClient  # noqa: E402
from migsgx.wire import recv_frame  # noqa: E402

pytest_plugins = ["state_helpers"]
pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

NONCE = b"the-drivers-nonce-0123456789"
#: States where the duplicate may be what keeps the only copy.
KEPT = ["held, no abort yet", "checkpoint dumped", "LOADED, undecided", "COMMIT decided"]


@dataclass
class Source:
    client: EnclaveClient
    link: EnclaveLink  # the driver's, on its end of the connection


@contextlib.contextmanager
def source_in(state: str, world: World, launch: Launcher, tmp: Path) -> Iterator[Source]:
    """A source enclave in ``state``, its driver's hold given; afterwards the state
    goes where it belongs (back to the application, or on to the destination) and
    must hold every write."""

    client = launch("kvstore")
    fill_kvstore(client, count=8)
    digest = client.ecall.digest()
    if state in ("held, no abort yet", "checkpoint dumped"):
        ckpt = CheckpointOut(client.detach(), client.info, client.image_files)
        ckpt.link.hold(nonce=NONCE)
        if state == "checkpoint dumped":
            ckpt.write(tmp, 0)
        try:
            yield Source(client, ckpt.link)
        finally:
            client.reattach(ckpt.abort())
            client.call("__mig_unhold")
        assert client.ecall.digest() == digest
        return
    with migration_pair(world, "b") as (dest, _, addr):
        run = start_transfer(client, addr)
        assert run.error is None, run.error
        launch.track(dest.pid)
        run.out.link.hold(nonce=NONCE)
        if state == "COMMIT decided":
            run.out.decide()
        try:
            yield Source(client, run.out.link)
        finally:
            if state == "COMMIT decided":
                run.out.deliver()
                dest.join()
                assert dest.active and dest.enclave_sock is not None, dest.error
                source = client.info.pid
                client.reattach(dest.enclave_sock)
                dest.enclave_sock = None
                run.out.release()
                assert wait_gone(source), "the released source enclave still runs"
            else:
                run.resume()
                client.call("__mig_unhold")
                dest.join()
    assert client.ecall.digest() == digest


@contextlib.contextmanager
def holder_of(link: EnclaveLink) -> Iterator[socket.socket]:
    """Another descriptor of the driver's end: what a child of the application holds."""

    sock = socket.socket(fileno=os.dup(link.sock.fileno()))  # (blocking: one file, shared
    with sock:  # with the driver's; a timeout would make its reads non-blocking too)
        yield sock


def _refused(msg: dict[str, Any], code: str) -> bool:
    return msg["t"] == "err" and msg["code"] == code


@pytest.mark.parametrize("state", KEPT)
def test_a_holder_neither_lets_go_of_nor_takes_over_the_drivers_hold(
    state: str, world: World, launch: Launcher, tmp_path: Path
) -> None:
    """Before, ``__mig_unhold`` let the duplicate go in every state, and a
    ``__mig_hold`` with an invented nonce replaced it: the driver's death was then an
    end of file that ended the enclave with the only copy."""

    with source_in(state, world, launch, tmp_path) as src, holder_of(src.link) as app:
        answer = _answer(app, _send(app, "__mig_unhold", []))
        assert _refused(answer, "hold-kept"), answer
        mine, other = socket.socketpair()
        with mine, other:
            answer = _answer(app, send_hold(app, b"invented", [mine.fileno()]))
        assert _refused(answer, "hold-kept"), answer
        answer = _answer(app, _send(app, "__mig_held", [b"invented"]))
        assert _refused(answer, "not-this-hold"), answer
        src.link.call("__mig_held", NONCE)  # the driver's hold, still held


def test_after_the_abort_it_answered_the_application_lets_it_go(
    world: World, launch: Launcher
) -> None:
    client = launch("kvstore")
    fill_kvstore(client, count=8)
    digest = client.ecall.digest()
    with migration_pair(world, "b") as (dest, _, addr):
        run = start_transfer(client, addr)
        assert run.error is None, run.error
        launch.track(dest.pid)
        run.out.link.hold(nonce=NONCE)
        sock = run.out.abort("the test aborts")
        with holder_of(run.out.link) as app:
            assert _answer(app, _send(app, "__mig_unhold", []))["t"] == "ret"
            answer = _answer(app, _send(app, "__mig_held", [NONCE]))
            assert _refused(answer, "not-this-hold"), answer  # let go
        client.reattach(sock)
        run.peer.close()
        dest.join()
    assert client.ecall.digest() == digest


@pytest.mark.parametrize("state", ["checkpoint dumped", "LOADED, undecided"])
def test_a_watch_frame_without_its_pidfds_puts_nothing_out_of_step(
    state: str, world: World, launch: Launcher, tmp_path: Path
) -> None:
    """A bare ``__mig_watch`` with the driver's next call right behind it.  Before, the
    enclave waited for the pidfds and took the first byte of that call for them: the
    stream out of step, the call never answered, the migration in doubt."""

    with source_in(state, world, launch, tmp_path) as src, holder_of(src.link) as app:
        watch = _send(app, "__mig_watch", [b"invented"])
        held = _send(app, "__mig_held", [NONCE])
        first = recv_frame(app, ECALL, max_size=ECALL_FRAME_MAX)
        second = recv_frame(app, ECALL, max_size=ECALL_FRAME_MAX)
        assert (first["id"], first["t"]) == (watch, "err"), first
        assert (second["id"], second["t"]) == (held, "ret"), second
        assert src.link.call("__mig_status")["role"] == "source"


@pytest.mark.parametrize("state", ["checkpoint dumped", "COMMIT decided"])
def test_a_holder_that_destroys_its_client_ends_nothing(
    state: str, world: World, launch: Launcher, tmp_path: Path
) -> None:
    """A holder outside the fence destroys its ``EnclaveClient``.  Before, its
    ``shutdown`` reached the duplicate the enclave holds (one socket): the enclave read
    end of file and ended with a frozen or committed state.  Now it reads the
    ``destroy``, keeps the state and serves on."""

    with source_in(state, world, launch, tmp_path) as src:
        sock = socket.socket(fileno=os.dup(src.link.sock.fileno()))
        EnclaveClient(sock, src.client.info).destroy()
        src.link.call("__mig_held", NONCE)
        assert src.link.call("__mig_status")["role"] == "source"


def test_a_stopped_enclave_costs_the_watch_one_bound(world: World, launch: Launcher) -> None:
    """Three enclaves given back after an abort, the middle one stopped: the driver asks
    all three at once; the other two take their sets, and the stopped one its own once
    it runs again.  Every enclave then goes back to the application, every write."""

    from migsgx.agent.applink import AppLink
    from migsgx.agent.ckpt_journal import start_time
    from migsgx.agent.handback import call_enclave
    from migsgx.agent.holders import watch_holders
    from migsgx.host.appctl import MigrationControl

    if os.geteuid() != 0:
        pytest.skip("the driver asks the kernel which namespace a socket lives in (root)")
    clients = [launch("kvstore") for _ in range(3)]
    digests = []
    for client in clients:
        fill_kvstore(client, count=4)
        digests.append(client.ecall.digest())
    control = MigrationControl(clients).start()
    try:
        link = AppLink(os.getpid(), control.name)
        handed = link.prepare()
        holders: list[object] = []
        for i, one in enumerate(handed):
            nonce = NONCE + bytes([i])
            fd = EnclaveLink(one.sock).hold(os.getpid(), nonce)
            pid = one.info.pid
            holders.append([pid, fd, start_time(pid), nonce.hex()])
            answer = call_enclave(one.sock, "__mig_abort", ["the test aborts"])
            assert answer is not None and answer["t"] == "ret", answer
        stopped = handed[1].info.pid
        os.kill(stopped, signal.SIGSTOP)
        try:
            told = watch_holders([one.sock for one in handed], holders, os.getpid())
        finally:
            os.kill(stopped, signal.SIGCONT)
        assert told == [0, 2]
        link.resume([one.sock for one in handed])
        assert [client.ecall.digest() for client in clients] == digests
    finally:
        control.close()
