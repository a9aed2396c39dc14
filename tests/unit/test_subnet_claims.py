"""A testbed's subnet: the preferred one when free, never one another run holds or uses.

The locks are real ``flock`` locks on files in a temporary directory, held by this
process or by a separate one; what the namespaces use is given as a set.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from migsgx.lab.netns import NetnsError
from migsgx.lab.subnets import SUBNETS, SubnetClaim, claim_subnet, subnets_of


def _claim(preferred: int, locks: Path, used: set[int] | None = None) -> SubnetClaim:
    return claim_subnet(preferred, lock_dir=locks, in_use=lambda: set(used or ()))


def test_the_preferred_subnet_when_it_is_free(tmp_path: Path) -> None:
    with _claim(62, tmp_path) as claim:
        assert claim.subnet == 62


def test_two_claims_at_once_never_share_a_subnet(tmp_path: Path) -> None:
    """The same module twice at once: the second run takes the next free subnet."""

    with _claim(62, tmp_path) as a, _claim(62, tmp_path) as b, _claim(62, tmp_path) as c:
        assert [a.subnet, b.subnet, c.subnet] == [62, 63, 64]


def test_a_released_subnet_is_free_again(tmp_path: Path) -> None:
    claim = _claim(62, tmp_path)
    claim.release()
    claim.release()  # (idempotent)
    with _claim(62, tmp_path) as again:
        assert again.subnet == 62


def test_a_subnet_with_an_address_in_a_namespace_is_passed_over(tmp_path: Path) -> None:
    """A run of code that takes no lock shows by its addresses."""

    with _claim(62, tmp_path, used={62, 63}) as claim:
        assert claim.subnet == 64


def test_the_search_wraps_past_255(tmp_path: Path) -> None:
    with _claim(255, tmp_path) as last, _claim(255, tmp_path, used={0}) as wrapped:
        assert (last.subnet, wrapped.subnet) == (255, 1)


def test_no_free_subnet_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(NetnsError, match="every subnet"):
        _claim(7, tmp_path, used=set(range(SUBNETS)))


@pytest.mark.parametrize("preferred", [-1, 256])
def test_a_subnet_outside_0_to_255_is_refused(tmp_path: Path, preferred: int) -> None:
    with pytest.raises(NetnsError, match=r"0\.\.255"):
        _claim(preferred, tmp_path)


@pytest.fixture
def other_run(tmp_path: Path) -> Iterator[subprocess.Popen[str]]:
    """Another process that claims subnet 62 and holds it until its stdin closes."""

    code = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        from migsgx.lab.subnets import claim_subnet
        claim = claim_subnet(62, lock_dir=Path({str(tmp_path)!r}), in_use=set)
        print(claim.subnet, flush=True)
        sys.stdin.read()
    """)
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "62"
    yield proc
    proc.kill()
    proc.wait()


def test_a_subnet_another_process_holds_is_passed_over_until_it_dies(
    tmp_path: Path, other_run: subprocess.Popen[str]
) -> None:
    with _claim(62, tmp_path) as claim:
        assert claim.subnet == 63
    other_run.kill()  # (a crashed run: the kernel drops its lock)
    other_run.wait()
    with _claim(62, tmp_path) as claim:
        assert claim.subnet == 62


def test_a_claim_is_not_inherited_by_the_processes_a_bed_starts(tmp_path: Path) -> None:
    """Close-on-exec: an agent that outlives its bed does not keep the subnet."""

    with _claim(62, tmp_path) as claim:
        child = subprocess.Popen(["sleep", "30"])
        try:
            claim.release()
            with _claim(62, tmp_path) as again:
                assert again.subnet == 62
        finally:
            child.kill()
            child.wait()


def test_the_subnets_in_use_are_read_from_the_addresses() -> None:
    output = "\n".join(
        [
            "1: lo    inet 127.0.0.1/8 scope host lo",
            "2: eth0    inet 10.250.62.1/24 scope global eth0",
            "netns: migsgx-1.2-abc-src",
            "3: br0    inet 10.250.147.2/24 scope global br0",
            "4: eth1    inet 110.250.9.1/24 scope global eth1",
            "5: eth2    inet 10.25.3.1/24 scope global eth2",
            "6: eth3    inet6 fe80::1/64 scope link",
            "7: eth4    inet 10.250.999.1/24 scope global eth4",
        ]
    )
    assert subnets_of(output) == {62, 147}
