"""The ``ungate NETNS PORTS`` note, read back by the guardian and by ``migsgx recover``.

Both run ``nsenter``/``iptables`` as root with what the note names, so one reader
checks it: whatever :meth:`ListenerGate.note` wrote comes back the same, and no
garbage (a torn line, a flipped byte, a netns that could be an option or leave
``/proc`` and ``/run/netns``, a port outside 1-65535) yields a gate to open.
"""

from __future__ import annotations

import os
import re

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from migsgx.containers.base import ContainerError
from migsgx.containers.gate import ListenerGate, open_gate, parse_ungate, reach_netns

_NETNS = st.one_of(
    st.just("/proc/self/ns/net"),
    st.integers(1, 2**22).map(lambda pid: f"/proc/{pid}/ns/net"),
    st.from_regex(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,40}", fullmatch=True).map(
        lambda name: f"/run/netns/{name}"
    ),
)
_PORTS = st.lists(st.integers(1, 65535), min_size=1, max_size=8)


_INODES = st.one_of(st.just(0), st.integers(1, 2**64 - 1))


@given(_NETNS, _PORTS, _INODES)
def test_a_note_the_gate_wrote_reads_back_the_same(
    netns: str, ports: list[int], inode: int
) -> None:
    note = ListenerGate(root=1, ports=ports, netns=netns, netns_inode=inode).note()
    assert parse_ungate(note) == (netns, ports, inode)


@given(st.text(max_size=120))
@example("ungate /proc/self/ns/net 0")
@example("ungate /proc/self/ns/net 65536")
@example("ungate /proc/self/ns/net 80,")
@example("ungate /proc/self/ns/net +80")
@example("ungate /proc/self/ns/net 080")
@example("ungate /proc/self/ns/net \uff18\uff10")
@example("ungate --help 80")
@example("ungate /run/netns/.. 80")
@example("ungate /run/netns/../../etc 80")
@example("ungate /etc/passwd 80")
@example("ungate /proc/self/ns/net")
@example("ungate /proc/self/ns/net 80 443")
@example("ungate /proc/self/ns/net 80 0443")
@example("ungate /proc/self/ns/net 80 18446744073709551616")
@example("ungate /proc/self/ns/net 80 4026531840 1")
@example("thaw /proc/self/ns/net 80")
def test_garbage_is_no_gate(note: str) -> None:
    """Any text either is a well-formed note (then every field is in range) or gives None."""

    parsed = parse_ungate(note)
    if parsed is None:
        return
    netns, ports, inode = parsed
    assert note.split()[:3] == ["ungate", netns, ",".join(map(str, ports))]
    assert note.split()[3:] in ([], [str(inode)]) and 0 <= inode < 2**64
    assert re.fullmatch(r"/proc/(self|[1-9][0-9]*)/ns/net|/run/netns/[A-Za-z0-9_.-]+", netns)
    assert netns not in ("/run/netns/.", "/run/netns/..")
    assert ports and all(1 <= p <= 65535 for p in ports)


@given(_NETNS, _PORTS, _INODES, st.data())
def test_a_torn_or_flipped_note_is_no_gate_or_a_valid_one(
    netns: str, ports: list[int], inode: int, data: st.DataObject
) -> None:
    note = ListenerGate(root=1, ports=ports, netns=netns, netns_inode=inode).note()
    cut = data.draw(st.integers(0, len(note)))
    where = data.draw(st.integers(0, len(note) - 1))
    flip = data.draw(st.characters())
    for damaged in (note[:cut], note[:where] + flip + note[where + 1 :]):
        parsed = parse_ungate(damaged)
        assert parsed is None or all(1 <= p <= 65535 for p in parsed[1])


def test_the_rejected_shapes() -> None:
    for note in (
        "ungate /proc/self/ns/net 0",
        "ungate /proc/self/ns/net 65536",
        "ungate /proc/self/ns/net 80,,443",
        "ungate /proc/0/ns/net 80",
        "ungate -n 80",
        "ungate /run/netns/.. 80",
        "ungate /run/netns/a/b 80",
        "ungate /proc/self/ns/net ",
        "ungate /proc/self/ns/net ٨٠",
        "ungate /proc/self/ns/net 80 -1",
        "ungate /proc/self/ns/net 80 x",
    ):
        assert parse_ungate(note) is None, note
    assert parse_ungate("ungate /run/netns/migsgx-a.1 80,443") == (
        "/run/netns/migsgx-a.1",
        [80, 443],
        0,
    )
    assert parse_ungate("ungate /proc/77/ns/net 80 4026531840") == (
        "/proc/77/ns/net",
        [80],
        4026531840,
    )


def test_the_noted_inode_decides_where_the_gate_opens() -> None:
    """A name whose namespace is not the noted one is not used: this process's own (or
    the first process's, or a named one) with that inode is; none: a clear refusal."""

    own = os.stat("/proc/self/ns/net").st_ino
    assert reach_netns("/proc/self/ns/net", own) == "/proc/self/ns/net"
    assert reach_netns("/proc/999999999/ns/net", own) in ("/proc/self/ns/net",)
    assert reach_netns("/proc/999999999/ns/net", 0) == "/proc/999999999/ns/net"  # (older note)
    with pytest.raises(ContainerError, match="not reachable from here"):
        reach_netns("/proc/self/ns/net", 1)
    assert open_gate("/proc/self/ns/net", [80], 1) is False  # nothing run: said on the log
