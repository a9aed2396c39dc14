"""runc's command line, with one state root and one CRIU (the ``runc`` driver's engine).

Kept apart from the driver (:mod:`.runc`): the lab and the benchmarks drive
runc directly through it too.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..criu import keep_log, log_excerpt
from .base import ContainerError
from .command import json_object, run_engine

__all__ = ["Runc"]


class Runc:
    """runc's command line, with one state root and one CRIU."""

    def __init__(self, root: Path | None, criu: Path, *, prefix: Sequence[str] = ()) -> None:
        """``prefix``: run runc under it (``nsenter --net=...``: CRIU connects from there)."""

        self.root = root
        self.criu = criu
        self.prefix = list(prefix)

    def argv(self, *args: str) -> list[str]:
        base = [*self.prefix, "runc"]
        if self.root is not None:
            base += ["--root", str(self.root)]
        return [*base, "--criu", str(self.criu), *args]

    def state(self, cid: str) -> dict[str, Any] | None:
        code, out, _ = run_engine(self.argv("state", cid), what="runc state", check=False)
        if code != 0:
            return None
        return json_object(out, f"runc state {cid}")

    def run(self, cid: str, bundle: Path) -> None:
        """Create and start a container, detached, with its stdio on /dev/null."""

        self._detached(["run", "--detach", "--bundle", str(bundle), cid], bundle, "runc run")

    def _detached(self, args: list[str], cwd: Path, what: str) -> None:
        """A runc command whose stdio the container inherits: errors come through ``--log``."""

        log_path = cwd / "runc.log"
        base = self.argv()
        at = len(self.prefix) + 1  # global options go right after "runc"
        argv = [*base[:at], "--log", str(log_path), "--log-format", "json", *base[at:], *args]
        try:
            code, _, _ = run_engine(argv, what=what, cwd=cwd, timeout=600, check=False,
                                    detached_stdio=True)  # fmt: skip
            if code != 0:
                keep_log(log_path, what)
                raise ContainerError(f"{what} failed (status {code}): {_runc_errors(log_path)}")
        finally:
            with contextlib.suppress(OSError):
                log_path.unlink()

    def checkpoint(
        self,
        cid: str,
        images: Path,
        *,
        page_server: tuple[str, int] | None,
        tcp_established: bool,
        leave_running: bool = True,
    ) -> None:
        args = self.checkpoint_args(
            cid, images, page_server=page_server, tcp_established=tcp_established,
            leave_running=leave_running,
        )  # fmt: skip
        try:
            run_engine(self.argv(*args), what=f"runc checkpoint {cid}", timeout=600)
        except ContainerError as exc:
            keep_log(images / "dump.log", f"runc checkpoint {cid}")
            raise ContainerError(f"{exc}\n{log_excerpt(images / 'dump.log')}") from exc

    @staticmethod
    def checkpoint_args(
        cid: str,
        images: Path,
        *,
        page_server: tuple[str, int] | None,
        tcp_established: bool,
        leave_running: bool = True,
        lazy_pages: bool = False,
    ) -> list[str]:
        """``checkpoint ... CID`` (the container id last)."""

        args = ["checkpoint", "--image-path", str(images), "--work-path", str(images)]
        args.append("--file-locks")  # held POSIX and flock locks move with the tree
        if leave_running:
            args.append("--leave-running")
        if tcp_established:
            args.append("--tcp-established")
        if lazy_pages:
            args.append("--lazy-pages")
        if page_server is not None:
            args += ["--page-server", f"{page_server[0]}:{page_server[1]}"]
        return [*args, cid]

    def restore(
        self, cid: str, bundle: Path, images: Path, work: Path, *, lazy_pages: bool = False
    ) -> None:
        args = ["restore", "--detach", "--file-locks", "--bundle", str(bundle)]
        args += ["--lazy-pages"] if lazy_pages else []
        args += ["--image-path", str(images), "--work-path", str(work), cid]
        try:
            self._detached(args, bundle, f"runc restore {cid}")
        except ContainerError as exc:
            keep_log(work / "restore.log", f"runc restore {cid}")
            raise ContainerError(f"{exc}\n{log_excerpt(work / 'restore.log')}") from exc

    def resume(self, cid: str) -> None:
        """Thaw a paused container (``runc resume``): its tasks go back to what they
        were when frozen (a held tree's, stopped)."""

        run_engine(self.argv("resume", cid), what=f"runc resume {cid}")

    def delete(self, cid: str) -> None:
        run_engine(self.argv("delete", "--force", cid), what=f"runc delete {cid}")

    def list(self) -> list[str]:
        code, out, _ = run_engine(self.argv("list", "--quiet"), what="runc list", check=False)
        return out.split() if code == 0 else []


def _runc_errors(log_path: Path) -> str:
    """The messages of runc's JSON log (``{"level": ..., "msg": ...}`` per line)."""

    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except OSError:
        return "no log"
    msgs = []
    for line in lines[-20:]:
        try:
            entry = json.loads(line)
        except ValueError:
            msgs.append(line)
            continue
        if isinstance(entry, dict) and entry.get("level") in ("error", "fatal", "warning"):
            msgs.append(str(entry.get("msg", "")))
    return " | ".join(msgs[-6:]) or "no error logged"
