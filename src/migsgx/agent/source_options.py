"""What the caller of ``migsgx migrate`` gives and gets back: the options of one
migration and its outcome (made before it starts, read after it ended).

The state the migration's steps share while it runs is :mod:`.source_state`;
this module knows nothing of it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..containers import ContainerSettings, Source
from ..core.stoprules import StopRules
from ..criu import Criu
from ..errors import ConfigError
from .precopy import RoundReport
from .tls import AgentIdentity

__all__ = ["MigrateOptions", "MigrationOutcome", "Progress", "keeps_tcp"]

Progress = Callable[[str], None]


@dataclass
class MigrateOptions:
    pid: int  # the root of the tree (driver "pid"); 0 with a container ``target``
    to: tuple[str, int]
    identity: AgentIdentity
    criu: Criu = field(default_factory=Criu)
    driver: str = "pid"  # what migrates: a name of migsgx.containers.DRIVERS
    target: str | None = None  # the driver's name for it (a container id); default: pid
    containers: ContainerSettings = field(default_factory=ContainerSettings)
    work_dir: Path | None = None  # default: a fresh directory in /dev/shm
    keep_images: bool = False
    prepare_timeout: float = 30.0
    io_timeout: float = 300.0
    chunk_size: int | None = None
    mode: str = "pipelined"
    tcp_close: bool = True
    #: Keep established TCP connections open across the move: None = wherever the
    #: workload owns an address that moves with it; True = required (else an error).
    tcp_established: bool | None = None
    shell_job: bool = False
    progress: Progress | None = None
    # Live migration (agent/precopy.py): pre-copy rounds before the freeze.
    live: bool = False
    stop_rules: StopRules | None = None
    round_report: RoundReport | None = None
    # Post-copy (agent/lazy.py): the process's private memory follows after the commit.
    post_copy: bool = False
    lazy_port: int = 0  # where the source's CRIU serves it (0: a port the kernel picks)
    #: Below this much private memory in the tree, its memory moves while frozen even
    #: with ``post_copy`` (agent/postcopy_choice.py: ``--live``'s choice); 0: no such rule.
    post_copy_min: int = 0
    #: A line for the operator (the CLI prints it on stderr).
    notice: Callable[[str], None] | None = None
    # Stop-and-copy: the destination enclaves launch and attest before the freeze.
    early_handshake: bool = True
    #: The pid driver's pages through the sealed relay (``docs/spec/pagestream.md``);
    #: False: in CRIU's own TLS (GnuTLS), the slower path kept for comparison.
    page_relay: bool = True
    #: CRIU's dump (with its page stream: the page relay's source end too) this much
    #: nicer than the tool's other threads, the enclave streams beside it (negative:
    #: less nice).
    criu_nice: int = 0
    #: CRIU's dump (and its page relay) in a cgroup of this CPU weight (cgroup v2's
    #: scale, 100 a process's own) beside the enclave streams; None: not moved
    #: (:mod:`migsgx.system.cpugroups`).
    criu_weight: int | None = None
    #: The offers carry each source enclave's memory in use, which the destination
    #: enclaves fault in before the freeze (False: as it loads).  None: ahead for a
    #: container whose memory is at most ``source_state.PREFAULT_TREE_MAX``, no dump of
    #: size beside the enclave streams (docs/benchmarks.md, "Containers with the new
    #: defaults").
    prefault_ahead: bool | None = None
    #: With enclaves (not post-copy): CRIU's images go and the destination restores
    #: the tree (held, stopped) while the enclave streams still load; the join, the
    #: fence and the commit follow.  False: the enclaves first, as before
    #: (docs/benchmarks.md, "Restoring while the enclaves still load").
    overlap_restore: bool = True


@dataclass
class MigrationOutcome:
    stats: dict[str, Any]
    restored_pid: int
    images_dir: Path | None


def keeps_tcp(wanted: bool | None, source: Source) -> bool:
    """Whether established connections move open (``MigrateOptions.tcp_established``).

    Only a workload whose address moves with it can keep them: elsewhere CRIU would
    restore a connection from an address the destination does not answer for.
    """

    if wanted and source.no_tcp_keep:
        raise ConfigError(f"--tcp-established cannot apply to {source.label}: {source.no_tcp_keep}")
    return source.no_tcp_keep == "" and wanted is not False


def _host_id(opts: MigrateOptions) -> str:
    try:
        return opts.identity.host_id()
    except (OSError, ValueError):
        return "unknown"
