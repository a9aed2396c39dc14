"""Post-copy in a migration: CRIU's lazy dump in a thread, the window on each side.

CRIU serves lazy pages only *after* its ``post-dump`` step returns, while the
stop-and-copy migration restores and commits *inside* that step.  With
post-copy the order changes (docs/spec/commit.md, "Post-copy"):

1. in ``post-dump`` (the tree frozen, its images complete but for private
   memory): the enclaves finish, the images move, the tree is fenced
   (SIGSTOP queued), and the step returns;
2. CRIU serves pages on a port of its own (mutual TLS, agent identities) and,
   when done, leaves the tree stopped: it never kills it, because the commit
   may still fail;
3. the destination restores the tree held, with ``criu lazy-pages`` connected
   to that port; the enclaves commit (**the commit point**); the destination
   lets the tree run, and it pulls what is still missing: *the window*;
4. the destination reports the window closed (every page arrived); only then
   is the migration done, and the source tree killed.  A CRIU that ends its
   lazy dump "successfully" proves nothing: the destination's word does.

Before the commit point a failure makes CRIU give the tree back
(:meth:`LazyDump.stop`), and the roll-back thaws it.  After it, a lost source
is :class:`~migsgx.errors.SourceLostError` (exit status 9): the destination
tree is killed, never left running with pages missing.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Final

from .. import _proc
from ..containers.postcopy import PostCopyRestore, WindowReport, served_port
from ..errors import SourceLostError

__all__ = ["LazyDump", "Window", "still_serving"]

log = logging.getLogger("migsgx.migrate")

#: How long the source's CRIU may take to end on its own once the destination
#: dropped its page connection, before it is ended (it may wait for none).
LET_GO: Final = 2.0
#: How long it may take to end after SIGKILL.
STOP_GRACE: Final = 10.0


class LazyDump:
    """The source's lazy dump, run in a thread: ``post-dump`` first, pages after.

    ``dump`` runs the driver's dump with the ``post-dump`` callback it is
    given; :meth:`wait_dumped` returns once that callback returned (or raises
    the dump's error: CRIU then resumed the tree, the veto of stop-and-copy).
    """

    def __init__(
        self,
        dump: Callable[[Callable[[], None]], None],
        on_dumped: Callable[[], None],
        images: Path,
    ) -> None:
        self.images = images
        #: The processes serving the pages (a driver may run its own: runc's CRIU).
        self.serving: Callable[[], list[int]] = _criu_children
        self.error: BaseException | None = None
        self._dumped = threading.Event()
        self._callback_ok = False
        #: Why ``post-dump`` failed: CRIU goes on to serve pages all the same.
        self._callback_error: BaseException | None = None

        def callback() -> None:
            try:
                on_dumped()
            except BaseException as exc:
                self._callback_error = exc
                self._dumped.set()
                raise
            self._callback_ok = True
            self._dumped.set()

        def work() -> None:
            try:
                dump(callback)
            except BaseException as exc:
                self.error = exc
            finally:
                self._dumped.set()

        self.thread = threading.Thread(target=work, name="migsgx-lazy-dump", daemon=True)
        self.thread.start()

    def wait_dumped(self) -> None:
        """Block until ``post-dump`` returned; the dump's error if it never did.

        A ``post-dump`` step that failed is vetoed, but CRIU's lazy dump then goes
        on to serve pages regardless (``cr_dump_finish`` serves on its own result,
        not the script's) and waits in ``accept`` for a destination that will not
        come, the tree seized: it is ended (:meth:`stop`), which lets the tree go,
        and the step's error is raised (the dump's, where CRIU ended by itself).
        """

        self._dumped.wait()
        if self._callback_ok:
            return
        if self._callback_error is not None:
            if self.finish(LET_GO) and self.error is not None:
                raise self.error  # (CRIU failed the step itself: its error names the cause)
            self._kill()
            raise self._callback_error
        self.thread.join()
        assert self.error is not None
        raise self.error

    def port(self, timeout: float) -> int:
        return served_port(self.images, timeout=timeout, alive=self.thread.is_alive)

    def finish(self, timeout: float) -> bool:
        """Whether CRIU ended (served every page, or failed) within ``timeout``."""

        self.thread.join(timeout)
        return not self.thread.is_alive()

    def criu_pids(self) -> list[int]:
        """The serving CRIU's pids (for the guardian), while it runs."""

        return self.serving() if self.thread.is_alive() else []

    def stop(self) -> None:
        """Make CRIU let go of the tree now; it still waits for a destination.

        The destination dropped (or never opened) its page connection; a CRIU
        that still waits in ``accept`` is ended.  Only then may the tree be
        thawed: a SIGCONT while CRIU holds it would be undone by CRIU itself.
        """

        if self.finish(LET_GO):
            return
        self._kill()

    def _kill(self) -> None:
        for pid in self.serving():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if not self.finish(STOP_GRACE):
            log.error("the source's CRIU did not end; the tree may stay stopped")


def still_serving(pid: int) -> bool:
    """Whether ``pid`` is still a CRIU or runc process: a noted server's pid may have
    been reused since (a guardian that SIGKILLed it blindly killed whatever runs now)."""

    argv0 = _proc.argv(pid)[:1]
    return bool(argv0) and Path(argv0[0].decode(errors="replace")).name.startswith(("criu", "runc"))


def _criu_children() -> list[int]:
    """This process's ``criu swrk`` children (the lazy dump's server)."""

    found: list[int] = []
    for pid in _proc.scanned_children(os.getpid()):
        argv = _proc.argv(pid)
        # (CRIU renames itself "criu: dump --rpc ..." once it runs the request)
        if b"swrk" in argv[1:2] or any(a.startswith(b"criu: ") for a in argv[:1]):
            found.append(pid)
    return found


class Window:
    """The destination's side of the window: watched from the moment the tree runs.

    Whoever let the tree run (the tool's ``resume``, or a roll-forward without
    the tool) starts the watch; the daemon's end closes it, a failure kills the
    tree (:class:`PostCopyRestore` keeps its pages from reading zeros).
    """

    def __init__(
        self,
        post: PostCopyRestore,
        timeout: float,
        tag: str,
        *,
        on_lost: Callable[[], None] | None = None,
    ) -> None:
        self.post = post
        self.on_lost = on_lost  # after the tree was killed (a container's remains go)
        self.timeout = timeout
        self.tag = tag
        self.report: WindowReport | None = None
        self.error: SourceLostError | None = None
        self.running = False
        self.watching = False
        self._done = threading.Event()

    def run(self) -> None:
        """Let the held tree run and watch the window in a thread."""

        self.watching = True
        try:
            if self.post.serving:
                self.post.run()
                self.running = True
        finally:
            # (a daemon that already failed: the tree never runs, the watch kills it;
            # a run that failed midway may have let it run: the window's report says)
            threading.Thread(target=self._watch, name="migsgx-agent-window", daemon=True).start()

    def _watch(self) -> None:
        try:
            self.report = self.post.wait(self.timeout, on_lost=self.on_lost)
            log.info(
                "migration %s: post-copy window closed after %.3f s",
                self.tag, self.report.window_seconds,
            )  # fmt: skip
        except SourceLostError as exc:
            self.error = exc
            log.error("migration %s: %s", self.tag, exc)
        finally:
            self.post.close()
            self._done.set()

    def wait(self) -> WindowReport:
        """The closed window, or :class:`SourceLostError` (the tree is dead by then)."""

        self._done.wait()
        if self.error is not None:
            raise SourceLostError(self.error.message, **self.error.context)
        assert self.report is not None
        return self.report

    def close(self) -> None:
        """Before the watch: the daemon goes (its tree is discarded by the caller)."""

        if not self.watching:
            self.post.close()
