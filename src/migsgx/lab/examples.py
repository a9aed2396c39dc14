"""Where the example applications are: found explicitly, never by walking up from a file.

A checkout keeps them in ``examples/``; an installed wheel carries them as data
files under ``<prefix>/share/migsgx/examples`` (``pyproject.toml``,
``[tool.setuptools.data-files]``), so ``migsgx demo`` runs from either.
``MIGSGX_EXAMPLES`` names another directory and wins over both.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from ..errors import ConfigError

__all__ = ["ENV", "examples_dir"]

ENV = "MIGSGX_EXAMPLES"
_MARKER = Path("kvstore") / "app.py"


def _candidates() -> list[Path]:
    found: list[Path] = []
    named = os.environ.get(ENV)
    if named:
        found.append(Path(named))
    # A checkout (editable install): src/migsgx/lab/examples.py -> <repo>/examples.
    found.append(Path(__file__).resolve().parents[3] / "examples")
    # A wheel: data files land under the installation's prefix.
    for prefix in (sys.prefix, sys.base_prefix):
        found.append(Path(prefix) / "share" / "migsgx" / "examples")
    return found


def examples_dir() -> Path:
    """The first directory that holds the examples (``kvstore/app.py`` in it)."""

    candidates = _candidates()
    for path in candidates:
        if (path / _MARKER).is_file():
            return path
    raise ConfigError(
        "the example applications are not installed; looked in "
        + ", ".join(str(p) for p in candidates)
        + f" (set {ENV})"
    )
