"""Statistics over the quality runs' records: grouping by configuration, held-out loss and
routing-rate statistics over seeds, paired deltas, and the acceptance test.

Conventions (the report's "How the numbers are made" section states them to the reader):

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
from typing import Any

from benchmarks.quality.logparse import AS_TRAINED

VANILLA_MODES = ("none", "ir", "fr", "ir+fr")


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
    ir_capacity: float | None = None  # static IR's budget (None: dynamic IR)

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
            spec.get("ir_capacity"),
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
