"""Post-copy of a runc container: ``runc checkpoint --lazy-pages`` served in CRIU's TLS.

runc drives CRIU for us (its mounts, cgroups, namespaces, descriptors), and
1.1 has the lazy half of CRIU's post-copy: ``checkpoint --lazy-pages
--page-server ADDRESS:PORT --status-fd FD`` dumps every image but the private
memory, writes to FD once CRIU listens on PORT, and returns only after the
destination pulled every page; ``restore --lazy-pages`` restores with
userfaultfd, its faults answered by a ``criu lazy-pages`` daemon.

runc has no option for CRIU's TLS, but the CRIU it starts reads the
configuration file named by ``CRIU_CONFIG_FILE`` (its environment is runc's),
and that file holds ``tls`` and the agent identity's paths: the page stream is
mutual TLS exactly as the pid driver's.  The file names paths, no secret, and
lives outside the images (nothing of it travels).

The container is frozen (its cgroup) before the checkpoint; CRIU thaws the
cgroup once it holds every task (ptrace), the engine's fence queues SIGSTOP
to each while CRIU still holds them, and CRIU freezes the cgroup again when it
lets go after the last page (``--leave-running`` on a frozen cgroup).  The
engine then settles the source through
:attr:`~.base.DumpPlan.settle`: removed once committed, thawed otherwise.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import tempfile
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Final

from ..criu import log_excerpt
from ..system.process import children
from .base import ContainerError, DumpPlan, Source
from .cgroups import Freezer
from .frozen import end_frozen, give_back, listeners_gated, resume_frozen, stop_if_cancelled
from .postcopy import check_pipe_max_size

__all__ = ["LazyCheckpoint", "dump_lazy", "free_port"]

log = logging.getLogger("migsgx.containers")

#: How long the checkpoint may take to end once its CRIU was killed.
STOP_GRACE: Final = 10.0

Tls = tuple[Path, Path, Path]  # (CA certificate, certificate, key)


def free_port() -> int:
    """A TCP port free on this host now (runc wants a port, not 0, for its page server)."""

    import socket  # (only here: the module stays free of sockets otherwise)

    with socket.socket() as sock:
        sock.bind(("", 0))
        return int(sock.getsockname()[1])


def _tls_config(tls: Tls) -> Path:
    ca, cert, key = tls
    fd, name = tempfile.mkstemp(prefix="migsgx-criu-tls-", suffix=".conf")
    with os.fdopen(fd, "w") as out:
        out.write(f"tls\ntls-cacert {ca}\ntls-cert {cert}\ntls-key {key}\n")
    return Path(name)


class LazyCheckpoint:
    """``runc checkpoint --lazy-pages`` running: ready once CRIU serves, done once served."""

    def __init__(
        self,
        argv: Sequence[str],
        images: Path,
        *,
        tls: Tls | None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.images = images
        self.config = _tls_config(tls) if tls is not None else None
        environ = dict(os.environ if env is None else env)
        if self.config is not None:
            environ["CRIU_CONFIG_FILE"] = str(self.config)
        ready_r, ready_w = os.pipe()
        # (runc's stderr, read on a failure; open as long as the process runs)
        self._err = tempfile.TemporaryFile(prefix="migsgx-engine-")  # noqa: SIM115
        try:
            self.proc = subprocess.Popen(
                [*argv[:-1], "--status-fd", str(ready_w), argv[-1]],
                pass_fds=(ready_w,),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=self._err,
                env=environ,
            )
        except OSError as exc:
            os.close(ready_r)
            self._cleanup()
            raise ContainerError(f"cannot run runc checkpoint: {exc}") from exc
        finally:
            os.close(ready_w)
        self._ready = ready_r

    def wait_ready(self) -> None:
        """Until CRIU serves pages (every other image is complete); its error if it ends."""

        with os.fdopen(self._ready, "rb") as ready:
            served = ready.read(1)
        self._cleanup()  # (CRIU read its configuration when it started)
        if served:
            return
        self.proc.wait()
        raise ContainerError(f"runc checkpoint --lazy-pages failed: {self._why()}")

    def wait(self) -> None:
        """Until the destination pulled every page (or the serving failed)."""

        code = self.proc.wait()
        why = self._why() if code != 0 else ""
        self._cleanup()
        self._err.close()
        if code != 0:
            raise ContainerError(f"runc checkpoint --lazy-pages ended with {code}: {why}")

    def pids(self) -> list[int]:
        """runc and the CRIU it runs, while they run (the guardian ends them if the tool dies)."""

        if self.proc.poll() is not None:
            return []
        return [*children(self.proc.pid), self.proc.pid]

    def stop(self) -> None:
        """End the serving now: CRIU first (it lets go of the tree), then runc."""

        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        try:
            self.proc.wait(STOP_GRACE)
        except subprocess.TimeoutExpired:
            log.error("runc checkpoint did not end; the container may stay frozen")
        self._cleanup()

    def _why(self) -> str:
        with contextlib.suppress(OSError, ValueError):  # (ValueError: closed already)
            self._err.seek(0)
            lines = self._err.read().decode("utf-8", "replace").strip().splitlines()[-4:]
            return " | ".join(lines) + "\n" + log_excerpt(self.images / "dump.log")
        return log_excerpt(self.images / "dump.log")

    def _cleanup(self) -> None:
        if self.config is not None:
            with contextlib.suppress(OSError):
                self.config.unlink()


def dump_lazy(
    source: Source,
    plan: DumpPlan,
    on_dumped: Callable[[], None],
    *,
    start: Callable[[], LazyCheckpoint],
    copy_files: Callable[[], None],
    remove: Callable[[], object],
    unlock: Callable[[], object] | None = None,
) -> None:
    """The driver's dump in post-copy: freeze, serve lazily, leave the decision to the engine.

    ``on_dumped`` runs once CRIU serves (the images are complete); a failure up
    to its return ends the serving and thaws (and unlocks) the container here.
    Afterwards the engine owns the outcome: this returns once every page was
    served (or raises the serving's error), and :attr:`DumpPlan.settle` removes
    the frozen source (committed) or makes it run again (not committed).
    """

    check_pipe_max_size()
    with listeners_gated(source, plan, unlock):  # (as dump_frozen)
        freezer = Freezer.of_pid(source.root)
        plan.note(f"thaw {freezer.control}")
        running: LazyCheckpoint | None = None
        handed = False
        try:
            stop_if_cancelled(plan)  # an enclave stream failed already: nothing to freeze for
            freezer.freeze()
            running = start()
            plan.note("criu " + " ".join(map(str, running.pids())))
            running.wait_ready()
            # (CRIU thawed the cgroup once it held every task; it freezes it again when it
            # lets go after the last page.  Meanwhile the engine's fence stops the tasks.)
            copy_files()
            settled = threading.Lock()

            def settle(committed: bool) -> None:
                if not settled.acquire(blocking=False):
                    return  # once
                assert running is not None
                running.stop()  # (after the last page it has ended already)
                if committed:
                    end_frozen(source, freezer, remove)
                    return
                resume_frozen(source.root, freezer)
                if unlock is not None:
                    unlock()

            plan.settle = settle
            plan.lazy_pids = running.pids
            on_dumped()
            handed = True
        finally:
            if not handed:
                plan.settle = None
                if running is not None:
                    running.stop()
                give_back(source, freezer, plan, unlock)
        assert running is not None
        running.wait()
