"""The listener gate's note read back from another network namespace.

A container that shares the tool's network namespace has its listeners gated
(a DROP rule in that namespace) before the freeze; the tool notes the gate for
its guardian and for ``migsgx recover``.  Here the tool and its tree run in
lab namespace ``a``, the tree ends (a committed source is killed), and the
note is read by a ``recover`` running in namespace ``b``.  Before, the note
named ``/proc/self/ns/net`` ("the guardian shares it too"): run from ``b``, the
gate opened in ``b``, and ``a``'s rule stayed, dropping every new connection
to that port for good.  Now the note carries the namespace's inode, and the
reader opens the gate only in the namespace of that inode, or says it cannot.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from migsgx.lab.netns import NETNS_DIR, HostNetwork

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

PORT = 7000

#: The tool, in its namespace: a listening tree of its own, gated, noted; then the
#: tree ends (its namespace lives on, shared with the tool's).
_TOOL = textwrap.dedent(
    f"""
    import subprocess, sys
    from migsgx.containers.gate import ListenerGate
    tree = subprocess.Popen([sys.executable, "-c",
        "import socket, sys; s = socket.socket(); s.bind(('0.0.0.0', {PORT})); s.listen(8); "
        "print('ready', flush=True); sys.stdin.readline()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert tree.stdout.readline().strip() == "ready"
    gate = ListenerGate.of_tree(tree.pid)
    gate.close()
    print(gate.note(), flush=True)
    tree.kill()
    tree.wait()
    """
)

#: ``migsgx recover``'s code for a noted gate (``agent.source_host.open_gates``).
_RECOVER = textwrap.dedent(
    """
    import sys
    from migsgx.containers.gate import open_gate, parse_ungate
    gate = parse_ungate(sys.argv[1])
    assert gate is not None, sys.argv[1]
    print("opened" if open_gate(*gate) is not False else "refused", flush=True)
    """
)


def _gated(netns: Path) -> bool:
    rules = subprocess.run(["nsenter", f"--net={netns}", "iptables", "-w", "-S", "INPUT"],
                           capture_output=True, text=True, check=True).stdout  # fmt: skip
    return f"--dport {PORT}" in rules


def test_recover_run_from_another_namespace_opens_the_gate_where_it_was_closed(
    require_root: None, _stale_namespaces_removed: None
) -> None:
    with HostNetwork(["a", "b"], subnet=96) as net:
        a, b = net["a"], net["b"]
        note = a.run([sys.executable, "-c", _TOOL]).stdout.strip()
        a_ns = NETNS_DIR / a.netns
        try:
            assert note.startswith("ungate ") and _gated(a_ns)
            elsewhere = " ".join([*note.split()[:3], "1"])  # a namespace nobody reaches
            refused = b.run([sys.executable, "-c", _RECOVER, elsewhere])
            assert refused.stdout.strip() == "refused" and "not reachable" in refused.stderr
            assert _gated(a_ns)
            recovered = b.run([sys.executable, "-c", _RECOVER, note])
            assert recovered.stdout.strip() == "opened", recovered.stderr
            assert not _gated(a_ns), f"the gate stayed closed in the tree's namespace ({note})"
            assert not _gated(NETNS_DIR / b.netns)
        finally:
            subprocess.run(["nsenter", f"--net={a_ns}", "iptables", "-w", "-D", "INPUT", "-p",
                            "tcp", "--syn", "--dport", str(PORT), "-j", "DROP"],
                           capture_output=True, check=False)  # fmt: skip
