"""Find a CRIU binary that works on this kernel.

Older CRIU releases fail here in ways that surface late and obscurely (3.17
cannot parse the vDSO of kernels >= 6.13; 4.1 cannot dump INET sockets on
kernels >= 6.16), so a binary older than :data:`MIN_VERSION` is refused up
front with a message that says what to do.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import NamedTuple

from migsgx.errors import CriuError

__all__ = [
    "ENV_VAR",
    "MIN_VERSION",
    "CriuVersion",
    "binary_version",
    "find_criu",
    "project_criu",
    "repo_root",
]

#: Environment variable naming the CRIU binary to use.
ENV_VAR = "MIGSGX_CRIU"
#: Oldest CRIU that dumps and restores everything the project needs here.
MIN_VERSION = (4, 2)

_VERSION_RE = re.compile(r"^Version:\s*(\d+)\.(\d+)(?:\.(\d+))?", re.MULTILINE)
_GITID_RE = re.compile(r"^GitID:\s*(\S+)", re.MULTILINE)


class CriuVersion(NamedTuple):
    major: int
    minor: int
    sublevel: int = 0
    gitid: str = ""

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}.{self.sublevel}"


def repo_root() -> Path:
    """The checkout this package runs from (src layout: three levels up)."""

    return Path(__file__).resolve().parents[3]


def project_criu() -> Path:
    """Where ``scripts/setup.sh`` installs CRIU."""

    return repo_root() / ".local" / "criu" / "bin" / "criu"


def binary_version(binary: Path) -> CriuVersion:
    """Ask ``criu --version``; raises :class:`CriuError` when it cannot be run or read."""

    try:
        out = subprocess.run(
            [str(binary), "--version"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise CriuError(f"cannot run {binary} --version: {exc}", binary=str(binary)) from exc
    match = _VERSION_RE.search(out)
    if match is None:
        raise CriuError(
            f"{binary} --version printed no version: {out.strip()!r}", binary=str(binary)
        )
    gitid = _GITID_RE.search(out)
    return CriuVersion(
        int(match.group(1)),
        int(match.group(2)),
        int(match.group(3) or 0),
        gitid.group(1) if gitid else "",
    )


def find_criu(*, env: dict[str, str] | None = None, check_version: bool = True) -> Path:
    """Return the CRIU binary to use, as an absolute path.

    Order: ``$MIGSGX_CRIU``, then the project-local build from
    ``scripts/setup.sh``, then ``criu`` on ``PATH``. A binary named by the
    environment variable must exist; the others are only candidates.
    """

    environ = os.environ if env is None else env
    named = environ.get(ENV_VAR, "")
    if named:
        binary = Path(named).absolute()
        if not (binary.is_file() and os.access(binary, os.X_OK)):
            raise CriuError(f"${ENV_VAR} names {named!r}, which is not an executable file")
    elif _is_executable(local := project_criu()):
        binary = local
    else:
        found = shutil.which("criu", path=environ.get("PATH"))
        if found is None:
            raise CriuError(
                "no CRIU found: run scripts/setup.sh (it builds one into .local/criu/), "
                f"or set ${ENV_VAR}"
            )
        binary = Path(found).absolute()
    if check_version:
        version = binary_version(binary)
        if (version.major, version.minor) < MIN_VERSION:
            want = ".".join(map(str, MIN_VERSION))
            raise CriuError(
                f"{binary} is CRIU {version}; migsgx needs CRIU >= {want} on this kernel "
                "(run scripts/setup.sh to build one)",
                binary=str(binary),
                version=str(version),
            )
    return binary


def _is_executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)
