"""The CRIU-alone baselines of ``migsgx bench process``, plain and in CRIU's TLS.

Real CRIU between two namespaced hosts: a plain process of a few MiB is dumped
through a page server on the destination and restored there; with
``page_tls`` the page stream runs in CRIU's own TLS with the hosts' agent
identities (a certificate that did not fit would fail the dump).  Nothing
timed: the figures are checked for being there and for the bytes moved.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from migsgx.agent.imageroom import fs_type
from migsgx.lab.bench.process import criu_only, one_run
from migsgx.lab.testbed import Testbed

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="namespaces and CRIU need root"),
]

BED_SUBNET = 147
MIB = 1 << 20


@pytest.mark.parametrize("page_tls", [False, True])
def test_criu_alone_moves_the_pages_plain_or_in_tls(bed: Testbed, page_tls: bool) -> None:
    result = criu_only(bed, 8 * MIB, page_tls=page_tls)
    assert result["page_tls"] is page_tls
    assert result["bytes"] >= 8 * MIB  # the process's memory went through the page server
    phases = result["phases"]
    assert set(phases) == {"criu_dump", "transfer", "restore"}
    assert result["total_seconds"] == pytest.approx(sum(phases.values()), rel=1e-6, abs=1e-6)


def test_migsgx_pages_through_the_relay_and_on_the_old_path(bed: Testbed) -> None:
    """``--ab-page-tls``: migsgx's pages through the sealed relay, then in CRIU's TLS."""

    run = one_run(bed, 4 * MIB, ab_page_tls=True)
    relay, old = run["migsgx"], run["migsgx_criu_tls"]
    assert relay["page_path"] == "relay" and relay["page_tls"] is False
    assert old["page_path"] == "criu-tls" and old["page_tls"] is True
    for figures in (relay, old):
        assert figures["details"]["page_bytes"] >= 4 * MIB  # the ordinary memory moved
    assert run["page_relay_speedup"] == old["total_seconds"] / relay["total_seconds"]
    assert run["criu_only_tls"]["page_tls"] is True


def test_images_in_ram_against_the_work_directory(bed: Testbed) -> None:
    """``--ab-images-ram``: the destination's images in the work directory (the default)
    and in RAM (``agent serve --images-in-ram``), for migsgx and CRIU alone alike."""

    agents = set(bed.root.glob("agent-*.log"))
    run = one_run(bed, 4 * MIB, ab_images_ram=True)
    disk = fs_type(bed.root)  # (the agent's work directory lies under it)
    assert run["migsgx"]["images_fs"] == run["criu_only"]["images_fs"] == disk
    assert run["migsgx_images_ram"]["images_fs"] == "tmpfs"
    assert run["criu_only_images_ram"]["images_fs"] == "tmpfs"
    # The agent said where, and why: the announced memory, its enclaves', the room it found.
    logs = "".join(p.read_text() for p in set(bed.root.glob("agent-*.log")) - agents)
    assert "(RAM): room for" in logs and "the process announced" in logs
    assert "its enclaves" in logs  # (their memory_size counts: the room check, imageroom)
    for name in ("migsgx", "migsgx_images_ram"):
        assert run[name]["details"]["page_bytes"] >= 4 * MIB  # the ordinary memory moved
        watch = run[name]["memory_watch"]
        assert {"criu_dump", "restore", "resume"} <= set(watch["phases_mib"])
    assert set(run["criu_only"]["memory_watch"]["phases_mib"]) == {
        "criu_dump", "transfer", "restore",
    }  # fmt: skip
    assert run["images_ram_total_speedup"] == (
        run["migsgx"]["total_seconds"] / run["migsgx_images_ram"]["total_seconds"]
    )
    # Nothing left in RAM: CRIU alone's images, the agent's (named with its pid).
    assert not list(Path("/dev/shm").glob("migsgx-bench-images-*"))
    for log in set(bed.root.glob("agent-*.log")) - agents:
        for line in log.read_text().splitlines():
            if "(RAM): room for" in line:
                placed = Path(line.split("the images go to ")[1].split(" (RAM)")[0])
                assert placed.parent == Path("/dev/shm") and not placed.exists()


def test_spent_images_and_another_chunk_size_paired(bed: Testbed) -> None:
    """``--ab-spend-images`` and ``--ab-chunk-size``: the agent's default restore (its
    images spent as CRIU reads them) beside one that leaves them whole, and migrate
    with another chunk size; every arm moved the app with its memory intact."""

    run = one_run(bed, 4 * MIB, ab_spend_images=True, ab_chunk_size=256 << 10, flip=True)
    assert run["whole_images_ran_first"] is True and run["chunk_ran_first"] is True
    for name in ("migsgx", "migsgx_whole_images", "migsgx_chunk"):
        assert run[name]["details"]["page_bytes"] >= 4 * MIB  # (digests checked by one_run)
    whole, spent = run["migsgx_whole_images"], run["migsgx"]
    assert run["spend_images_restore_speedup"] == (
        whole["phases"]["restore"] / spent["phases"]["restore"]
    )
    assert run["chunk_size"] == 256 << 10
    assert run["chunk_downtime_speedup"] == (
        spent["downtime_seconds"] / run["migsgx_chunk"]["downtime_seconds"]
    )
