"""migsgx: secure migration of SGX enclave applications with their process or container."""

from .errors import MigSGXError

__version__ = "0.1.0"
__all__ = ["MigSGXError", "__version__"]
