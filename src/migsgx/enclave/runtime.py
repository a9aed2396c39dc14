"""The enclave process: ``python -m migsgx.enclave.runtime --channel FD --app FD``.

Started only by the platform service, never by the application, so the
application's process tree (what CRIU dumps) never contains enclave memory.
``--channel`` is the private link to the platform (keys, reports, quotes,
counters: :mod:`.platform_channel`); ``--app`` is the application's
connection, on which ECALLs arrive and OCALLs leave (:mod:`.app_channel`).
This module is the process's life: confined (:mod:`.confine`), self-tested,
told which enclave it is, ready, serving, and at the end an abort of a
migration the driver left.  Nothing secret is ever written to stderr (the
log, :mod:`.eventlog`): only event names and exception types.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys

from ..channel import IMAGE_FRAME_MAX, PLATFORM
from ..errors import MigSGXError
from ..sgx.image import EnclaveImage
from ..sgx.structs import ReportBody
from ..wire import recv_frame, send_frame
from . import selftest
from .app_channel import ENDED, AppChannel
from .confine import narrow_limits, not_dumpable, seal_sandbox
from .eventlog import log
from .instance import EnclaveInstance
from .migrator import Migrator
from .platform_channel import ChannelServices, Reserve


def main(argv: list[str] | None = None) -> int:
    not_dumpable()
    parser = argparse.ArgumentParser(prog="migsgx-enclave")
    parser.add_argument("--channel", type=int, required=True)
    parser.add_argument("--app", type=int, default=None)
    parser.add_argument("--sandboxed", action="store_true")
    parser.add_argument("--reserve", type=int, default=None)
    parser.add_argument("--reserve-peer", type=int, default=None)
    parser.add_argument("--platform-tag", default=None)
    args = parser.parse_args(argv)
    if args.sandboxed:
        seal_sandbox()
    chan = socket.socket(fileno=args.channel)
    # The runtime is ready before it knows which enclave it will be: a platform
    # service keeps one such process warm, so a launch costs no process start.
    selftest.run()
    init = recv_frame(chan, PLATFORM, max_size=IMAGE_FRAME_MAX)
    if init["t"] != "init":
        log("platform sent no init")
        return 2
    if args.app is not None:
        app = socket.socket(fileno=args.app)
    else:
        _, fds, _, _ = socket.recv_fds(chan, 1, 1)
        if len(fds) != 1:
            log("platform sent no application connection")
            return 2
        app = socket.socket(fileno=fds[0])
    identity = ReportBody.unpack(init["identity"])
    reserve = Reserve.receive(chan, args.reserve, args.reserve_peer)
    channel = AppChannel(app)
    try:
        image = EnclaveImage.from_files(init["files"])
        if args.sandboxed:
            narrow_limits(image.manifest)
        services = ChannelServices(chan, identity, reserve)
        instance = EnclaveInstance(image, services, channel.ocall)
    except MigSGXError as exc:
        log(f"enclave failed to start: {exc.code}")
        send_frame(app, {"t": "err", "id": 0, "code": exc.code, "message": exc.message})
        return 1
    channel.instance = instance
    channel.migrator = Migrator(instance)
    m = image.manifest
    channel.send(
        {
            "t": "ready",
            "pid": os.getpid(),
            "mr_enclave": identity.mr_enclave,
            "mr_signer": identity.mr_signer,
            "isv_prod_id": identity.isv_prod_id,
            "isv_svn": identity.isv_svn,
            "debug": identity.attributes.debug,
            "memory_size": m.memory_size,
            "thread_slots": m.thread_slots,
            "ecalls": instance.ecall_names,
        }
    )
    log(f"started {m.name} mrenclave={identity.mr_enclave.hex()[:16]}")
    reason = channel.serve()
    while channel.keeps_state() and reason not in ENDED:
        # A destroy, or a frame it could not read, while the duplicate is held: a
        # frozen, committed or undecided state outlives it, for ``migsgx recover``
        # (it takes the duplicate back), never wiped here where nothing else is.
        log(f"{reason}, but this enclave keeps a migration's state: it serves on")
        reason = channel.serve()
    channel.fail_waiters()
    try:
        instance.quiesce(timeout=5.0)
    except MigSGXError:
        log("ECALLs still running at exit")
    if channel.migrator.role is not None and not channel.migrator.committed:
        try:
            channel.migrator.abort("the driver went away")
            reason += " during a migration (aborted)"
        except MigSGXError as exc:
            # Another enclave of its migration committed first: this one committed
            # too (its token is in the decision record), or could not (said).
            reason += f" during a migration ({exc.code}: {exc.message})"
    instance.retire(reason)
    log(f"exiting: {reason}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
