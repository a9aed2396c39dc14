"""Fault injection: an enclave stream that fails while an engine's CRIU writes the pages.

``tool.enclave-stream:flip-byte-in-dump=N`` flips one bit of byte N of an
enclave stream (:func:`~.fault_relays.flipping_relay`) and lets the damaged byte go on
only once the dump's CRIU wrote :data:`PAGES_WRITTEN` of pages (into whatever
pages image it has open).  Left at that, the failure races the rest of CRIU's
dump: the destination enclave must refuse the chunk, the source hear it and
cancel, while CRIU writes on (a 128 MiB container's pages take a fraction of a
second).  So at that moment every CRIU process the tool's engines run is stopped
(SIGSTOP: unlike a kill, stopping CRIU is safe, its tasks stay seized) and
continued once the dump's cancel has run its stops (a cut fills the image
directory first), or after :data:`~.faults.WAIT_LIMIT` seconds: the failure then
always meets CRIU mid-dump, whatever the machine's load.  ``drop-in-dump=N``:
the same moment, and the relay shuts the stream's connection down instead.

A tool killed while it holds CRIU cannot continue it: the stopped CRIU keeps the
container's tasks seized, its engine waits on it, and the container stays
frozen for good.  So each held CRIU is noted to the tool's guardian
(``criu-held PID START``), which continues it once the tool is gone
(:func:`release_noted`) before it gives the source back, and waits for it to
end (:func:`wait_released`): a continued CRIU, its tool gone, fails its dump and
puts the container's freezer back as it found it (frozen: the tool froze it
first), so a thaw made before it ended would be undone.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final

from .. import _proc
from ..criu import DumpCancel
from ..system.process import process_state, tree_pids
from .faults import WAIT_LIMIT
from .held import start_time

__all__ = [
    "HELD_NOTE", "PAGES_WRITTEN", "RELEASE_WAIT", "MidDumpHold", "release_noted", "wait_released",
]  # fmt: skip

#: How much of a pages image the dump's CRIU has written when the damaged byte goes on.
PAGES_WRITTEN: Final = 1 << 20
#: The guardian's note of one CRIU process held: ``criu-held PID START``.
HELD_NOTE: Final = "criu-held"


def engine_criu() -> list[int]:
    """The live CRIU processes among this process's descendants (runc's, podman's runc's).

    A CRIU that exited and was not reaped yet (a zombie) writes nothing and
    cannot be stopped: noting it would only have the guardian look for it later.
    """

    return [
        pid
        for pid in tree_pids(os.getpid())[1:]
        if _proc.comm(pid) == "criu" and process_state(pid) not in ("", "Z", "X")
    ]


def pages_written(criu: list[int]) -> bool:
    """Whether a pages image one of the ``criu`` processes writes holds :data:`PAGES_WRITTEN`.

    Looked up through CRIU's own open files: wherever its engine has it write
    (the tool's image directory, a tmpfs over podman's checkpoint directory, or
    that directory itself when nothing could be mounted).
    """

    for pid in criu:
        for fd, link in _proc.fd_links(pid):
            name = link.rpartition("/")[2]
            if name.startswith("pages-") and name.endswith(".img"):
                with contextlib.suppress(OSError):
                    if os.stat(f"/proc/{pid}/fd/{fd}").st_size >= PAGES_WRITTEN:
                        return True
    return False


class MidDumpHold:
    """The relay's ``hold``: true once CRIU wrote enough, and CRIU stopped from then until
    the cancel (see the module docstring).

    ``images``: the dump's image directory (None before the dump).  ``cancel``:
    the dump's cancel, whose stops continue CRIU.  ``note``: tells the tool's
    guardian each CRIU held (continued by it if the tool dies meanwhile).
    """

    def __init__(
        self,
        images: Callable[[], Path | None],
        cancel: Callable[[], DumpCancel | None],
        note: Callable[[str], None] = lambda _line: None,
        *,
        kill: bool = False,
    ) -> None:
        self._kill = kill
        self._images = images
        self._cancel = cancel
        self._note = note
        self._lock = threading.Lock()
        self._held: list[int] | None = None

    def __call__(self) -> bool:
        with self._lock:
            if self._held is not None:
                return True
            if self._images() is None:
                return False  # (no dump yet)
            criu = engine_criu()
            if not pages_written(criu):
                return False
            self._held = criu
            for pid in self._held:
                # (noted first: a tool killed right after the stop leaves it to the guardian)
                self._note(f"{HELD_NOTE} {pid} {start_time(pid)}")
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGSTOP)
        # The fault proper (the damaged byte or the drop goes now): tests measure from here.
        sys.stderr.write(f"migsgx fault: tool.enclave-stream:mid-dump at {time.monotonic():.6f}\n")
        sys.stderr.flush()
        if self._kill:
            # ``kill-in-dump``: the tool dies right here, CRIU held, no cancel to come.
            os.kill(os.getpid(), signal.SIGKILL)
        timer = threading.Timer(WAIT_LIMIT, self.release)
        timer.daemon = True
        timer.start()
        cancel = self._cancel()
        if cancel is not None:
            cancel.add_stop(self._release_stop)
        return True

    def _release_stop(self) -> int:
        self.release()
        return 0  # (continuing CRIU cuts nothing)

    def release(self) -> None:
        """Continue the CRIU processes held (once; a pid no longer CRIU's is left alone)."""

        with self._lock:
            held, self._held = self._held or [], []
        for pid in held:
            if _proc.comm(pid) == "criu":
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)


def release_noted(notes: list[str]) -> list[int]:
    """Continue every CRIU a dead tool held (its ``criu-held`` notes); the pids continued.

    Only the very process noted (same pid and start time) and only while it is
    still CRIU: another tool's held CRIU is never touched.
    """

    continued = []
    for note in notes:
        parts = note.split()
        numbers = parts[1:]
        if (
            len(parts) != 3
            or parts[0] != HELD_NOTE
            or not all(p.isascii() and p.isdigit() for p in numbers)
        ):
            continue
        pid, start = int(parts[1]), int(parts[2])
        if pid > 0 and start_time(pid) == start and _proc.comm(pid) == "criu":
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
                continued.append(pid)
    return continued


#: How long the guardian waits for a CRIU it continued to end before it kills it.
RELEASE_WAIT: Final = 10.0


def wait_released(pids: list[int], wait: float = RELEASE_WAIT) -> list[int]:
    """Wait for each CRIU :func:`release_noted` continued to end; the pids killed.

    Continued with its tool gone, CRIU fails its dump at once and lets go of the
    tasks, restoring the cgroup freezer state it found (the tool froze the
    container first): the source is thawed only after that, or the thaw is undone
    (found by a run where the container stayed frozen for good).  One still there
    after ``wait`` seconds is killed (still CRIU only: a dump it cannot finish, the
    tool being dead; its tasks are released with it).
    """

    deadline = time.monotonic() + wait
    for pid in pids:
        while _proc.alive(pid) and time.monotonic() < deadline:
            time.sleep(0.02)
    killed = []
    for pid in pids:
        if _proc.alive(pid) and _proc.comm(pid) == "criu":
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
    return killed
