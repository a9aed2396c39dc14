"""One CRIU dump at a time in a task's working directory: CRIU's ``proc.crtools`` lives there.

CRIU's parasite reaches ``/proc`` from inside the dumped task.  Where the
task's ``/proc`` is not its pid namespace's (a process in a pid namespace of its
own that kept its host's ``/proc``, as ``unshare --pid --fork`` leaves it), the
parasite makes a directory ``proc.crtools`` in the task's *working directory*,
mounts ``/proc`` there, and removes it again (``criu/pie/parasite.c``,
``get_proc_fd``).  Two dumps of tasks sharing a working directory at once then
race for that name: the loser fails with ``Can't create a directory (-17)``
(found by two storms migrating at once, ``docs/migration.md``).  A dump cut short
there leaves the directory, and every later dump of a task in that directory
fails the same way.

So a dump holds an exclusive ``flock`` on the task's working directory until
its ``post-dump`` step (every parasite is gone by then), and while it holds it
a ``proc.crtools`` found there is one left behind: removed if empty.  Only
migsgx's dumps take the lock; a CRIU started by hand beside them still races.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import time
from collections.abc import Callable, Iterator
from typing import Final

__all__ = ["PROC_DIR", "workdir_held"]

#: The parasite's directory (``proc_mountpoint`` in CRIU's ``criu/pie/parasite.c``).
PROC_DIR: Final = "proc.crtools"
#: How long a dump waits for another one in the same directory (its parasite phase).
WAIT_SECONDS: Final = 120.0


@contextlib.contextmanager
def workdir_held(pid: int) -> Iterator[Callable[[], None]]:
    """Hold ``pid``'s working directory for a dump; yields a ``release`` (idempotent).

    A task that is gone (or whose directory cannot be opened) is not held: CRIU
    says what is wrong with it.  Past :data:`WAIT_SECONDS` the dump goes ahead
    unlocked (CRIU may then fail as it would have without the lock).
    """

    try:
        fd = os.open(f"/proc/{pid}/cwd", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        yield lambda: None
        return
    held = [fd]

    def release() -> None:
        while held:
            os.close(held.pop())  # (closing the last descriptor ends the lock)

    try:
        if _lock(fd):
            with contextlib.suppress(OSError):  # (none there, or not empty: left as it is)
                os.rmdir(PROC_DIR, dir_fd=fd)
        yield release
    finally:
        release()


def _lock(fd: int) -> bool:
    deadline = time.monotonic() + WAIT_SECONDS
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EINTR):
                return False  # (a file system without flock: as before)
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
