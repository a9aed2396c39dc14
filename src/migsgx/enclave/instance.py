"""One enclave instance: its code, memory, thread slots and admission control.

This is the trusted runtime's core, independent of how ECALLs arrive: the
enclave process drives it from its channel, unit tests call it directly.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from ..errors import (
    EnclaveBusyError,
    EnclaveError,
    MigSGXError,
    OutOfThreadSlotsError,
    UnknownEcallError,
)
from ..sgx.image import EnclaveImage
from ..sgx.trusted import TrustedServices
from .loader import load_enclave_class
from .memory import EnclaveMemory
from .sdk import EnclaveContext, OcallFn


class EnclaveInstance:
    def __init__(
        self,
        image: EnclaveImage,
        services: TrustedServices,
        ocall: OcallFn | None = None,
    ) -> None:
        self.image = image
        self.manifest = image.manifest
        self.services = services
        self.memory = EnclaveMemory(self.manifest.memory_size)
        self.context = EnclaveContext(services, self.memory, ocall)
        cls = load_enclave_class(image)
        self._ecalls = cls.ecalls()
        try:
            self.enclave = cls(self.context)
        except MigSGXError:
            raise
        except Exception as exc:
            # As for ECALLs: only the type crosses the boundary.
            raise EnclaveError(f"the enclave's constructor failed: {type(exc).__name__}") from None
        self._lock = threading.Condition()
        self._busy = 0
        self.calls_served = 0
        self._admitting = True
        self._gone: str | None = None

    @property
    def thread_slots(self) -> int:
        return self.manifest.thread_slots

    @property
    def ecall_names(self) -> list[str]:
        return sorted(self._ecalls)

    def enter(self, name: str) -> None:
        """Take a thread slot for an ECALL, or refuse it at once."""

        with self._lock:
            if self._gone is not None:
                raise EnclaveBusyError(self._gone)
            if not self._admitting:
                raise EnclaveBusyError("the enclave is quiesced for migration")
            if name not in self._ecalls:
                raise UnknownEcallError(f"the enclave declares no ECALL {name!r}")
            if self._busy >= self.manifest.thread_slots:
                raise OutOfThreadSlotsError(
                    f"all {self.manifest.thread_slots} thread slots of the enclave are busy"
                )
            self._busy += 1
            self.calls_served += 1

    def leave(self) -> None:
        with self._lock:
            self._busy -= 1
            self._lock.notify_all()

    def run(self, name: str, args: list[Any]) -> Any:
        """Run an ECALL inside a slot taken with :meth:`enter`."""

        try:
            return self._ecalls[name](self.enclave, *args)
        except MigSGXError:
            raise
        except Exception as exc:
            # Only the type crosses the boundary: a message may hold a secret.
            raise EnclaveError(f"ECALL {name} failed: {type(exc).__name__}") from None

    def call(self, name: str, *args: Any) -> Any:
        self.enter(name)
        try:
            return self.run(name, list(args))
        finally:
            self.leave()

    def quiesce(self, timeout: float | None = None) -> None:
        """Two-phase quiescence: stop admitting ECALLs, then wait for in-flight ones."""

        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            self._admitting = False
            while self._busy:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    self._admitting = True
                    self._lock.notify_all()
                    raise EnclaveBusyError(
                        f"{self._busy} ECALL(s) still running after {timeout} s; quiesce abandoned"
                    )
                self._lock.wait(remaining)

    def resume(self) -> None:
        with self._lock:
            if self._gone is None:
                self._admitting = True

    @property
    def retired(self) -> bool:
        """True once :meth:`retire` ran: nothing of the state may run or be brought back."""

        with self._lock:
            return self._gone is not None

    @property
    def quiesced(self) -> bool:
        with self._lock:
            return not self._admitting and self._busy == 0

    def retire(self, reason: str, *, wipe: bool = True) -> None:
        """No ECALL will ever run again; memory is wiped (now, or by the caller later)."""

        with self._lock:
            self._admitting = False
            self._gone = reason
        if wipe:
            self.memory.wipe()

    def export_small_state(self) -> Any:
        return {"memory": self.memory.layout(), "enclave": self.enclave.export_state()}

    def import_small_state(self, state: Any) -> None:
        if not isinstance(state, dict) or "memory" not in state or "enclave" not in state:
            raise EnclaveError("malformed enclave state")
        self.memory.restore_layout(state["memory"])
        self.enclave.import_state(state["enclave"])
