"""Charts of bench results: fan-out time against N, and throughput bars (matplotlib, Agg)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.harness import Row, log


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_fanout(rows: Sequence[Row], path: Path, prefix: str = "fanout-") -> Path | None:
    """Median wall time against N per tool, one panel per fan-out workload, log y axis."""
    series: dict[str, dict[str, list[Row]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r.workload.startswith(prefix) and r.median_s is not None:
            series[r.workload][r.tool].append(r)
    if not series:
        return None
    try:
        plt = _pyplot()
        from matplotlib import ticker
    except ImportError:
        log("matplotlib not installed: no fan-out plot")
        return None
    workloads = list(series)  # in the order they ran
    tools = sorted({tool for per_tool in series.values() for tool in per_tool})
    colour = {tool: f"C{i}" for i, tool in enumerate(tools)}
    fig, axes = plt.subplots(1, len(workloads), figsize=(6 * len(workloads), 4.5), squeeze=False)
    for ax, workload in zip(axes[0], workloads, strict=True):
        for tool, points in sorted(series[workload].items()):
            points.sort(key=lambda r: r.n)
            ns = [r.n for r in points]
            med = [r.median_s or 0.0 for r in points]
            low = [(r.median_s or 0.0) - (r.min_s or 0.0) for r in points]
            high = [(r.max_s or 0.0) - (r.median_s or 0.0) for r in points]
            ax.errorbar(
                ns, med, yerr=[low, high], marker="o", capsize=3, label=tool, color=colour[tool]
            )
        ax.set_xscale("log")
        ax.set_yscale("log")
        all_ns = sorted({r.n for points in series[workload].values() for r in points})
        ax.set_xticks(all_ns, [str(n) for n in all_ns])
        ax.yaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(ticker.NullFormatter())
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())
        ax.set_xlabel("hosts (N)")
        ax.set_ylabel("median wall time, s (bars: min–max)")
        ax.set_title(workload)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_throughput(rows: Sequence[Row], path: Path, prefix: str = "throughput") -> Path | None:
    """A bar per tool: MiB/s of the output-throughput workload."""
    bars = [r for r in rows if r.workload.startswith(prefix) and r.mib_per_s is not None]
    if not bars:
        return None
    try:
        plt = _pyplot()
    except ImportError:
        log("matplotlib not installed: no throughput plot")
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    labels = [r.tool for r in bars]
    values = [r.mib_per_s or 0.0 for r in bars]
    drawn = ax.bar(labels, values, color=["C0", "C1", "C2", "C3", "C4"][: len(bars)])
    ax.bar_label(drawn, fmt="%.0f")
    ax.set_ylabel("MiB/s (median run)")
    ax.set_title(f"{bars[0].workload}: stdout of one host")
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_all(rows: Sequence[Row], out_dir: Path) -> list[Path]:
    """Both charts into out_dir; returns the files written."""
    made = [
        plot_fanout(rows, out_dir / "fanout.png"),
        plot_throughput(rows, out_dir / "throughput.png"),
    ]
    return [p for p in made if p is not None]
