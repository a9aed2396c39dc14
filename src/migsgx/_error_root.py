"""The root of every migsgx error: a stable ``code``, keyword context, picklable.

Only :mod:`migsgx.errors` and its families import it; everyone else names
``migsgx.errors.MigSGXError``.  It lives apart so that the families can build on
it and :mod:`migsgx.errors` can re-export them without an import cycle.
"""

from __future__ import annotations

from typing import Any, ClassVar

__all__ = ["MigSGXError"]


class MigSGXError(Exception):
    """Root of all migsgx errors."""

    code: ClassVar[str] = "error"

    def __init__(self, message: str = "", **context: Any) -> None:
        super().__init__(message or self.__class__.__doc__ or self.code)
        self.message = message or (self.__class__.__doc__ or self.code).strip()
        self.context = context

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (self.__class__, self.message, self.context))

    def __str__(self) -> str:
        return self.message

    def to_wire(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message}


def _rebuild(cls: type[MigSGXError], message: str, context: dict[str, Any]) -> MigSGXError:
    return cls(message, **context)
