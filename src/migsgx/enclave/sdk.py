"""What enclave authors write against.

An enclave is a class deriving from :class:`Enclave`; its ECALLs are methods
marked with :func:`ecall`.  Arguments and results are plain data (CBOR: None,
bool, int, float, str, bytes, lists and maps).  Bulk state goes into
``self.ctx.memory`` (page-granular, numpy views); small structured state is
what :meth:`Enclave.export_state` returns (plain data, never pickled), so that
a migration can move it.  ``self.ctx`` also offers sealing, attestation,
monotonic counters and OCALLs into the untrusted application.

Two kinds of sealing and counters exist.  The platform's (``seal``,
``counter_*``) stay on this host: a blob sealed here never opens elsewhere.
The migratable ones (``seal_migratable``, ``mcounter_*``) belong to the
enclave's persistent state (:mod:`.persistent`), which an ECALL opens by name
with :meth:`EnclaveContext.open_persistent`, and which moves with a migration
or a checkpoint.  Open it from an ECALL, not from the constructor: only an
enclave without a persistent state can receive one.  While a migration's dump
runs, every seal and counter operation raises ``FrozenError``.
``ctx.services`` is the raw platform; calling it directly bypasses that freeze.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from ..errors import EnclaveError
from ..sgx.quote import VerifiedQuote, verify_quote
from ..sgx.structs import Report, ReportBody, TargetInfo
from ..sgx.trusted import TrustedServices, target_info_of, verify_report_locally
from . import sealing
from .memory import EnclaveMemory
from .persistent import PersistentState

F = TypeVar("F", bound=Callable[..., Any])
_ECALL_ATTR = "__migsgx_ecall__"


def ecall(fn: F) -> F:
    """Mark a method as callable from the untrusted application."""

    setattr(fn, _ECALL_ATTR, True)
    return fn


OcallFn = Callable[[str, tuple[Any, ...]], Any]


class EnclaveContext:
    """The enclave's view of its platform, its memory and its host application."""

    def __init__(
        self,
        services: TrustedServices,
        memory: EnclaveMemory,
        ocall: OcallFn | None = None,
    ) -> None:
        self.services = services
        self.memory = memory
        self._ocall = ocall
        self.persistent = PersistentState(services)

    @property
    def identity(self) -> ReportBody:
        return self.services.identity

    def ocall(self, name: str, *args: Any) -> Any:
        """Call out into the untrusted application (an OCALL); returns its result."""

        if self._ocall is None:
            raise EnclaveError("this enclave has no OCALL channel")
        return self._ocall(name, args)

    # sealing, bound to this host
    def seal(
        self, data: bytes, *, aad: bytes = b"", policy: int = sealing.POLICY_MRSIGNER
    ) -> bytes:
        with self.persistent.guard():
            return sealing.seal(self.services, data, aad=aad, policy=policy)

    def unseal(self, blob: bytes, *, aad: bytes | None = None) -> bytes:
        with self.persistent.guard():
            return sealing.unseal(self.services, blob, aad=aad)

    # persistent state: migratable sealing and counters
    def open_persistent(self, name: str) -> bool:
        """Open this enclave's persistent state ``name`` on this host, or create it.

        Returns True if it was created.  Opening takes the record over: another
        instance that opened it before can no longer use it.
        """

        return self.persistent.open(name)

    def seal_migratable(
        self, data: bytes, *, aad: bytes = b"", counter: str | None = None
    ) -> bytes:
        """Seal so that only this enclave's persistent state opens it, wherever it moves.

        With ``counter`` (a migratable counter's name) the counter advances and
        the blob is bound to its new value: only the newest such blob is fresh.
        """

        return self.persistent.seal(data, aad=aad, counter=counter)

    def unseal_migratable(
        self, blob: bytes, *, aad: bytes | None = None, fresh: bool = True
    ) -> bytes:
        """Open a migratable blob; ``RollbackError`` if it is bound and not the newest."""

        return self.persistent.unseal(blob, aad=aad, fresh=fresh)

    @staticmethod
    def sealed_binding(blob: bytes) -> tuple[str, int] | None:
        """The (counter, value) a migratable blob claims to be bound to; not verified."""

        return sealing.migratable_header(blob).binding

    def mcounter_create(self, name: str, initial: int = 0) -> int:
        return self.persistent.counter_create(name, initial)

    def mcounter_read(self, name: str) -> int:
        return self.persistent.counter_read(name)

    def mcounter_increment(self, name: str, by: int = 1) -> int:
        return self.persistent.counter_increment(name, by)

    def mcounter_destroy(self, name: str) -> None:
        self.persistent.counter_destroy(name)

    def mcounter_names(self) -> list[str]:
        return self.persistent.counter_names()

    # attestation
    def self_target(self) -> TargetInfo:
        return target_info_of(self.identity)

    def report(self, target: TargetInfo, report_data: bytes) -> Report:
        return self.services.report(target, report_data)

    def verify_report(self, report: Report) -> ReportBody:
        return verify_report_locally(self.services, report)

    def quote(self, report_data: bytes) -> bytes:
        return self.services.quote(report_data)

    def verify_quote(self, quote: bytes, **policy: Any) -> VerifiedQuote:
        return verify_quote(quote, self.services.trusted_roots(), **policy)

    # platform counters, bound to this host
    def counter_create(self, initial: int = 0) -> tuple[str, int]:
        with self.persistent.guard():
            return self.services.counter_create(initial)

    def counter_read(self, counter_id: str) -> int:
        with self.persistent.guard():
            return self.services.counter_read(counter_id)

    def counter_increment(self, counter_id: str, by: int = 1) -> int:
        with self.persistent.guard():
            return self.services.counter_increment(counter_id, by)

    def counter_destroy(self, counter_id: str) -> None:
        with self.persistent.guard():
            self.services.counter_destroy(counter_id)


class Enclave:
    """Base class of every enclave."""

    def __init__(self, ctx: EnclaveContext) -> None:
        self.ctx = ctx

    def export_state(self) -> Any:
        """Small structured state (plain data) that a migration must carry."""

        return None

    def import_state(self, state: Any) -> None:
        """Take over the state :meth:`export_state` returned on the source."""

    @classmethod
    def ecalls(cls) -> dict[str, Callable[..., Any]]:
        table: dict[str, Callable[..., Any]] = {}
        for klass in reversed(cls.__mro__):
            for name, value in vars(klass).items():
                if callable(value) and getattr(value, _ECALL_ATTR, False):
                    table[name] = value
        return table
