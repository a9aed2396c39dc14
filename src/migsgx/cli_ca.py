"""``migsgx ca``: the provisioning CA all hosts of a deployment trust.

It plays Intel's PCK chain for the emulated platform: ``init`` makes the CA,
``publish`` signs fresh collateral (TCB info, QE identity, CRLs) that quote
verification reads, ``revoke`` and ``tcb`` change it (``docs/platform.md``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from .cli_output import emit as _emit
from .sgx.tcb_status import TCB_STATUSES

if TYPE_CHECKING:
    from .sgx.collateral import Collateral

__all__ = ["ca"]


@click.group()
def ca() -> None:
    """The provisioning CA all hosts of a deployment trust."""


@ca.command("init")
@click.option("--dir", "directory", type=click.Path(path_type=Path), required=True)
def ca_init(directory: Path) -> None:
    """Create a new provisioning CA in DIR."""

    from cryptography.hazmat.primitives import hashes

    from .sgx.ca import ProvisioningCA

    authority = ProvisioningCA.init(directory)
    fp = authority.certificate.fingerprint(hashes.SHA256())
    _emit({"ca": str(directory), "fingerprint_sha256": fp.hex()})


def _collateral_summary(collateral: Collateral) -> dict[str, object]:
    from .sgx.collateral import iso  # (X.509: only the commands that need it import it)

    start, end = collateral.validity()
    doc = collateral.tcb_info_document
    levels = doc.get("tcbLevels", [])
    return {
        "issued": iso(start),
        "next_update": iso(end),
        "tcb_levels": {
            str(lv["tcb"]["sgxtcbcomponents"][0]["svn"]): lv["tcbStatus"]
            for lv in levels
            if isinstance(lv, dict)
        }
        if isinstance(levels, list)
        else {},
    }


@ca.command("publish")
@click.option("--dir", "directory", type=click.Path(path_type=Path), required=True)
@click.option("--valid-days", type=click.IntRange(min=1), default=30, show_default=True)
def ca_publish(directory: Path, valid_days: int) -> None:
    """Sign fresh collateral (TCB info, QE identity, CRLs) into DIR/collateral.json."""

    import datetime as dt

    from .sgx.ca import ProvisioningCA
    from .sgx.pcs import publish

    collateral = publish(ProvisioningCA.load(directory), valid_for=dt.timedelta(days=valid_days))
    _emit({"ca": str(directory), **_collateral_summary(collateral)})


@ca.command("revoke")
@click.argument("host_id")
@click.option("--dir", "directory", type=click.Path(path_type=Path), required=True)
def ca_revoke(host_id: str, directory: Path) -> None:
    """Revoke HOST_ID's PCK certificate and republish the collateral."""

    from .sgx.ca import ProvisioningCA
    from .sgx.pcs import revoke_host

    collateral = revoke_host(ProvisioningCA.load(directory), host_id)
    _emit({"ca": str(directory), "revoked": host_id, **_collateral_summary(collateral)})


@ca.command("tcb")
@click.argument("level", type=click.IntRange(0, 255))
@click.argument("status", type=click.Choice(TCB_STATUSES))
@click.option("--dir", "directory", type=click.Path(path_type=Path), required=True)
def ca_tcb(level: int, status: str, directory: Path) -> None:
    """Add TCB LEVEL or give it STATUS (a TCB recovery), and republish the collateral."""

    from .sgx.ca import ProvisioningCA
    from .sgx.pcs import set_level

    collateral = set_level(ProvisioningCA.load(directory), level, status)
    _emit({"ca": str(directory), **_collateral_summary(collateral)})
