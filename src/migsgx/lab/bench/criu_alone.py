"""CRIU alone moving a plain process: the baseline of ``migsgx bench process``.

A plain process holding SIZE of ordinary memory (no enclave) migrates with
CRIU alone: ``criu page-server`` on the destination, dump, copy of the other
images, restore.  Its destination images go where the agent's go by default,
the testbed's directory (the disk's file system here), or with
``images_in_ram`` to ``/dev/shm``, where ``agent serve --images-in-ram`` puts
them (:mod:`migsgx.agent.imageroom`): the two compare on the same kind of file
system.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ...agent.dumpdirs import scratch_base
from ...agent.imageroom import fs_type
from ...agent.tls import AgentIdentity
from ...criu import Criu, InNetns, InTaskNamespaces
from ...errors import MigSGXError
from ...system.process import kill_tree, tree_pids
from ..testbed import Testbed
from .figures import children_cpu, cpu_seconds
from .memwatch import MemoryWatch
from .pages import PageServerOn, copy_images, image_bytes
from .settle import settle

__all__ = ["PLAIN", "criu_only"]

# A plain process holding N MiB of ordinary memory (not zero pages), in its own
# pid namespace; it writes its digest to the ready file and then sleeps.
PLAIN = """
import hashlib, os, sys, time
import numpy as np
mib, ready = int(sys.argv[1]), sys.argv[2]
block = np.random.default_rng(3).integers(0, 256, size=1 << 20, dtype=np.uint8)
memory = np.empty((mib, 1 << 20), dtype=np.uint8)
for i in range(mib):
    memory[i] = block
    memory[i, :8] = np.frombuffer(i.to_bytes(8, "little"), dtype=np.uint8)
with open(ready + ".tmp", "w") as f:
    f.write(hashlib.sha256(memory.data).hexdigest())
os.replace(ready + ".tmp", ready)
while True:
    time.sleep(1)
"""


def criu_only(
    bed: Testbed,
    size: int,
    criu: Criu | None = None,
    *,
    page_tls: bool = False,
    images_in_ram: bool = False,
) -> dict[str, Any]:
    """Stop-and-copy with CRIU alone: page server, dump, copy, restore.

    ``page_tls``: the pages in CRIU's own TLS, with the hosts' agent identities,
    as ``migsgx migrate`` sends them (without: plain TCP, CRIU's default).
    ``images_in_ram``: the destination's images in ``/dev/shm``, as the agent's
    with ``--images-in-ram``; without, in the testbed's directory, on the file
    system of the agent's work directory.
    """

    criu = criu or Criu()
    tls_in: tuple[Path, Path, Path] | None = None
    extra: dict[str, bool | str] = {}
    if page_tls:
        mine, theirs = (AgentIdentity.of_state(bed.state(n)) for n in ("src", "dst"))
        tls_in = (theirs.ca, theirs.cert, theirs.key)
        extra = {"tls": True, "tls_cacert": str(mine.ca), "tls_cert": str(mine.cert),
                 "tls_key": str(mine.key)}  # fmt: skip
    src, dst = bed.host("src"), bed.host("dst")
    here = Path(tempfile.mkdtemp(prefix="criu-only-", dir=bed.root))
    ready = here / "plain.ready"
    launcher = src.spawn(
        ["unshare", "--pid", "--fork", "setsid", sys.executable, "-c", PLAIN,
         str(max(1, size >> 20)), str(ready)],
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while not ready.exists():
        if launcher.poll() is not None or time.monotonic() > deadline:
            raise MigSGXError("the plain process did not start")
        time.sleep(0.02)
    digest = ready.read_text()
    pid = tree_pids(launcher.pid)[1]
    dump_dir = Path(tempfile.mkdtemp(prefix="migsgx-bench-dump-", dir="/dev/shm"))
    if images_in_ram:
        images = Path(tempfile.mkdtemp(prefix="migsgx-bench-images-", dir=scratch_base()))
    else:
        images = here / "images"
        images.mkdir()
    watch = MemoryWatch()
    settled = settle(here)  # (outside the timed part)
    try:
        with PageServerOn(dst, criu.binary, images, tls=tls_in) as pages:
            # The plain process and its launcher are reaped inside the window below:
            # what they spent before (filling their memory) is not CRIU's.
            plain_cpu = cpu_seconds(pid) + cpu_seconds(launcher.pid)
            cpu0 = children_cpu()
            watch.start()
            t0 = time.monotonic()
            criu.dump(pid, dump_dir, page_server=pages.address, enter=InTaskNamespaces(pid),
                      extra=extra)  # fmt: skip
            t_dump = time.monotonic()
            pages.wait(60)
        copy_images(dump_dir, images)
        t_copy = time.monotonic()
        launcher.wait(timeout=30)
        restored = criu.restore(images, enter=InNetns(dst.netns), log_file="restore.log")
        t_end = time.monotonic()
        cpu = children_cpu() - cpu0 - plain_cpu
    except BaseException:
        shutil.rmtree(images, ignore_errors=True)
        raise
    finally:
        watch.close()
        shutil.rmtree(dump_dir, ignore_errors=True)
    images_fs = fs_type(images)
    try:
        page_bytes, other = image_bytes(images)
    finally:
        kill_tree(restored)
        shutil.rmtree(images, ignore_errors=True)
        shutil.rmtree(here, ignore_errors=True)
    spans = {"criu_dump": [0.0, t_dump - t0], "transfer": [t_dump - t0, t_copy - t0],
             "restore": [t_copy - t0, t_end - t0]}  # fmt: skip
    return {
        "total_seconds": t_end - t0,
        "downtime_seconds": t_end - t0,
        "bytes": page_bytes + other,
        "phases": {
            "criu_dump": t_dump - t0,
            "transfer": t_copy - t_dump,
            "restore": t_end - t_copy,
        },
        "memory_digest": digest[:16],
        "page_tls": page_tls,
        "cpu_by_process": {"criu": cpu},  # dump, page server and restore
        "timeline": {"criu": spans},
        "images_fs": images_fs,
        "settle": settled,
        "memory_watch": watch.figures(spans, origin=t0),
    }
