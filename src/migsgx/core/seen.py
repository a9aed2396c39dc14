"""Which migration ids a destination accepted: the record that makes activation happen once.

Both the handshake (a destination refuses a ``source-hello`` whose id it holds)
and the commit (the token claims the id) use it, so it sits below both.
"""

from __future__ import annotations

from typing import Protocol

__all__ = ["InMemorySeenIds", "SeenMigrationIds"]


class SeenMigrationIds(Protocol):
    """The destination host's durable, rollback-resistant record of accepted migration ids.

    The platform's trusted services (``migsgx.sgx.trusted.TrustedServices``) have
    this shape.
    """

    def claim_migration(self, migration_id: bytes) -> bool:
        """Atomically and durably record ``migration_id``; False if it was recorded before."""
        ...

    def migration_claimed(self, migration_id: bytes) -> bool:
        """Whether ``migration_id`` was recorded."""
        ...


class InMemorySeenIds:
    """A :class:`SeenMigrationIds` for tests and single-process use: not durable."""

    def __init__(self) -> None:
        self._ids: set[bytes] = set()

    def claim_migration(self, migration_id: bytes) -> bool:
        if migration_id in self._ids:
            return False
        self._ids.add(bytes(migration_id))
        return True

    def migration_claimed(self, migration_id: bytes) -> bool:
        return migration_id in self._ids
