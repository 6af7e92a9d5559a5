"""Aggregate run records into ``docs/results/quality.md`` and its PNG plots.

Every number in the report is computed here from the runs' ``result.json`` records, so the
report can be regenerated from a run directory at any time (``--report-only``). Conventions:

* held-out loss: mean of megatron's final validation and test losses (see ``logparse``);
  perplexity: ``exp`` of the mean held-out loss;
* spread over seeds: sample standard deviation (``n - 1``), with the min-max range beside it;
* Delta: the paired difference to the reference variant *with the same seed* (same data order,
  same initialisation of the shared parameters, same held-out batches), mean +- std over seeds;
* routing rates: this rank's tokens (rank 0), mean over MoE layers; training rates cover every
  training iteration, evaluation rates every held-out pass.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from benchmarks.quality.logparse import AS_TRAINED
from benchmarks.quality.plan import UPCYCLE_DENSE_SEED

VANILLA_MODES = ("none", "ir", "fr", "ir+fr")
MODE_NAMES = {"none": "vanilla", "ir": "+IR", "fr": "+FR", "ir+fr": "+FR+IR"}


@dataclasses.dataclass(frozen=True)
class Stat:
    """Mean, sample std, range and count of one quantity over seeds."""

    mean: float
    std: float
    low: float
    high: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Stat | None:
        values = [v for v in values if v is not None and not math.isnan(v)]
        if not values:
            return None
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        return cls(statistics.fmean(values), std, min(values), max(values), len(values))

    def text(self, digits: int = 4, spread: bool = True) -> str:
        """``2.4399 ± 0.0312 (2.41–2.47)``; the range only when there are several seeds."""
        out = f"{self.mean:.{digits}f}"
        if self.n > 1 and spread:
            out += (
                f" ± {self.std:.{digits}f} ({self.low:.{digits - 1}f}–{self.high:.{digits - 1}f})"
            )
        return out

    def delta_text(self, digits: int = 4) -> str:
        """``-0.1234 ± 0.0100`` for paired differences."""
        text = f"{self.mean:+.{digits}f}"
        return text + (f" ± {self.std:.{digits}f}" if self.n > 1 else "")


@dataclasses.dataclass(frozen=True)
class GroupKey:
    """A run configuration without its seed."""

    topk: int
    rectify: str
    capacity: float | None
    aux_loss: float
    recipe: str
    dense: bool
    unit_gate: bool = False

    @classmethod
    def of(cls, record: dict[str, Any]) -> GroupKey:
        spec = record["spec"]
        return cls(
            spec["topk"],
            spec["rectify"],
            spec["capacity"],
            spec["aux_loss"],
            spec["recipe"],
            spec["dense"],
            spec.get("unit_gate", False),
        )


def group_runs(records: Iterable[dict[str, Any]]) -> dict[GroupKey, list[dict[str, Any]]]:
    groups: dict[GroupKey, list[dict[str, Any]]] = {}
    for record in records:
        groups.setdefault(GroupKey.of(record), []).append(record)
    for runs in groups.values():
        runs.sort(key=lambda record: record["spec"]["seed"])
    return groups


def heldout(record: dict[str, Any], mode: str = AS_TRAINED) -> float | None:
    return record["heldout"].get(mode, {}).get("loss")


def loss_stat(runs: list[dict[str, Any]], mode: str = AS_TRAINED) -> Stat | None:
    return Stat.of([heldout(run, mode) for run in runs])


def paired_delta(
    runs: list[dict[str, Any]],
    reference: list[dict[str, Any]],
    mode: str = AS_TRAINED,
    reference_mode: str = AS_TRAINED,
) -> Stat | None:
    """``loss(run) - loss(reference)`` for every seed both have."""
    by_seed = {run["spec"]["seed"]: heldout(run, reference_mode) for run in reference}
    deltas = [
        heldout(run, mode) - by_seed[run["spec"]["seed"]]
        for run in runs
        if by_seed.get(run["spec"]["seed"]) is not None and heldout(run, mode) is not None
    ]
    return Stat.of(deltas)


def rate_stat(runs: list[dict[str, Any]], name: str, source: str = "train") -> Stat | None:
    """A routing rate (mean over layers) over seeds; ``source`` train or eval (as trained)."""
    values = []
    for run in runs:
        if source == "train":
            summary = run.get("train_routing") or {}
        else:
            summary = (run.get("eval_routing") or {}).get(AS_TRAINED, {})
        values.append(summary.get("mean", {}).get(name))
    return Stat.of(values)


def target_check(groups: dict[GroupKey, list[dict[str, Any]]], recipe: str) -> dict[str, Any]:
    """The acceptance test: at capacity 1.0 Top-1+FR+IR's held-out loss is below vanilla
    Top-1's by more than twice the seed spread (the larger of the two stds).

    ``check["control"]`` applies the same test against the gate-scaling control
    ``Top-1 (gate 1)`` when it was run: the part of the gain that is rectification, not the
    rectified router's gate weight (``available`` False otherwise).
    """
    rectified = groups.get(GroupKey(1, "ir+fr", 1.0, 0.01, recipe, False), [])
    vanilla = groups.get(GroupKey(1, "none", 1.0, 0.01, recipe, False), [])
    control = groups.get(GroupKey(1, "none", 1.0, 0.01, recipe, False, unit_gate=True), [])
    check = _gap_check(vanilla, rectified)
    if check["available"]:
        check["control"] = _gap_check(control, rectified)
    return check


def _gap_check(reference: list[dict[str, Any]], runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Is ``runs``' mean held-out loss below ``reference``'s by more than twice the spread?"""
    a, b = loss_stat(reference), loss_stat(runs)
    if a is None or b is None:
        return {"available": False}
    gap = a.mean - b.mean
    spread = max(a.std, b.std)
    return {
        "available": True,
        "vanilla": a,
        "rectified": b,
        "gap": gap,
        "spread": spread,
        "paired": paired_delta(runs, reference),
        "holds": a.n > 1 and b.n > 1 and gap > 2 * spread,
    }


# ---- markdown -----------------------------------------------------------------------------------


def _cell(
    runs: list[dict[str, Any]] | None,
    reference: list[dict[str, Any]] | None = None,
    mode: str = AS_TRAINED,
    reference_mode: str = AS_TRAINED,
) -> str:
    """``mean ± std (Δ paired)`` or an em dash when the runs are missing."""
    stat = loss_stat(runs or [], mode)
    if stat is None:
        return "—"
    text = stat.text(spread=False) + (f" ± {stat.std:.4f}" if stat.n > 1 else "")
    if reference and (reference is not runs or mode != reference_mode):
        delta = paired_delta(runs, reference, mode, reference_mode)
        if delta is not None:
            text += f" (Δ {delta.mean:+.4f})"
    return text


def _rate(runs: list[dict[str, Any]], name: str, source: str = "train") -> str:
    stat = rate_stat(runs, name, source)
    return "—" if stat is None else f"{stat.mean:.1f}"


def _table(header: Sequence[str], rows: Iterable[Sequence[str]], align: str = "") -> list[str]:
    rows = list(rows)
    if not rows:
        return ["(not run in this invocation)"]
    align = align or "l" + "r" * (len(header) - 1)
    rule = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(rule) + " |"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def grid_table(groups: dict[GroupKey, list], recipe: str, aux: float = 0.01) -> list[str]:
    """Top-1/Top-2 x {vanilla, +IR, +FR, +FR+IR} at capacity 1.0, plus the Top-1 gate-1
    control; Δ against megatron's vanilla and (Top-1) against the control."""
    control = groups.get(GroupKey(1, "none", 1.0, aux, recipe, False, True))
    rows = []
    for topk in (1, 2):
        reference = groups.get(GroupKey(topk, "none", 1.0, aux, recipe, False))
        keys = [GroupKey(topk, mode, 1.0, aux, recipe, False) for mode in VANILLA_MODES]
        if topk == 1:
            keys.insert(1, GroupKey(1, "none", 1.0, aux, recipe, False, True))
        for key in keys:
            runs = groups.get(key)
            if not runs:
                continue
            stat = loss_stat(runs)
            is_reference = key.rectify == "none" and not key.unit_gate
            delta = None if is_reference or not reference else paired_delta(runs, reference)
            versus_control = None
            if topk == 1 and control and key.rectify != "none":
                versus_control = paired_delta(runs, control)
            rows.append(
                [
                    runs[0]["variant"],
                    str(stat.n),
                    stat.text(),
                    f"{math.exp(stat.mean):.3f}",
                    "—" if delta is None else delta.delta_text(),
                    "—" if versus_control is None else versus_control.delta_text(),
                    *(_rate(runs, name) for name in ("dropped_pct", "padded_pct")),
                    *(_rate(runs, name) for name in ("filled_in_pct", "rectified_pct")),
                    _rate(runs, "lost_pct", "eval"),
                ]
            )
    header = [
        "variant",
        "seeds",
        "held-out loss: mean ± std (min–max)",
        "PPL",
        "Δ vs vanilla Top-k (paired)",
        "Δ vs Top-1 (gate 1)",
        "dropped %",
        "padded %",
        "filled-in %",
        "rectified %",
        "held-out lost %",
    ]
    return _table(header, rows)


def capacity_table(
    groups: dict[GroupKey, list], recipe: str, capacities: Sequence[float | None]
) -> list[str]:
    """Top-1, +IR, +FR (trained) and vanilla with FR+IR at evaluation only, per capacity."""
    rows = []
    for capacity in capacities:
        vanilla = groups.get(GroupKey(1, "none", capacity, 0.01, recipe, False))
        if not vanilla:
            continue
        cells = [
            _cell(groups.get(GroupKey(1, mode, capacity, 0.01, recipe, False)), vanilla)
            for mode in ("none", "ir", "fr")
        ]
        inference = _cell(vanilla, vanilla, "ir+fr") if capacity is not None else "—"
        label = "dropless" if capacity is None else f"{capacity:g}"
        rows.append(
            [label, *cells, inference, _rate(vanilla, "dropped_pct"), _rate(vanilla, "padded_pct")]
        )
    header = [
        "capacity factor",
        "Top-1",
        "Top-1+IR",
        "Top-1+FR",
        "Top-1, FR+IR at eval only",
        "Top-1 dropped %",
        "Top-1 padded %",
    ]
    return _table(header, rows)


def inference_table(groups: dict[GroupKey, list], recipe: str) -> list[str]:
    """Vanilla-trained models evaluated with rectification switched on (paired per seed)."""
    rows = []
    for key, runs in sorted(groups.items(), key=lambda item: _order(item[0])):
        if key.recipe != recipe or key.rectify != "none" or key.capacity is None:
            continue
        if not any(mode in runs[0]["heldout"] for mode in ("ir", "fr", "ir+fr")):
            continue
        trained = groups.get(dataclasses.replace(key, rectify="ir+fr", unit_gate=False))
        gate = " (gate 1)" if key.unit_gate else ""
        rows.append(
            [
                f"Top-{key.topk}{gate}, cf {key.capacity:g}, {'LB' if key.aux_loss else 'no LB'}",
                _cell(runs),
                *(_cell(runs, runs, mode) for mode in ("ir", "fr", "ir+fr")),
                _cell(trained, runs) if trained else "—",
            ]
        )
    header = [
        "trained vanilla",
        "eval vanilla",
        "eval +IR",
        "eval +FR",
        "eval +FR+IR",
        "trained +FR+IR (for comparison)",
    ]
    return _table(header, rows)


def lb_table(groups: dict[GroupKey, list], recipe: str) -> list[str]:
    rows = []
    for mode in VANILLA_MODES:
        with_lb = groups.get(GroupKey(1, mode, 1.0, 0.01, recipe, False))
        without = groups.get(GroupKey(1, mode, 1.0, 0.0, recipe, False))
        if not without:
            continue
        reference = groups.get(GroupKey(1, "none", 1.0, 0.0, recipe, False))
        rows.append(
            [
                f"Top-1{'' if mode == 'none' else MODE_NAMES[mode]}",
                _cell(with_lb, groups.get(GroupKey(1, "none", 1.0, 0.01, recipe, False))),
                _cell(without, reference),
                _rate(without, "dropped_pct"),
                _rate(without, "padded_pct"),
            ]
        )
    header = [
        "variant (cf 1.0)",
        "with LB loss (0.01)",
        "without LB loss",
        "dropped % (no LB)",
        "padded % (no LB)",
    ]
    return _table(header, rows)


def runs_table(records: Sequence[dict[str, Any]]) -> list[str]:
    rows = [
        [
            record["variant"],
            "dropless" if record["spec"]["capacity"] is None else f"{record['spec']['capacity']:g}",
            "yes" if record["spec"]["aux_loss"] else "no",
            str(record["spec"]["seed"]),
            f"{heldout(record):.4f}",
            f"{record['wall_s']:.0f}",
            "—" if record.get("ms_per_iter") is None else f"{record['ms_per_iter']:.0f}",
            f"`{Path(record.get('run_dir', '')).name}`",
        ]
        for record in sorted(records, key=lambda r: (_order(GroupKey.of(r)), r["spec"]["seed"]))
    ]
    header = ["variant", "cf", "LB", "seed", "held-out loss", "wall s", "ms/iter", "run directory"]
    return _table(header, rows, align="lllrrrrl")


def _order(key: GroupKey) -> tuple:
    return (
        key.dense,
        key.aux_loss == 0,
        key.topk,
        math.inf if key.capacity is None else key.capacity,
        VANILLA_MODES.index(key.rectify),
        key.unit_gate,
    )


# ---- plots --------------------------------------------------------------------------------------


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
    """Held-out loss vs capacity factor: Top-1, +IR, +FR trained, FR+IR at evaluation only,
    dropless as a horizontal band (error bars: std over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finite = sorted(c for c in capacities if c is not None)
    series = [("Top-1", "none", AS_TRAINED), ("Top-1+IR", "ir", AS_TRAINED)]
    series += [
        ("Top-1+FR", "fr", AS_TRAINED),
        ("Top-1 trained vanilla, FR+IR at eval", "none", "ir+fr"),
    ]
    figure, axis = plt.subplots(figsize=(7, 4.5))
    drawn = False
    for label, mode, eval_mode in series:
        points = [
            (c, loss_stat(groups.get(GroupKey(1, mode, c, 0.01, recipe, False), []), eval_mode))
            for c in finite
        ]
        points = [(c, stat) for c, stat in points if stat is not None]
        if not points:
            continue
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
        drawn = True
    dropless = loss_stat(groups.get(GroupKey(1, "none", None, 0.01, recipe, False), []))
    if dropless is not None:
        axis.axhline(dropless.mean, color="grey", linestyle="--", label="Top-1 dropless")
        axis.axhspan(
            dropless.mean - dropless.std, dropless.mean + dropless.std, color="grey", alpha=0.15
        )
        drawn = True
    if not drawn:
        plt.close(figure)
        return None
    axis.set_xlabel("expert capacity factor")
    axis.set_ylabel("held-out loss (nats/token)")
    axis.set_title("Held-out loss vs capacity factor (mean ± std over seeds)")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


# ---- the document -------------------------------------------------------------------------------


def write_report(
    records: Sequence[dict[str, Any]],
    report_dir: Path,
    meta: dict[str, Any],
    capacities: Sequence[float | None],
    recipe: str = "scratch",
) -> Path:
    """Write ``quality.md`` (``quality_upcycle.md`` for the upcycle recipe, so both reports can
    live side by side) and its PNGs into ``report_dir``; return the markdown path."""
    report_dir.mkdir(parents=True, exist_ok=True)
    stem = "quality" if recipe == "scratch" else f"quality_{recipe}"
    groups = group_runs(records)
    curves = plot_loss_curves(groups, recipe, report_dir / f"{stem}_loss_curves.png")
    capacity_plot = plot_capacity(groups, recipe, capacities, report_dir / f"{stem}_capacity.png")
    title = "" if recipe == "scratch" else " (upcycled from a dense model)"
    lines = [
        f"# Quality reproduction: Rectify-Router vs vanilla top-k routing{title}",
        "",
        "<!-- Generated by benchmarks/quality (make bench-quality); do not edit by hand: rerun "
        "it. -->",
        "",
        "Generated by `benchmarks/quality`; the comparison with the paper, and what the numbers "
        "mean, is hand-written in [quality_discussion.md](quality_discussion.md).",
        "",
        *_meta_lines(meta),
        "",
        "## Acceptance target",
        "",
        *_target_lines(target_check(groups, recipe)),
        "",
        "## 1. The paper's grid at capacity factor 1.0",
        "",
        *grid_table(groups, recipe),
        "",
    ]
    if curves:
        lines += [f"![training loss per variant]({curves.name})", ""]
    lines += ["## 2. Capacity sweep (Top-1)", "", *capacity_table(groups, recipe, capacities), ""]
    if capacity_plot:
        lines += [f"![held-out loss vs capacity factor]({capacity_plot.name})", ""]
    lines += [
        "## 3. Inference-only rectification",
        "",
        "Models trained with vanilla routing, evaluated on the same held-out batches with "
        "rectification switched on for evaluation only (Δ: paired against the same model "
        "evaluated vanilla).",
        "",
        *inference_table(groups, recipe),
        "",
        "## 4. With and without the load-balancing loss",
        "",
        "Δ: paired against vanilla Top-1 with the same load-balancing setting.",
        "",
        *lb_table(groups, recipe),
        "",
        "## How the numbers are made",
        "",
        *_definitions(),
        "",
        *_example_command(records),
        "## Every run",
        "",
        *runs_table(records),
        "",
    ]
    path = report_dir / f"{stem}.md"
    path.write_text("\n".join(lines))
    return path


def _meta_lines(meta: dict[str, Any]) -> list[str]:
    settings = meta["settings"]
    tokens = 2 * settings["eval_iters"] * settings["global_batch_size"] * settings["seq_length"]
    lines = [
        f"- Report written {meta['date']}; machine: {meta['machine']}",
        f"- Software: {meta['software']}",
        f"- Command: `{meta['command']}`",
        f"- Runs: {meta['num_runs']} ({meta['num_trained']} trained by this invocation, the rest "
        f"reused from the cache); seeds {', '.join(map(str, meta['seeds']))}",
        f"- Runs trained {meta['span'][0]} – {meta['span'][1]} UTC: {meta['span'][2] / 60:.1f} min "
        f"from the first run's start to the last run's finish ({meta['sum_run_s'] / 60:.1f} min "
        f"summed over runs); this invocation: {meta['invocation_s'] / 60:.1f} min",
        f"- Model: {settings['num_layers']} layers, hidden {settings['hidden_size']}, "
        f"{settings['num_attention_heads']} heads, sequence {settings['seq_length']}, "
        f"{settings['num_experts']} experts, EP = {settings['expert_parallel']} on "
        f"{settings['nproc']} {'GPUs (bf16)' if settings['gpus'] else 'CPU processes (gloo)'}; "
        f"block flags `{' '.join(settings.get('architecture_args') or ()) or 'megatron defaults'}`",
        f"- Training: {settings['train_iters']} iterations x {settings['global_batch_size']} "
        f"sequences, lr {settings['lr']:g} cosine to {settings['min_lr']:g}, recipe "
        f"{meta['recipe']}"
        + (
            f" (one dense model, {settings['dense_iters']} iterations, seed "
            f"{UPCYCLE_DENSE_SEED}, is the start of every upcycled run)"
            if meta["recipe"] == "upcycle"
            else ""
        ),
        f"- Held-out set: {tokens:,} tokens per evaluation (validation + test splits, "
        f"{settings['eval_iters']} batches each"
        + (
            f"; the same batches for every seed: `--eval-data-seed {settings['eval_data_seed']}`)"
            if settings.get("eval_data_seed") is not None
            else ")"
        ),
        f"- Data: {meta['data']}",
    ]
    if settings["extra_args"]:
        lines.append(f"- Extra megatron flags: `{' '.join(settings['extra_args'])}`")
    if meta.get("failures"):
        lines.append(f"- FAILED runs (missing from the tables): {', '.join(meta['failures'])}")
    return lines


def _target_lines(check: dict[str, Any]) -> list[str]:
    if not check["available"]:
        return ["Top-1 and Top-1+FR+IR at capacity 1.0 were not both run."]
    verdict = "**holds**" if check["holds"] else "**does not hold**"
    lines = [
        f"At capacity factor 1.0, Top-1+FR+IR's held-out loss "
        f"({check['rectified'].text()}) is below vanilla Top-1's ({check['vanilla'].text()}) by "
        f"{check['gap']:.4f}; twice the seed spread (the larger std) is "
        f"{2 * check['spread']:.4f}: the target {verdict}. Paired per seed: "
        f"{check['paired'].delta_text()}.",
    ]
    control = check.get("control", {})
    if control.get("available"):
        verdict = "also holds" if control["holds"] else "does not hold"
        lines += [
            "",
            f"The same test against the gate-scaling control Top-1 (gate 1) "
            f"({control['vanilla'].text()}), i.e. counting only what rectification adds to the "
            f"rectified router's gate weight: gap {control['gap']:.4f}, twice the spread "
            f"{2 * control['spread']:.4f}: it {verdict}. Paired per seed: "
            f"{control['paired'].delta_text()}.",
        ]
    return lines


def _example_command(records: Sequence[dict[str, Any]]) -> list[str]:
    """One run's full command line (every run's is in its ``result.json``)."""
    chosen = [r for r in records if r["variant"] == "Top-1+FR+IR"] or list(records)
    return [
        f"One run's command ({chosen[0]['variant']}, seed {chosen[0]['spec']['seed']}; every "
        "run's is in its `result.json` and `command.txt`; on CPU the benchmark forks the two "
        "ranks with torchrun's environment instead of calling torchrun, same flags):",
        "",
        "```",
        chosen[0]["command"],
        "```",
        "",
    ]


def _definitions() -> list[str]:
    return [
        "- **held-out loss**: mean of megatron's final validation and test LM loss (documents "
        "never trained on; same number of sequences each); **PPL** = exp(mean held-out loss).",
        "- **spread**: sample standard deviation over seeds (n - 1), min–max in brackets. A seed "
        "sets the initialisation and the training data order; all variants of one seed share "
        "both. The held-out batches are the same for every seed (`--eval-data-seed`).",
        "- **Δ (paired)**: loss minus the reference's loss for the same seed, mean ± std.",
        "- **dropped %**: top-k requests that lost their capacity slot; **padded %**: expert "
        "slots left empty (computed for nothing with padding to capacity); **filled-in %**: "
        "slots given to FR; **rectified %**: tokens computed by IR; **lost %**: tokens no "
        "expert computed. Training rates over every training iteration, *held-out* rates over "
        "the evaluation passes; rank 0's tokens, mean over MoE layers. Dropped % counts "
        "requests (k per token), rectified % and lost % count tokens, so for Top-2 rectified % "
        "can be twice dropped %.",
        "- For vanilla routing megatron fills padding slots with zero-weight tokens; they count "
        "as padded here (they do no useful work).",
        "- **Top-1 (gate 1)**: megatron's vanilla Top-1 routing with the Rectify-Router's Top-1 "
        "gate weight `1 + p - sg(p)` (forward 1) instead of megatron's `p`: the control that "
        "separates rectification from the gate scaling every rectified Top-1 router has.",
        "- Variants use `--moe-rectify-ir-trigger ignore_kth` (= `any` without FR).",
    ]
