"""The driver's ``__mig_watch`` form, and a late ``W`` or ``H``, on a real enclave process.

A source enclave of host ``a``'s platform service, its checkpoint driver's hold
given (``channels.md`` 7.1).  The driver's own watch (the frame, then ``W`` with
the pidfds: the form every enclave runtime reads) is taken; then a ``W`` and an
``H`` that come after their call was refused (a driver preempted between its two
writes on a loaded host) are passed over: the next call is answered, the enclave
serves on, and its state goes back to the application with every write.
Before, the late byte and three bytes of the next frame were read as a header:
a bad frame ended the enclave's serve loop.
"""

from __future__ import annotations

import os
import socket

import pytest

pytest.register_assert_rewrite("state_helpers")

from ecall_frames import answer as _answer  # noqa: E402
from ecall_frames import send_ecall as _send  # noqa: E402
from state_helpers import Launcher, fill_kvstore  # noqa: E402

from migsgx.agent.watch_ask import ask_all  # noqa: E402
from migsgx.channel import HOLD_BYTE, WATCH_BYTE  # noqa: E402
from migsgx.datapath.checkpoint import CheckpointOut  # noqa: E402

pytest_plugins = ["state_helpers"]
pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

NONCE = b"the-drivers-nonce-watch-compat"


def test_the_drivers_watch_and_late_follow_ups_keep_the_stream_in_step(
    launch: Launcher,
) -> None:
    client = launch("kvstore")
    fill_kvstore(client, count=8)
    digest = client.ecall.digest()
    ckpt = CheckpointOut(client.detach(), client.info, client.image_files)
    ckpt.link.hold(nonce=NONCE)
    driver = ckpt.link.sock
    try:
        pidfd = os.pidfd_open(os.getpid())
        try:
            [(answer, why)] = ask_all([(driver, NONCE, [pidfd])])
            assert answer is not None and answer["t"] == "ret" and answer["value"] == 1, why

            # A W after its watch was refused (the refusal read first: no sleep).
            refused = _answer(driver, _send(driver, "__mig_watch", [NONCE]))
            assert (refused["t"], refused["code"]) == ("err", "protocol"), refused
            socket.send_fds(driver, [WATCH_BYTE], [pidfd])
            answer = _answer(driver, _send(driver, "__mig_held", [NONCE]))
            assert answer["t"] == "ret", answer
        finally:
            os.close(pidfd)

        # An H after its hold was refused (something else followed the frame).
        hold = _send(driver, "__mig_hold", [NONCE])
        status = _send(driver, "__mig_status", [])
        refused = _answer(driver, hold)
        assert (refused["t"], refused["code"]) == ("err", "protocol"), refused
        assert _answer(driver, status)["t"] == "ret"
        mine, other = socket.socketpair()
        with mine, other:
            socket.send_fds(driver, [HOLD_BYTE], [mine.fileno()])
        answer = _answer(driver, _send(driver, "__mig_held", [NONCE]))
        assert answer["t"] == "ret", answer
    finally:
        client.reattach(ckpt.abort())
        client.call("__mig_unhold")
    assert client.ecall.digest() == digest
