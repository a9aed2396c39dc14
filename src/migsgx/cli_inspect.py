"""``migsgx inspect PATH``: a checkpoint's contents as a table or JSON, and the canary scan.

A thin shell over :func:`migsgx.inspection.inspect_path`; the exit status is
non-zero (``plaintext-found``) when the scan finds a canary or an unsealed
enclave frame, so scripts and CI can use it as a check.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from .errors import PlaintextFoundError

__all__ = ["inspect_command"]


@click.command("inspect")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="print the report as JSON")
@click.option("--canary", "canaries", multiple=True, metavar="TEXT",
              help="bytes that must appear nowhere in the checkpoint (repeatable)")  # fmt: skip
@click.option("--state", type=click.Path(path_type=Path), default=None,
              help="a host's state directory: were its enclaves restored there?")  # fmt: skip
def inspect_command(
    path: Path, as_json: bool, canaries: tuple[str, ...], state: Path | None
) -> None:
    """Show what the checkpoint at PATH holds (a directory, or a podman/containerd archive)."""

    from .inspection import inspect_path

    report = inspect_path(path, canaries=[c.encode() for c in canaries], state=state)
    if as_json:
        click.echo(json.dumps(report, indent=2, sort_keys=True))
    else:
        _table(report)
    scan = report["scan"]
    if not scan["clean"]:
        found = [k for k, v in scan["canaries"].items() if v] + scan["plaintext_suspects"]
        raise PlaintextFoundError(f"{path}: {len(found)} finding(s): {', '.join(found)[:500]}")


def _table(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    head = Table(
        title=f"{report['path']}  ({report['kind']}, {report['engine']})", show_header=False
    )
    head.add_column("what")
    head.add_column("value")
    for key, value in (report.get("container") or {}).items():
        head.add_row(f"container {key}", str(value))
    criu = report.get("criu") or {}
    head.add_row("CRIU images", f"{criu.get('images')} files, {criu.get('image_bytes', 0):,} bytes")
    head.add_row("process memory (pages)", f"{criu.get('memory_bytes', 0):,} bytes")
    committed = report.get("committed")
    head.add_row("committed", "n/a (enclaves moved enclave to enclave)" if committed is None
                 else str(committed))  # fmt: skip
    scan = report["scan"]
    hits = sum(len(v) for v in scan["canaries"].values())
    head.add_row("scan", f"{'clean' if scan['clean'] else 'FOUND'}: {hits} canary hit(s), "
                 f"{scan['sealed_frames']} sealed frames, "
                 f"{len(scan['plaintext_suspects'])} suspect(s)")  # fmt: skip
    console.print(head)
    procs = Table(title="process tree")
    for col in ("pid", "ppid", "threads", "command"):
        procs.add_column(col)
    for p in report.get("processes") or []:
        procs.add_row(str(p["pid"]), str(p["ppid"]), str(p["threads"]), str(p["command"]))
    console.print(procs)
    if report.get("enclaves"):
        enc = Table(title="enclaves")
        for col in ("#", "name", "MRENCLAVE", "MRSIGNER", "SVN", "policy", "sealed", "status"):
            enc.add_column(col)
        for e in report["enclaves"]:
            sealed = e["sealed"]
            enc.add_row(
                str(e["index"]), e["name"], e["mrenclave"][:16] + "…",
                (e["mrsigner"] or "unsigned")[:16] + "…", str(e["isv_svn"]),
                e["migration_policy"],
                f"{sealed['state_bytes']:,} B state, {sealed['key_policy']} key",
                e["status"],
            )  # fmt: skip
        console.print(enc)
