"""The enclave SDK: what code inside an enclave imports."""

from ..errors import EnclaveError
from .memory import EnclaveMemory
from .sdk import Enclave, EnclaveContext, ecall
from .sealing import POLICY_MRENCLAVE, POLICY_MRSIGNER

__all__ = [
    "POLICY_MRENCLAVE",
    "POLICY_MRSIGNER",
    "Enclave",
    "EnclaveContext",
    "EnclaveError",
    "EnclaveMemory",
    "ecall",
]
