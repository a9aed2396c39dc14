"""``migsgx inspect``: what a checkpoint holds, read without changing it (``docs/inspect.md``)."""

from __future__ import annotations

from .report import inspect_path

__all__ = ["inspect_path"]
