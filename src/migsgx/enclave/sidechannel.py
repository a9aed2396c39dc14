"""The pre-copy side channel: migration calls beside the application's ECALLs.

A live migration streams enclave memory while the application keeps calling
into the enclave, so its driver cannot take the application's connection the
way a stop-and-copy migration does (``host.client.EnclaveClient.detach``).
The application opens a second connection instead (``__mig_side``, one
descriptor attached; :meth:`EnclaveClient.open_side_channel`), and hands it to
the migration tool.  On it the enclave serves only the calls a pre-copy needs,
one at a time; the final dump and the commit go over the application's
connection after it was handed over as today.

If the side channel closes while rounds run (the tool died, or gave up), the
migration is aborted here: the source enclave runs on as if nothing happened.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable
from typing import Any, Final

from ..channel import ECALL, ECALL_FRAME_MAX
from ..errors import MigSGXError, ProtocolError
from ..wire import recv_frame, send_frame
from .migrator import Migrator

__all__ = ["SIDE_CALLS", "receive_side_channel"]

SIDE_CALLS: Final = frozenset(
    {"__mig_out_start", "__mig_hs", "__mig_track", "__mig_round", "__mig_abort", "__mig_status"}
)


def receive_side_channel(
    sock: socket.socket,
    migrator: Migrator,
    log: Callable[[str], None],
    after_abort: Callable[..., None] | None = None,
) -> None:
    """Take the descriptor that follows a ``__mig_side`` frame and serve it in a thread.

    ``after_abort(answered=...)``: what an abort on the side channel (asked, or its
    driver gone) leaves of the duplicate the application's connection holds, as the
    application channel's own ``__mig_abort`` does.
    """

    try:
        _data, fds, _flags, _addr = socket.recv_fds(sock, 1, 1)
    except OSError as exc:
        raise ProtocolError("no side channel arrived") from exc
    if len(fds) != 1:
        for fd in fds:
            with contextlib.suppress(OSError):
                socket.close(fd)
        raise ProtocolError("a side channel is one descriptor")
    side = socket.socket(fileno=fds[0])
    threading.Thread(
        target=_serve, args=(side, migrator, log, after_abort), name="migsgx-side", daemon=True
    ).start()


def _serve(
    side: socket.socket,
    migrator: Migrator,
    log: Callable[[str], None],
    after_abort: Callable[..., None] | None = None,
) -> None:
    try:
        while True:
            try:
                msg = recv_frame(side, ECALL, max_size=ECALL_FRAME_MAX)
            except (OSError, MigSGXError):
                return
            if msg["t"] != "ecall":
                return
            call_id, name = msg["id"], msg["fn"]
            reply: dict[str, Any]
            try:
                if name == "__mig_ring":
                    migrator.attach_ring(side)
                    value: Any = None
                elif name == "__mig_abort":
                    try:
                        value = migrator.call(name, msg["args"])
                    except BaseException:
                        if after_abort is not None:
                            after_abort(answered=False)
                        raise
                    if after_abort is not None:
                        after_abort(answered=True)  # (before the answer, as on the app's)
                elif name in SIDE_CALLS:
                    value = migrator.call(name, msg["args"])
                else:
                    raise ProtocolError(f"{name!r} is not served on the side channel")
                reply = {"t": "ret", "id": call_id, "value": value}
            except MigSGXError as exc:
                reply = {"t": "err", "id": call_id, "code": exc.code, "message": exc.message}
            except Exception as exc:
                log(f"side channel call {name} failed: {type(exc).__name__}")
                message = f"{name} failed inside the enclave: {type(exc).__name__}"
                reply = {"t": "err", "id": call_id, "code": "migration", "message": message}
            try:
                send_frame(side, reply, max_size=ECALL_FRAME_MAX)
            except (OSError, MigSGXError):
                return
    finally:
        if migrator.precopy_active():
            log("pre-copy driver went away: migration aborted, the enclave runs on")
            answered = False
            with contextlib.suppress(MigSGXError):
                migrator.abort("the pre-copy driver went away")
                answered = True
            if after_abort is not None:
                after_abort(answered=answered)
        with contextlib.suppress(OSError):
            side.close()
