"""The report's markdown tables, one function per section, from grouped run records."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from benchmarks.quality.logparse import AS_TRAINED
from benchmarks.quality.stats import (
    VANILLA_MODES,
    GroupKey,
    heldout,
    loss_stat,
    paired_delta,
    rate_stat,
)

MODE_NAMES = {"none": "vanilla", "ir": "+IR", "fr": "+FR", "ir+fr": "+FR+IR"}


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
        keys += sorted(  # static IR (--ir-budgets), after the variants it is a budget of
            (
                k
                for k in groups
                if k.ir_capacity is not None
                and k == GroupKey(topk, k.rectify, 1.0, aux, recipe, False, False, k.ir_capacity)
            ),
            key=lambda k: (VANILLA_MODES.index(k.rectify), k.ir_capacity),
        )
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
    """Top-1, +IR, +FR, +FR+IR (trained) and vanilla with FR+IR at evaluation only, per
    capacity."""
    rows = []
    for capacity in capacities:
        vanilla = groups.get(GroupKey(1, "none", capacity, 0.01, recipe, False))
        if not vanilla:
            continue
        cells = [
            _cell(groups.get(GroupKey(1, mode, capacity, 0.01, recipe, False)), vanilla)
            for mode in ("none", "ir", "fr", "ir+fr")
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
        "Top-1+FR+IR",
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
