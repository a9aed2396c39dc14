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
  ``port-in-use``.

A refusal is an ``err`` answer to ``begin``: the tool exits 6 ("did not move,
the source runs") and the source was never frozen.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ..containers import Driver, Source
from ..errors import ProtocolError
from ..system.ports import MAX_LISTENERS, Listener, check_bindable, listeners

__all__ = ["admit", "announce"]


def announce(driver: str, source: Source, pids: Sequence[int]) -> dict[str, Any]:
    """Source side: the fields ``begin`` adds for the destination's early checks."""

    out: dict[str, Any] = {}
    if source.spec is not None:
        out["spec"] = source.spec
    if driver == "pid":
        out["ports"] = [p.to_wire() for p in listeners(source.root, pids)]
    return out


def admit(driver: Driver, target: Mapping[str, Any], begin: Mapping[str, Any]) -> None:
    """Destination side: refuse ``begin`` for what its restore would refuse (see the module)."""

    spec = begin.get("spec")
    if spec is not None:
        driver.admit_spec(target, spec)
    ports = begin.get("ports")
    if ports is not None:
        if driver.name != "pid":
            raise ProtocolError("only a process tree announces its ports")
        if len(ports) > MAX_LISTENERS:
            raise ProtocolError(f"at most {MAX_LISTENERS} listening ports")
        check_bindable([Listener.from_peer(p) for p in ports])
