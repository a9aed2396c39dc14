"""The enclave SDK: what code inside an enclave imports.

The names are imported from their modules on first use, so that a process
outside any enclave that needs one module of this package (an agent releasing
a dead enclave's reservation: :mod:`.persistent_format`) does not load the
SDK, its quotes' X.509 and numpy with it.  Inside the enclave process the
runtime has imported all of them before enclave code runs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..errors import EnclaveError
    from .memory import EnclaveMemory
    from .sdk import Enclave, EnclaveContext, ecall
    from .sealing import POLICY_MRENCLAVE, POLICY_MRSIGNER

#: Each name and the module it comes from.
_HOMES = {
    "EnclaveError": "migsgx.errors",
    "EnclaveMemory": "migsgx.enclave.memory",
    "Enclave": "migsgx.enclave.sdk",
    "EnclaveContext": "migsgx.enclave.sdk",
    "ecall": "migsgx.enclave.sdk",
    "POLICY_MRENCLAVE": "migsgx.enclave.sealing",
    "POLICY_MRSIGNER": "migsgx.enclave.sealing",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value


__all__ = [
    "POLICY_MRENCLAVE",
    "POLICY_MRSIGNER",
    "Enclave",
    "EnclaveContext",
    "EnclaveError",
    "EnclaveMemory",
    "ecall",
]
