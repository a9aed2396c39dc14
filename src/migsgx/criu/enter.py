"""Where a ``criu swrk`` runs: in a named network namespace, or in a live task's namespaces.

A request's place is a value the caller picks (a checkpoint's tree in its pod,
a restore into a lab host) and the RPC client (:mod:`.rpc`) and its CRIU process
(:mod:`.swrk`) only turn into an ``nsenter`` prefix: the choice stands apart from
both, so that callers name it without reaching into the RPC.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

__all__ = ["Enter", "InNetns", "InTaskNamespaces"]


_NETNS_DIR: Final = "/run/netns"


@dataclass(frozen=True)
class InNetns:
    """Run CRIU in a named network namespace (``/run/netns/NAME``).

    Only the network namespace changes (``nsenter --net``); CRIU and the
    tasks it restores keep the caller's mount namespace, so files look the
    same as on the source. (``ip netns exec`` would add a private mount
    namespace, whose mounts a later dump cannot resolve for descriptors
    opened outside it.)
    """

    name: str

    def argv_prefix(self) -> list[str]:
        return ["nsenter", f"--net={_NETNS_DIR}/{self.name}", "--"]


@dataclass(frozen=True)
class InTaskNamespaces:
    """Run CRIU in the network and mount namespaces of a live task (``nsenter``).

    This is how a task living in another network namespace is dumped: CRIU
    then sees the task's namespaces as its own and does not try to dump them.
    """

    pid: int
    net: bool = True
    mount: bool = True

    def argv_prefix(self) -> list[str]:
        argv = ["nsenter", f"--target={self.pid}"]
        if self.net:
            argv.append("--net")
        if self.mount:
            argv.append("--mount")
        return argv


Enter = InNetns | InTaskNamespaces
