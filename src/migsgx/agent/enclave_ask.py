"""One bounded question to a source enclave: answered, dead, or hung.

Whoever holds a source enclave's connection after the tool died (its guardian,
or ``migsgx recover`` once it took the connection back from the enclave itself,
:mod:`.holders`) asks it runtime calls: abort, commit, release, whether a hold
is the recorded one.  One rule for all of them, here:

* **answered**: its answer came within :data:`HUNG_WAIT` seconds;
* **dead**: its connection reached end of file (an enclave closes it only as
  its process ends, :func:`.lost_enclaves.hung_up`);
* **hung**: its connection open and no answer in time (stopped, or stuck, or
  busy beyond the bound).  Its state may be intact: it is neither dead nor
  decided, and nothing is decided from its silence.  The question stays
  written on the connection: an enclave that comes back (SIGCONT) reads it
  and acts on it then, so only questions whose late effect is the one already
  decided (an abort before any COMMIT, a commit after one, a release once the
  destination runs) are asked with a bound.

Each call has an id of its own, far from the tool's (its link counts from
2**40), so that a late answer to a call of the dead tool, or of a call that
timed out here, is never taken for a later call's answer.
"""

from __future__ import annotations

import contextlib
import itertools
import socket
from dataclasses import dataclass
from typing import Any, Final, Literal

from ..channel import ECALL, ECALL_FRAME_MAX
from ..errors import ConnectionClosedError, InDoubtError, MigSGXError
from ..wire import recv_frame, send_frame
from .lost_enclaves import hung_up

__all__ = ["HUNG_WAIT", "Answer", "EnclaveHungError", "ask", "not_answering"]

#: How long one source enclave has to answer one call before it is taken for hung
#: (its connection open, no answer): the guardian asks it again later, ``migsgx
#: recover`` reports it in doubt.
HUNG_WAIT: Final = 5.0

_CALL_IDS: Final = itertools.count((1 << 52) + 7)


@dataclass(frozen=True)
class Answer:
    """What became of one call: its answer frame, or why there is none."""

    msg: dict[str, Any] | None
    state: Literal["answered", "dead", "hung"]


class EnclaveHungError(InDoubtError):
    """A source enclave did not answer within the bound, its connection open."""

    def __init__(self, index: int, pid: int, call: str) -> None:
        super().__init__(not_answering(index, pid, call))
        self.index = index
        self.pid = pid


def not_answering(index: int, pid: int, call: str) -> str:
    """How a hung enclave is named in a log line or a resolution's detail."""

    who = f"enclave {index}" + (f" (pid {pid})" if pid > 0 else "")
    return (
        f"{who} is not answering ({call}; stopped or busy, its connection open): "
        "neither dead nor decided by that"
    )


def ask(sock: socket.socket, fn: str, args: list[object], wait: float | None = None) -> Answer:
    """Call ``fn`` on the enclave at ``sock``; its answer within ``wait`` seconds
    (:data:`HUNG_WAIT` unless given), or why not.

    Dead only on proof (the enclave's end closed); anything else without an
    answer is hung: a stream left inside a frame answers nothing later either,
    and is reported, never taken for a death.
    """

    call_id = next(_CALL_IDS)
    sock.settimeout(HUNG_WAIT if wait is None else wait)
    try:
        send_frame(
            sock, {"t": "ecall", "id": call_id, "fn": fn, "args": args}, max_size=ECALL_FRAME_MAX
        )
        while True:
            msg = recv_frame(sock, ECALL, max_size=ECALL_FRAME_MAX)
            if msg.get("id") == call_id:
                return Answer(msg, "answered")
    except ConnectionClosedError:
        return Answer(None, "dead")
    except (MigSGXError, OSError):
        return Answer(None, "dead" if hung_up(sock) else "hung")
    finally:
        with contextlib.suppress(OSError):
            sock.settimeout(None)
