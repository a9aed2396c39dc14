"""What the enclave process does to itself, inside the sandbox the launcher built.

The launcher (:mod:`migsgx.sgx.launcher`) gives the runtime its own uid, a
read-only root, no network and the launch filter (``docs/platform.md``, 1.4);
the runtime then closes what only it can: no ptrace or core dump of it
(:func:`not_dumpable`, first of all), no ``execve`` for enclave code
(:func:`seal_sandbox`), and the limits of its manifest before a line of the
enclave's code runs (:func:`narrow_limits`).  The runtime's modules are
imported under the launch filter already (it is installed before the launcher
execs the runtime); both filters allow what an import does (``openat``,
``read``, ``mmap`` on the read-only root), so a lazy import later works too.
"""

from __future__ import annotations

from ..sgx import syscalls
from ..sgx.image import Manifest
from ..sgx.sandbox import apply_limits, manifest_limits
from .eventlog import log

__all__ = ["narrow_limits", "not_dumpable", "seal_sandbox"]


def not_dumpable() -> None:
    """Keep other processes of this user (other enclaves, the application) out of
    this process's memory: no ptrace attach, no /proc/PID/mem, no core dump."""

    import ctypes

    pr_set_dumpable = 4
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(pr_set_dumpable, 0, 0, 0, 0) != 0:
        log(f"cannot make the enclave process non-dumpable (errno {ctypes.get_errno()})")


def seal_sandbox() -> None:
    """Inside the launcher's sandbox: stack the filter that forbids ``execve``.

    The launcher's filter had to allow ``execve`` for its own last step; this
    runtime never runs a program, so enclave code must not either.  Without the
    binding (the launcher then loaded no filter either) there is nothing to stack.
    """

    if syscalls.available():
        syscalls.install_runtime_filter()


def narrow_limits(manifest: Manifest) -> None:
    """The manifest's limits, before a line of the enclave's code runs."""

    apply_limits(manifest_limits(manifest.memory_size, manifest.thread_slots))
