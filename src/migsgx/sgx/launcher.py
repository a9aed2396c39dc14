"""``python -m migsgx.sgx.launcher SPEC -- ARGV``: enter the sandbox, then exec ARGV.

Runs as root in the child the platform service starts, and nowhere else; it
only ever gets its arguments from the service.  The order matters:
namespaces and mounts need root; the limits come before the uid change (so a
limit that needs privilege still applies); the uid change drops every
capability; ``no_new_privs`` and the seccomp filter come last, so that the
filter does not have to allow ``mount`` or ``setresuid``; then ``execve``.  A
failure at any step ends the process with status 126 and one line on stderr
(the enclave's log): an enclave never runs half sandboxed.
"""

from __future__ import annotations

import ctypes
import os
import sys
from typing import Final

from .sandbox import NOGROUP, SandboxSpec, apply_limits

CLONE_NEWNS: Final = 0x00020000
CLONE_NEWUTS: Final = 0x04000000
CLONE_NEWIPC: Final = 0x08000000
CLONE_NEWNET: Final = 0x40000000
MS_RDONLY: Final = 1
MS_NOSUID: Final = 2
MS_NODEV: Final = 4
MS_NOEXEC: Final = 8
MS_REMOUNT: Final = 32
MS_BIND: Final = 4096
MS_REC: Final = 16384
MS_PRIVATE: Final = 1 << 18
MNT_DETACH: Final = 2
SYS_PIVOT_ROOT: Final = 155  # x86_64
DEVICES: Final = ("/dev/null", "/dev/zero", "/dev/urandom", "/dev/random")

_libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None
           ) -> None:  # fmt: skip
    _check(
        _libc.mount(
            source.encode() if source else None,
            target.encode(),
            fstype.encode() if fstype else None,
            ctypes.c_ulong(flags),
            data.encode() if data else None,
        ),
        f"mount {target}",
    )


def _bind(root: str, path: str, *, readonly: bool = True) -> None:
    target = root + path
    if os.path.isdir(path):
        os.makedirs(target, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(target, "ab"):
            pass
    _mount(path, target, None, MS_BIND | MS_REC, None)
    flags = MS_REMOUNT | MS_BIND | MS_NOSUID | MS_NODEV | (MS_RDONLY if readonly else 0)
    if not readonly:
        flags |= MS_NOEXEC
    _mount(None, target, None, flags, None)


def enter(spec: SandboxSpec) -> None:
    """Build the sandbox around this process (as root); returns as the sandbox's uid."""

    if spec.seccomp:
        # Import before the host's file system goes away (the binding lives beside it).
        from .syscalls import _binding

        _binding()
    _check(_libc.unshare(CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS), "unshare")
    _mount(None, "/", None, MS_REC | MS_PRIVATE, None)
    root = spec.root
    _mount("migsgx-enclave", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=256k,mode=0755")
    for path in spec.binds:
        _bind(root, path)
    for link in ("bin", "lib", "lib64", "sbin"):
        if os.path.islink("/" + link):
            os.symlink(os.readlink("/" + link), f"{root}/{link}")
    for dev in DEVICES:
        if os.path.exists(dev):
            _bind(root, dev, readonly=False)
    os.makedirs(f"{root}/proc")
    _mount(
        "proc", f"{root}/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC,
        "hidepid=invisible,subset=pid",
    )  # fmt: skip
    os.chdir(root)
    _check(_libc.syscall(SYS_PIVOT_ROOT, b".", b"."), "pivot_root")
    _check(_libc.umount2(b".", MNT_DETACH), "umount the host's root")
    os.chdir("/")
    _mount(None, "/", None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV, None)
    apply_limits(spec.limits)
    os.setgroups([])
    # Real gid != effective gid: the kernel makes the next program non-dumpable
    # from its first instruction (fs/exec.c), before the interpreter imports anything.
    os.setresgid(NOGROUP, spec.gid, spec.gid)
    os.setresuid(spec.uid, spec.uid, spec.uid)
    if spec.seccomp:
        from .syscalls import install_launch_filter

        install_launch_filter()


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 3 or args[1] != "--":
        sys.stderr.write("usage: python -m migsgx.sgx.launcher SPEC -- ARGV\n")
        return 2
    try:
        enter(SandboxSpec.from_json(args[0]))
        os.execv(args[2], args[2:])  # noqa: S606 - the runtime, as the service named it
    except (OSError, ValueError, KeyError, ImportError) as exc:
        sys.stderr.write(f"enclave sandbox: {exc}\n")
        sys.stderr.flush()
    return 126


if __name__ == "__main__":
    sys.exit(main())
