"""Taking a source enclave's connection back from the enclave itself, after its holders died.

A checkpoint or migration tool gives every source enclave a duplicate of its
own end of the enclave's connection (``__mig_hold``, ``docs/spec/channels.md``
7.1) and records, per enclave, ``[pid, fd, start]`` (the enclave process, the
duplicate's number there, the process's start time) in its journal.  Should
the tool and its guardian both die, the enclave sees no end of file and keeps
its state; root then takes the duplicate back (``pidfd_getfd``) to abort a
checkpoint and hand the enclave back (``migsgx recover --checkpoint``), or to
deliver a committed migration's state again (``migsgx recover``).

The journal lies in a directory its owner may write, and is no order to root:
a descriptor is taken only from a live process with the recorded start time
that is an enclave runtime process, and only if it is a Unix stream socket.
Nothing is written to anything else.
"""

from __future__ import annotations

import contextlib
import socket
from pathlib import Path

from .._fds import take_descriptor
from .ckpt_journal import start_time

__all__ = ["is_enclave_runtime", "take_held"]


def is_enclave_runtime(pid: int) -> bool:
    """Whether ``pid`` is an enclave runtime process (its command line says so).

    Without this check a forged holder entry would have root write a frame
    into any process's socket.
    """

    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"migsgx.enclave.runtime" in argv


def take_held(holders: object) -> dict[int, socket.socket]:
    """The connections the recorded enclaves hold, by their position in ``holders``.

    ``holders`` is the journal's list of ``[pid, fd, start]``.  An entry that
    is malformed, names a process that is gone, reused (another start time) or
    not an enclave runtime, or a descriptor that is not a Unix stream socket,
    is left out (and nothing is written to it).
    """

    taken: dict[int, socket.socket] = {}
    for index, item in enumerate(holders if isinstance(holders, list) else []):
        if not (isinstance(item, list) and len(item) == 3):
            continue
        pid, fd, start = item
        if not (isinstance(pid, int) and isinstance(fd, int) and isinstance(start, str)):
            continue
        if isinstance(pid, bool) or isinstance(fd, bool) or pid <= 0 or fd < 0:
            continue
        if not start or start_time(pid) != start or not is_enclave_runtime(pid):
            continue
        with contextlib.suppress(OSError):
            sock = take_descriptor(pid, fd)
            if sock.family == socket.AF_UNIX and sock.type == socket.SOCK_STREAM:
                taken[index] = sock
            else:
                sock.close()
    return taken
