"""Running a container engine's command line.

Output goes to temporary files, never to pipes: a container that an engine
creates or restores may inherit the engine's descriptors, and a pipe held by
a long-lived container would keep a reader waiting for its end.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .base import ContainerError

__all__ = ["bring_lo_up", "json_object", "run_engine", "with_path"]


def run_engine(
    argv: Sequence[str],
    *,
    what: str,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    timeout: float = 120.0,
    check: bool = True,
    detached_stdio: bool = False,
) -> tuple[int, str, str]:
    """Run ``argv``; returns (status, stdout, stderr).  With ``check`` a failure raises.

    ``detached_stdio``: the command hands its own stdio to a container it
    starts (``runc run --detach``, ``runc restore --detach``), so it gets
    /dev/null (a file would be an open descriptor CRIU cannot dump later);
    such a command reports through a log file of its own.
    """

    null = subprocess.DEVNULL
    with (
        tempfile.TemporaryFile(prefix="migsgx-engine-") as out,
        tempfile.TemporaryFile(prefix="migsgx-engine-") as err,
    ):
        try:
            proc = subprocess.run(
                list(argv),
                stdin=null,
                stdout=null if detached_stdio else out,
                stderr=null if detached_stdio else err,
                env=dict(env) if env is not None else None,
                cwd=cwd,
                timeout=timeout,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise ContainerError(f"{what}: cannot run {argv[0]}: {exc}") from exc
        out.seek(0)
        err.seek(0)
        stdout = out.read().decode("utf-8", "replace")
        stderr = err.read().decode("utf-8", "replace")
    if check and proc.returncode != 0:
        detail = stderr.strip().splitlines()[-6:] or [f"status {proc.returncode}"]
        raise ContainerError(f"{what} failed: " + " | ".join(detail))
    return proc.returncode, stdout, stderr


def json_object(out: str, what: str) -> dict[str, Any] | None:
    """An engine's answer in JSON as an object; None when it is another JSON value.

    Output that is not JSON at all is an engine this driver does not understand: an
    error naming ``what``, not an absent container.
    """

    try:
        value = json.loads(out)
    except ValueError as exc:
        raise ContainerError(f"{what}: not JSON") from exc
    return value if isinstance(value, dict) else None


def with_path(directory: Path, env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment with ``directory`` first on PATH (engines find CRIU there)."""

    out = dict(os.environ if env is None else env)
    out["PATH"] = f"{directory}{os.pathsep}{out.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}"
    return out


def bring_lo_up(pid: int) -> None:
    try:
        subprocess.run(
            ["nsenter", f"--net=/proc/{pid}/ns/net", "ip", "link", "set", "lo", "up"],
            check=True,
            capture_output=True,
            timeout=30,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise ContainerError(f"cannot bring lo up in the restored container: {exc}") from exc
