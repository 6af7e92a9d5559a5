"""The report's plot: measured held-out loss vs predicted throughput, one panel per layout.

The question it answers is "which capacity and mode gives the best model per GPU-hour": lower is
a better model, further right is more tokens per GPU-hour. Each mode is a filled marker at the
throughput predicted with the small CPU models' routing and a hollow one with a balanced router,
joined by a line (the model's uncertainty from router balance alone).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

MARKERS = "osD^vP*X"


def panels(data: dict[str, Any]) -> list[str]:
    """Layouts with at least one measured loss, in report order."""
    names = [layout["name"] for layout in data["layouts"]]
    with_loss = {r["layout"] for r in data["predictions"] if r["loss"] is not None}
    return [name for name in names if name in with_loss]


def _by_mode(data: dict[str, Any], layout: str) -> dict[str, dict[str, dict[str, Any]]]:
    modes: dict[str, dict[str, dict[str, Any]]] = {}
    for row in data["predictions"]:
        if row["layout"] == layout and row["loss"] is not None:
            modes.setdefault(row["mode"], {})[row["scenario"]] = row
    return modes


def loss_vs_throughput(data: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = panels(data)
    if not names:
        return
    cols = 2 if len(names) > 1 else 1
    rows = (len(names) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(6.4 * cols, 4.6 * rows), squeeze=False)
    mode_names = list(
        dict.fromkeys(r["mode"] for r in data["predictions"] if r["loss"] is not None)
    )
    style = {m: (f"C{i}", MARKERS[i % len(MARKERS)]) for i, m in enumerate(mode_names)}
    for ax, name in zip(axes.flat, names, strict=False):
        for mode, scenarios in _by_mode(data, name).items():
            color, marker = style[mode]
            measured, balanced = scenarios["measured"], scenarios.get("balanced")
            x = [measured["tokens_per_s"] / 1e3]
            if balanced:
                x.append(balanced["tokens_per_s"] / 1e3)
                ax.plot(x, [measured["loss"]] * 2, color=color, linewidth=1, alpha=0.6)
                ax.plot(x[1], balanced["loss"], marker=marker, color=color, markerfacecolor="none",
                        linestyle="none", markersize=8)  # fmt: skip
            ax.errorbar(x[0], measured["loss"], yerr=measured["loss_std"], marker=marker,
                        color=color, linestyle="none", markersize=8, capsize=3,
                        label=mode)  # fmt: skip
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("predicted tokens/s per GPU (thousands)")
        ax.set_ylabel("held-out loss (small CPU model)")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=9,
               frameon=False)  # fmt: skip
    fig.suptitle(
        "Measured loss (quality.md, 8-expert CPU model: ranks modes only) vs predicted throughput"
        "\nfilled: routing rates of the CPU models; hollow: a balanced router; "
        "lower right is better",
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0.08, 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)
