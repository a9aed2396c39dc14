"""What every command prints: one JSON object on stdout, sorted, so scripts can read it.

Shared by :mod:`migsgx.cli` and :mod:`migsgx.cli_migrate`, which therefore need
not import each other (``cli`` registers ``cli_migrate``'s commands).
"""

from __future__ import annotations

import json

import click

__all__ = ["emit"]


def emit(obj: object) -> None:
    """Print ``obj`` as indented JSON with sorted keys."""

    click.echo(json.dumps(obj, indent=2, sort_keys=True))
