"""What every command prints: one JSON object on stdout, sorted, so scripts can read it.

Shared by :mod:`migsgx.cli` and the command modules (:mod:`migsgx.cli_agent`,
:mod:`migsgx.cli_migrate`, :mod:`migsgx.cli_lab`), which therefore need not import
each other (``cli`` registers their commands).
"""

from __future__ import annotations

import json

import click

__all__ = ["emit"]


def emit(obj: object) -> None:
    """Print ``obj`` as indented JSON with sorted keys."""

    click.echo(json.dumps(obj, indent=2, sort_keys=True))
