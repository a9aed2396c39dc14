"""The round-by-round picture of ``migsgx bench live --plot``: pages per round, per run."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from ...errors import ConfigError


def draw(result: dict[str, Any], path: Path) -> None:
    """One line per live run: pages sent in each round, the final transfer last."""

    try:
        # Imported by name: matplotlib is optional, and only --plot needs it.
        importlib.import_module("matplotlib").use("Agg")
        plt = importlib.import_module("matplotlib.pyplot")
    except ImportError as exc:
        raise ConfigError("--plot needs matplotlib (not installed)") from exc

    fig, (rounds_ax, downtime_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for i, run in enumerate(result["live"]["runs"]):
        pages = [r["pages"] for r in run["per_round"]] + [run.get("final_pages") or 0]
        rounds_ax.plot(range(len(pages)), pages, marker="o", label=f"run {i + 1}")
    rounds_ax.set_yscale("symlog")
    rounds_ax.set_xlabel("round (last point: the final transfer, enclave frozen)")
    rounds_ax.set_ylabel("pages sent")
    rounds_ax.legend()
    modes = ["stop_and_copy", "live"]
    values = [[r["downtime_seconds"] for r in result[m]["runs"]] for m in modes]
    downtime_ax.boxplot(values, labels=["stop-and-copy", "live"])
    downtime_ax.set_ylabel("downtime (s)")
    size_mib = result["enclave_bytes"] >> 20
    rate_mib = result["dirty_rate_bytes_per_s"] / (1 << 20)
    fig.suptitle(f"{size_mib} MiB enclave, {rate_mib:.0f} MiB/s written")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
