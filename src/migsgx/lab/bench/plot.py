"""``--plot FILE.png``: a benchmark's timelines as one bar per process and phase.

Each panel is one migration (the median run of a mode); each row a process;
each bar a phase from its start to its end, seconds from the first event.  The
overlap of the pipeline, and where a process waits, show at a glance: a row
with a gap is a process that waited for another.  CPU seconds per process are
written at the row's end, so a long bar with little CPU is waiting, not work.

matplotlib is imported only here and only when a plot is asked for.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["Panel", "median_panels", "plot_timelines"]

Panel = tuple[str, Mapping[str, Mapping[str, Sequence[float]]], Mapping[str, float]]
"""``(title, {process: {phase: [start, end]}}, {process: cpu_seconds})``."""


def median_panels(result: Mapping[str, Any], modes: Sequence[tuple[str, str]]) -> list[Panel]:
    """One panel a mode ``(key, label)``: the run of ``result["runs"]`` with the median
    total time in that mode (a run of each mode is one migration, timed whole)."""

    runs: list[dict[str, Any]] = result["runs"]
    panels: list[Panel] = []
    for key, label in modes:
        r = sorted(runs, key=lambda x: float(x[key]["total_seconds"]))[len(runs) // 2][key]
        title = (f"{label}, enclave {result['enclave_size'] >> 20} MiB: total "
                 f"{r['total_seconds']:.2f} s, downtime {r['downtime_seconds']:.2f} s "
                 "(median run)")  # fmt: skip
        panels.append((title, r["timeline"], r["cpu_by_process"]))
    return panels


def plot_timelines(panels: Sequence[Panel], path: Path | str) -> None:
    """Draw ``panels`` stacked, one under another, into the PNG ``path``."""

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.artist import Artist

    rows = [max(1, len(timeline)) for _, timeline, _ in panels]
    fig, axes = plt.subplots(
        len(panels),
        1,
        figsize=(11, 1.2 + 0.55 * sum(rows) + 0.6 * len(panels)),
        gridspec_kw={"height_ratios": rows},
        squeeze=False,
    )
    phases = sorted({p for _, tl, _ in panels for spans in tl.values() for p in spans})
    cmap = plt.get_cmap("tab20")
    colour = {p: cmap(i % 20) for i, p in enumerate(phases)}
    end = max(
        (s[1] for _, tl, _ in panels for spans in tl.values() for s in spans.values()),
        default=1.0,
    )
    for ax, (title, timeline, cpu) in zip(axes[:, 0], panels, strict=True):
        names = list(timeline)
        for y, proc in enumerate(names):
            for phase, (a, b) in timeline[proc].items():
                ax.barh(y, b - a, left=a, height=0.6, color=colour[phase], edgecolor="black",
                        linewidth=0.3, label=phase)  # fmt: skip
            if proc in cpu:
                last = max((s[1] for s in timeline[proc].values()), default=0.0)
                ax.text(last + end * 0.01, y, f"cpu {cpu[proc]:.2f} s", va="center", fontsize=7)
        ax.set_yticks(range(len(names)), names, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlim(0, end * 1.15)
        ax.set_title(title, fontsize=9, loc="left")
        ax.grid(axis="x", linewidth=0.3)
    axes[-1, 0].set_xlabel("seconds")
    handles: dict[str, Artist] = {}
    for ax in axes[:, 0]:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, handle)
    fig.legend(list(handles.values()), list(handles), loc="upper center", fontsize=7, ncols=8)
    fig.tight_layout(rect=(0, 0, 1, 0.9))
    fig.savefig(path, dpi=110)
    plt.close(fig)
