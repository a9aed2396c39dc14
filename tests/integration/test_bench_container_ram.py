"""The destination's images in RAM for containers and processes, with the room each restore needs.

Real engines and CRIU between two namespaced hosts.  ``migsgx bench container
--ab-images-ram`` moves a runc and a podman container of the ``model`` app (a few
MiB of enclave memory) with the destination agent's work directory (the default)
and with ``agent serve --images-in-ram`` in the same run: the second arm's images
went to a tmpfs, the container came up with its state (``one_run`` compares the
digests), the agent reserved room for the copies its engine's restore makes
(podman: two of its archive, unpacked and packed again, at most, each removed once the
next is made, one through its restore; runc: the images) and for the tree,
and nothing is left in ``/dev/shm``.  A process tree of one task spends its images
as CRIU reads them, so its agent reserves the tree's memory twice only for one
read.  A container this small has its destination enclave fault the source's memory
in before the freeze by default; a process tree does not.  Nothing timed.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from migsgx.agent.imageroom import IMAGE_COPIES, MARGIN, SPEND_STEP, SPENT_COPIES, fs_type
from migsgx.criu import Criu
from migsgx.lab.bench import container, process
from migsgx.lab.containers import ContainerLab
from migsgx.lab.testbed import Testbed

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="namespaces, engines and CRIU need root"),
]

BED_SUBNET = 149
BED_CONTAINERS = True
MIB = 1 << 20
PLACED = re.compile(
    r"the images go to (\S+) \(RAM\): room for \d+ MiB, the restore needs (\d+) MiB "
    r"\(the process announced (\d+) MiB, its enclaves (\d+) MiB(, the images spent)?\)"
)


def _placed(bed: Testbed, before: set[Path]) -> list[re.Match[str]]:
    """The agents' lines that put images into RAM, of the agents started since ``before``."""

    logs = "".join(p.read_text() for p in set(bed.root.glob("agent-*.log")) - before)
    return list(PLACED.finditer(logs))


def _needs(
    announced: int, enclaves: int, copies: int, spends: bool, held: int | None = None
) -> int:
    """What the agent logs as needed, in MiB (its figures are whole MiB in the log)."""

    tree = min(announced, SPEND_STEP >> 20) if spends else announced
    through = copies if held is None else held
    return max(copies * announced, through * announced + tree) + enclaves + (MARGIN >> 20)


@pytest.mark.parametrize("engine", ["runc", "podman"])
def test_a_container_s_images_in_ram_with_room_for_its_engine_s_copies(
    bed: Testbed, lab: ContainerLab, criu: Criu, engine: str
) -> None:
    agents = set(bed.root.glob("agent-*.log"))
    run = container.one_run(bed, lab, engine, 4 * MIB, criu, ab=("images_ram",))
    assert run["migsgx"]["images_fs"] == fs_type(bed.root)  # the work directory lies there
    assert run["migsgx_images_ram"]["images_fs"] == "tmpfs"
    assert run["images_ram_ran_first"] is False
    assert run["images_ram_total_speedup"] == (
        run["migsgx"]["total_seconds"] / run["migsgx_images_ram"]["total_seconds"]
    )
    # A container this small has no dump of size beside its enclave stream: by default
    # its destination enclave faults the source's memory in before the freeze.
    for name in ("migsgx", "migsgx_images_ram"):
        assert run[name]["prefault_ahead"] is True
        assert run[name]["prefaulted_bytes"] >= 4 * MIB
    [placed] = _placed(bed, agents)
    announced, enclaves = int(placed[3]), int(placed[4])
    assert announced > 0 and enclaves >= 4
    # runc's restore reads the images where they are; podman's removes each of its
    # copies once the next is made: two at most, one through its restore.
    assert (placed[5] is not None) == (engine in SPENT_COPIES)
    needed = int(placed[2])
    copies, held = SPENT_COPIES.get(engine, (IMAGE_COPIES[engine], None))
    expected = _needs(announced, enclaves, copies, False, held)
    # (the log rounds each figure down to a MiB)
    assert expected <= needed <= expected + IMAGE_COPIES[engine] + 2
    assert not Path(placed[1]).exists()  # gone with the migration


def test_a_one_task_tree_spends_its_images_so_its_room_holds_one_read_twice(
    bed: Testbed,
) -> None:
    agents = set(bed.root.glob("agent-*.log"))
    figures = process._migsgx(bed, 4 * MIB, agent_args=("--images-in-ram",))
    assert figures["images_fs"] == "tmpfs"
    assert figures["details"]["page_bytes"] >= 4 * MIB  # the ordinary memory moved
    [placed] = _placed(bed, agents)
    announced, enclaves = int(placed[3]), int(placed[4])
    assert placed[5] is not None  # the pid driver's CRIU with auto_dedup
    assert figures["prefault_ahead"] is False  # (a process tree: as before)
    needed = int(placed[2])
    expected = _needs(announced, enclaves, IMAGE_COPIES["pid"], True)
    assert expected <= needed <= expected + 3
    assert not Path(placed[1]).exists()
