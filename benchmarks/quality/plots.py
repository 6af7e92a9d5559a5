"""The report's PNG plots: training-loss curves per variant and held-out loss vs capacity."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.quality.logparse import AS_TRAINED
from benchmarks.quality.stats import VANILLA_MODES, GroupKey, loss_stat


def _mean_curve(runs: list[dict[str, Any]], skip_before: int) -> tuple[list[int], list[float]]:
    """Train lm loss per logged iteration, averaged over the seeds that logged it."""
    by_iteration: dict[int, list[float]] = {}
    for run in runs:
        for entry in run["curve"]:
            if entry["iteration"] >= skip_before:
                by_iteration.setdefault(entry["iteration"], []).append(entry["lm_loss"])
    iterations = sorted(by_iteration)
    return iterations, [statistics.fmean(by_iteration[i]) for i in iterations]


def plot_loss_curves(groups: dict[GroupKey, list], recipe: str, path: Path) -> Path | None:
    """One panel per top-k: training loss of each variant at capacity 1.0 (mean over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        topk
        for topk in (1, 2)
        if any(GroupKey(topk, m, 1.0, 0.01, recipe, False) in groups for m in VANILLA_MODES)
    ]
    if not panels:
        return None
    figure, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.2), squeeze=False)
    for axis, topk in zip(axes[0], panels, strict=True):
        keys = [GroupKey(topk, mode, 1.0, 0.01, recipe, False) for mode in VANILLA_MODES]
        if topk == 1:
            keys.insert(1, GroupKey(1, "none", 1.0, 0.01, recipe, False, True))
        for key in keys:
            runs = groups.get(key)
            if runs:
                last = max(entry["iteration"] for entry in runs[0]["curve"])
                x, y = _mean_curve(runs, skip_before=max(2, last // 10))
                style = "--" if key.unit_gate else "-"
                (line,) = axis.plot(x, y, style, label=f"{runs[0]['variant']} ({len(runs)} seeds)")
                for run in runs:  # each seed, faint: the mean hides runs that escape a plateau
                    xs, ys = _mean_curve([run], skip_before=max(2, last // 10))
                    axis.plot(xs, ys, style, color=line.get_color(), alpha=0.25, linewidth=0.8)
        axis.set_title(f"Top-{topk}, capacity 1.0: training loss (mean; faint: each seed)")
        axis.set_xlabel("iteration")
        axis.set_ylabel("train lm loss (nats/token)")
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def plot_capacity(
    groups: dict[GroupKey, list], recipe: str, capacities: Sequence[float | None], path: Path
) -> Path | None:
    """Held-out loss vs capacity factor: Top-1, +IR, +FR, +FR+IR trained, FR+IR at evaluation
    only, dropless as a horizontal band (error bars: std over seeds). None (no file) unless
    some series has at least two capacity factors: a single x value is a table row, not a
    curve (the upcycle study runs capacity 1.0 only; its grid table has those numbers)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finite = sorted(c for c in capacities if c is not None)
    series = [("Top-1", "none", AS_TRAINED), ("Top-1+IR", "ir", AS_TRAINED)]
    series += [
        ("Top-1+FR", "fr", AS_TRAINED),
        ("Top-1+FR+IR", "ir+fr", AS_TRAINED),
        ("Top-1 trained vanilla, FR+IR at eval", "none", "ir+fr"),
    ]
    curves = []
    for label, mode, eval_mode in series:
        points = [
            (c, loss_stat(groups.get(GroupKey(1, mode, c, 0.01, recipe, False), []), eval_mode))
            for c in finite
        ]
        points = [(c, stat) for c, stat in points if stat is not None]
        if points:
            curves.append((label, eval_mode, points))
    if not any(len(points) >= 2 for _, _, points in curves):
        return None
    figure, axis = plt.subplots(figsize=(7.5, 4.8))
    for label, eval_mode, points in curves:
        style = ":" if eval_mode != AS_TRAINED else "-"
        axis.errorbar(
            [c for c, _ in points],
            [s.mean for _, s in points],
            yerr=[s.std for _, s in points],
            linestyle=style,
            marker="o",
            capsize=3,
            label=label,
        )
    dropless = loss_stat(groups.get(GroupKey(1, "none", None, 0.01, recipe, False), []))
    if dropless is not None:
        axis.axhline(dropless.mean, color="grey", linestyle="--", label="Top-1 dropless")
        axis.axhspan(
            dropless.mean - dropless.std, dropless.mean + dropless.std, color="grey", alpha=0.15
        )
    axis.set_xlabel("expert capacity factor")
    axis.set_ylabel("held-out loss (nats/token)")
    axis.set_title("Held-out loss vs capacity factor (mean ± std over seeds)")
    axis.set_xticks(finite)
    axis.grid(alpha=0.3)
    # outside the axes: inside, it covers points whichever corner it picks
    axis.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)
    return path
