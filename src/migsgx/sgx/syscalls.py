"""The seccomp allowlist of an enclave process, through libseccomp's own binding.

Two filters, because the launcher must still ``execve`` the runtime:

* :func:`install_launch_filter` (the launcher, just before it execs the
  runtime): every system call not listed fails with EPERM.  No new process
  (``clone`` only with ``CLONE_THREAD``; ``clone3``, whose flags a filter cannot
  see, answers ENOSYS so that the C library falls back to ``clone``), no socket
  of any family, no ptrace, no mount or namespace change, no kernel keyring, no
  BPF, signals only to the process itself.
* :func:`install_runtime_filter` (the runtime, before it loads enclave code):
  stacks a second filter that also refuses ``execve``/``execveat``.

Filters only ever narrow (the kernel evaluates every stacked filter and takes
the strictest answer) and survive ``execve``; ``no_new_privs`` is set first, so
no set-user-id program can widen anything.

The binding is Debian's ``python3-seccomp`` (libseccomp 2.5), made importable
in the virtual environment by ``scripts/setup.sh``; it is imported lazily so
that hosts without it can still run the rest (:func:`available`).
"""

from __future__ import annotations

import errno
import importlib
import os
from types import ModuleType
from typing import Final

__all__ = ["ALLOWED", "available", "install_launch_filter", "install_runtime_filter"]

_CLONE_THREAD: Final = 0x00010000

#: System calls a Python 3.11 runtime with numpy, cryptography and threads needs.
ALLOWED: Final = (
    # memory
    "brk", "mmap", "munmap", "mremap", "mprotect", "madvise", "mlock", "munlock", "mincore",
    "membarrier", "memfd_create", "userfaultfd",
    # files (the mount namespace is read-only; these reach only the image and the runtime)
    "read", "write", "readv", "writev", "pread64", "pwrite64", "preadv", "pwritev", "lseek",
    "open", "openat", "close", "close_range", "stat", "fstat", "lstat", "newfstatat", "statx",
    "access", "faccessat", "faccessat2", "readlink", "readlinkat", "getdents64", "getcwd",
    "fcntl", "dup", "dup2", "dup3", "ioctl", "ftruncate", "fsync", "fdatasync", "pipe", "pipe2",
    "statfs", "fstatfs", "fadvise64",
    # descriptors handed in by the platform (the channel, the application, the ring)
    "sendmsg", "recvmsg", "sendto", "recvfrom", "shutdown", "getsockopt", "setsockopt",
    "getsockname", "getpeername", "poll", "ppoll", "select", "pselect6",
    "epoll_create1", "epoll_ctl", "epoll_wait", "epoll_pwait", "eventfd2",
    # threads, time, identity
    "futex", "set_robust_list", "get_robust_list", "set_tid_address", "rseq", "sched_yield",
    "sched_getaffinity", "sched_setaffinity", "sched_getparam", "sched_getscheduler",
    "clock_gettime", "clock_getres", "clock_nanosleep", "nanosleep", "gettimeofday", "time",
    "getpid", "gettid", "getppid", "getuid", "geteuid", "getgid", "getegid", "getresuid",
    "getresgid", "getgroups", "getpgrp", "getpgid", "getsid", "getrusage", "getrlimit",
    "prlimit64", "uname", "sysinfo", "getrandom", "getcpu", "prctl", "arch_prctl",
    "rt_sigaction", "rt_sigprocmask", "rt_sigreturn", "rt_sigpending", "rt_sigtimedwait",
    "rt_sigsuspend", "sigaltstack", "restart_syscall", "exit", "exit_group", "wait4",
    "timerfd_create", "timerfd_settime", "timerfd_gettime",
    # the launcher's last step
    "execve",
)  # fmt: skip


def _binding() -> ModuleType:
    return importlib.import_module("seccomp")


def available() -> bool:
    """Whether libseccomp's Python binding can be imported here."""

    try:
        _binding()
    except ImportError:
        return False
    return True


def _set_no_new_privs() -> None:
    import ctypes

    pr_set_no_new_privs = 38
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(pr_set_no_new_privs, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")


def install_launch_filter(pid: int | None = None) -> None:
    """Allow :data:`ALLOWED` only; signals only to ``pid`` (default: this process)."""

    sc = _binding()
    pid = os.getpid() if pid is None else pid
    _set_no_new_privs()
    flt = sc.SyscallFilter(defaction=sc.ERRNO(errno.EPERM))
    for name in ALLOWED:
        flt.add_rule(sc.ALLOW, name)
    # Threads only: a new process would leave the seccomp-visible thread model.
    flt.add_rule(sc.ALLOW, "clone", sc.Arg(0, sc.MASKED_EQ, _CLONE_THREAD, _CLONE_THREAD))
    flt.add_rule(sc.ERRNO(errno.ENOSYS), "clone3")
    # Signals to itself only (raise(), thread wake-ups); never to another process.
    flt.add_rule(sc.ALLOW, "kill", sc.Arg(0, sc.EQ, pid))
    flt.add_rule(sc.ALLOW, "tgkill", sc.Arg(0, sc.EQ, pid))
    flt.load()


def install_runtime_filter() -> None:
    """Stack a filter that refuses ``execve``: enclave code never runs a program."""

    sc = _binding()
    _set_no_new_privs()
    flt = sc.SyscallFilter(defaction=sc.ALLOW)
    flt.add_rule(sc.ERRNO(errno.EPERM), "execve")
    flt.add_rule(sc.ERRNO(errno.EPERM), "execveat")
    flt.load()
