"""What ``begin`` announces so that the destination can refuse before the source freezes.

A destination that would refuse the workload at the restore (a container
configuration beyond its allow list; a port the application listens on that
something else holds there) would do so after the source froze, its enclaves
dumped and CRIU ran: the migration rolls back, but the application stood
still for nothing.  So the tool announces in ``begin``, which comes before the
freeze (the early handshake's, or the pre-copy's), what the restore depends
on, and the destination checks it there:

* ``spec``: the OCI runtime specification of a container (runc, podman,
  containerd), admitted by the driver as its restore would
  (:meth:`~migsgx.containers.Driver.admit_spec`); the restore admits what
  actually arrives again, the announcement binds nothing;
* ``ports``: the TCP and UDP ports a process tree (driver ``pid``) listens on,
  bound once in the namespace the agent restores it into
  (:func:`~migsgx.system.ports.check_bindable`): a taken one is refused as
  ``port-in-use``.  The same for a container that shares its host's network
  namespace (its specification joins one by path, or names none; and it does
  not take an address of its own, a pod namespace the restore makes fresh):
  it is restored into the destination's configured namespace (``netns`` in
  ``containers.toml``, else the agent's), where something else may hold its
  port, and the check runs there.  A container with a network namespace of its
  own gets a fresh one at the destination: nothing there can hold its ports,
  and nothing is announced.

A refusal is an ``err`` answer to ``begin``: the tool exits 6 ("did not move,
the source runs") and the source was never frozen.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..containers import Driver, Source
from ..errors import ProtocolError
from ..system.ports import (
    MAX_LISTENERS,
    Listener,
    check_bindable,
    check_bindable_in,
    listeners,
)

__all__ = ["admit", "announce", "shares_host_network"]


def shares_host_network(spec: Mapping[str, Any] | None, target: Mapping[str, Any]) -> bool:
    """Whether a container runs in its host's network namespace (not one of its own)."""

    if spec is None or "net" in target:  # (a pod namespace the restore makes fresh)
        return False
    linux = spec.get("linux")
    namespaces = linux.get("namespaces") if isinstance(linux, Mapping) else None
    for ns in namespaces if isinstance(namespaces, list) else []:
        if isinstance(ns, Mapping) and ns.get("type") == "network":
            return bool(ns.get("path"))
    return True  # none named: the engine's own


def announce(driver: str, source: Source, pids: Sequence[int]) -> dict[str, Any]:
    """Source side: the fields ``begin`` adds for the destination's early checks."""

    out: dict[str, Any] = {}
    if source.spec is not None:
        out["spec"] = source.spec
    if driver == "pid" or shares_host_network(source.spec, source.target):
        out["ports"] = [p.to_wire() for p in listeners(source.root, pids)]
    return out


def admit(
    driver: Driver,
    target: Mapping[str, Any],
    begin: Mapping[str, Any],
    netns: Path | None = None,
) -> None:
    """Destination side: refuse ``begin`` for what its restore would refuse (see the module).

    ``netns``: the network namespace this host restores containers that joined
    theirs into (None: the agent's own).
    """

    spec = begin.get("spec")
    if spec is not None:
        driver.admit_spec(target, spec)
    ports = begin.get("ports")
    if ports is not None:
        if driver.name != "pid" and not shares_host_network(spec, target):
            raise ProtocolError("only a workload in its host's network namespace announces ports")
        if not isinstance(ports, list):
            raise ProtocolError("the listening ports are not a list")
        if len(ports) > MAX_LISTENERS:
            raise ProtocolError(f"at most {MAX_LISTENERS} listening ports")
        wanted = [Listener.from_peer(p) for p in ports]
        if driver.name == "pid":
            check_bindable(wanted)
        else:
            check_bindable_in(netns, wanted)
