"""PNG plots of the perf results: cost ratio per swept axis, all-to-all bytes per mode."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.perf.tables import MODE_NAMES, axis_rows

LAYER_TARGET = 1.15  # rectified / vanilla MoE layer cost on CPU (issue target)

AXES = ("hidden", "experts", "topk", "capacity_factor", "ep")
PART_COLORS = {"router": "C0", "layer": "C1", "iteration": "C2"}
AXIS_LABELS = {
    "hidden": "hidden size",
    "experts": "experts",
    "topk": "top-k",
    "capacity_factor": "capacity factor",
    "ep": "expert-parallel size",
}


def _plot_axis(ax: Any, results: dict[str, dict[str, Any]], axis: str) -> bool:
    xs: set[Any] = set()
    for part in ("router", "layer", "iteration"):
        if part not in results or axis not in results[part]["sweep"]["axes"]:
            continue
        rows = axis_rows(results[part], axis)
        if len(rows) < 2:
            continue
        x = [r[axis] for r in rows]
        y = [r["ratio"] for r in rows]
        # the ratio of medians may lie outside q1-q3 of the per-repeat ratios: clamp the bars
        err = [
            [max(0.0, r["ratio"] - r["ratio_q1"]) for r in rows],
            [max(0.0, r["ratio_q3"] - r["ratio"]) for r in rows],
        ]
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=part, color=PART_COLORS[part])
        xs.update(x)
    if xs:
        _style_axis(ax, axis, sorted(xs))
    return bool(xs)


def _style_axis(ax: Any, axis: str, xs: list[Any]) -> None:
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.axhline(
        LAYER_TARGET,
        color="red",
        linestyle="--",
        linewidth=0.8,
        label=f"layer target {LAYER_TARGET}",
    )
    ax.set_xlabel(AXIS_LABELS[axis])
    ax.set_ylabel("rectified / vanilla time")
    if axis in ("hidden", "experts", "ep"):
        ax.set_xscale("log", base=2)
    if axis != "capacity_factor":  # integer settings: label exactly the measured ones
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.minorticks_off()
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)


def plot_ratio_vs_hidden(results: dict[str, dict[str, Any]], out_dir: Path) -> Path | None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    drawn = _plot_axis(ax, results, "hidden")
    path = out_dir / "perf_ratio_vs_hidden.png"
    if drawn:
        ax.set_title("Cost ratio vs hidden size (median, q1-q3)")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    plt.close(fig)
    return path if drawn else None


def plot_ratio_by_axis(results: dict[str, dict[str, Any]], out_dir: Path) -> Path | None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    drawn = [_plot_axis(ax, results, axis) for ax, axis in zip(axes.flat, AXES[1:], strict=True)]
    path = out_dir / "perf_ratio_by_axis.png"
    if any(drawn):
        fig.suptitle("Cost ratio rectified / vanilla per swept axis (median, q1-q3)")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    plt.close(fig)
    return path if any(drawn) else None


def plot_bytes(results: dict[str, dict[str, Any]], out_dir: Path) -> Path | None:
    import matplotlib.pyplot as plt

    if "bytes" not in results:
        return None
    modes = results["bytes"]["rows"]["iteration"]["modes"]
    vanilla = modes["none"]["payload_bytes"]
    names = [MODE_NAMES[m].replace(" (baseline)", "\n(baseline)") for m in modes]
    values = [modes[m]["payload_bytes"] / vanilla for m in modes]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    bars = ax.bar(names, values, color=["grey", "C0", "C1", "C2", "C3"][: len(values)])
    ax.bar_label(bars, fmt="%.3f")
    ax.set_ylim(0, 1.15 * max(values))
    ax.set_ylabel("bytes / vanilla bytes")
    ax.set_title("EP all-to-all bytes to other ranks per training iteration")
    ax.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    path = out_dir / "perf_bytes.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
