"""Predictions for the report's layouts and modes, under two router-balance scenarios.

Why two scenarios: how unevenly a router spreads tokens decides how much capacity drops, how
much IR computes on the slowest rank, and how slow dropless gets on its hottest rank, and the
only routers this project measured are small ones:

- ``measured``: the quality benchmark's small CPU models (``docs/results/quality.md``: 8 experts,
  150 iterations). Each mode's dropped / rectified % are that mode's own measured training rates;
  the spread over ranks comes from :mod:`.routing_load` with the popularity CV fitted to that
  dropped %. These routers are young and uneven (Top-1 drops 36 % at capacity 1.0): the
  pessimistic end.
- ``balanced``: the CV fitted to the CPU layer benchmark's random router (4.3 % dropped at
  capacity 1.0, ``perf_layer.json``), i.e. little more than sampling noise: the optimistic end.

A trained large model lies somewhere in between; the report shows both.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from benchmarks.at_scale.cluster import Cluster
from benchmarks.at_scale.inputs import QualityResults, SyncCounts, router_ratio
from benchmarks.at_scale.layer_model import LayerShape, Routing, StepTime, step_time
from benchmarks.at_scale.models import Layout, Mode
from benchmarks.at_scale.routing_load import LoadStats, fit_cv, simulate

SCENARIOS = ("measured", "balanced")


def ir_fraction(dropped_frac: float, topk: int) -> float:
    """Tokens IR computes / tokens, when only the requests' dropped fraction is known: a token
    is rectified when at least one of its ``topk`` requests was dropped (``ignore_kth``),
    drops taken as independent. (Top-2+FR+IR in quality.md: 21.0 % dropped -> 37.6 %, measured
    38.5 %.)"""
    return 1.0 - (1.0 - dropped_frac) ** topk


def _topk_of(variant: str) -> int:
    match = re.match(r"Top-(\d+)", variant)
    if not match:
        raise ValueError(f"no top-k in variant name {variant!r}")
    return int(match.group(1))


def _capacity_of(written: str) -> float | None:
    return None if written == "dropless" else float(written)


@dataclass(frozen=True)
class RoutingFacts:
    """What the prediction assumed about one mode's routing (reported beside it)."""

    dropped_frac: float
    ir_frac: float
    cv: float
    stats: LoadStats
    source: str


def routing_facts(
    layout: Layout,
    mode: Mode,
    scenario: str,
    quality: QualityResults,
    balanced_cv: float,
) -> RoutingFacts:
    """Dropped and IR fractions, popularity CV and the slowest-rank statistics of one mode."""
    model = layout.model
    if scenario == "balanced":
        stats = simulate(
            balanced_cv, model.experts, layout.ep, layout.tokens, mode.topk, mode.capacity_factor
        )
        ir = ir_fraction(stats.dropped_frac, mode.topk) if mode.ir else 0.0
        return RoutingFacts(stats.dropped_frac, ir, balanced_cv, stats, "balanced router (model)")
    own = quality.get(mode.quality)
    key = mode.rates_from if (mode.dropless or own is None or own.dropped is None) else mode.quality
    rates = quality.get(key)
    if rates is None or rates.dropped is None:
        raise ValueError(f"{quality.source} has no routing rates for {key}")
    rates_k, rates_cf = _topk_of(key[0]), _capacity_of(key[1])
    dropped = rates.dropped / 100
    cv = fit_cv(dropped, quality.experts, quality.ep, quality.tokens_per_call, rates_k, rates_cf)
    stats = simulate(cv, model.experts, layout.ep, layout.tokens, mode.topk, mode.capacity_factor)
    if not mode.ir:
        ir = 0.0
    elif rates.rectified and rates_k == mode.topk:
        ir = rates.rectified / 100
    else:
        ir = ir_fraction(dropped, mode.topk)
    source = f"{quality.source} {key[0]} cf {key[1]}"
    return RoutingFacts(0.0 if mode.dropless else dropped, ir, cv, stats, source)


def routing(
    layout: Layout,
    mode: Mode,
    facts: RoutingFacts,
    perf_router: dict[str, Any],
    syncs: SyncCounts,
) -> Routing:
    """The layer model's :class:`Routing` for one mode."""
    rectified = mode.ir or mode.fr
    ratio = 1.0
    if rectified:
        ratio, _ = router_ratio(perf_router, layout.model.experts, mode.topk, layout.model.hidden)
    if mode.dropless:
        count = syncs.dropless
    else:
        count = syncs.padded_rectified if mode.ir else syncs.padded
    return Routing(
        capacity_factor=mode.capacity_factor,
        ir_frac=facts.ir_frac,
        ir_max_over_mean=facts.stats.dropped_max_over_mean,
        rank_load_max_over_mean=facts.stats.rank_load_max_over_mean,
        rectified=rectified,
        router_ratio=ratio,
        syncs=count,
    )


def shape(layout: Layout, mode: Mode) -> LayerShape:
    model = layout.model
    return LayerShape(
        hidden=model.hidden,
        ffn=model.ffn,
        experts=model.experts,
        topk=mode.topk,
        tokens=layout.tokens,
        ep=layout.ep,
        ep_per_node=layout.ep_per_node,
        gated=model.gated,
    )


def predict(
    layout: Layout,
    mode: Mode,
    scenario: str,
    cluster: Cluster,
    quality: QualityResults,
    balanced_cv: float,
    perf_router: dict[str, Any],
    syncs: SyncCounts,
) -> tuple[StepTime, RoutingFacts, Routing]:
    """One training step per GPU of ``layout`` in ``mode`` under ``scenario``."""
    facts = routing_facts(layout, mode, scenario, quality, balanced_cv)
    route = routing(layout, mode, facts, perf_router, syncs)
    model = layout.model
    step = step_time(
        shape(layout, mode), route, cluster,
        model.layers, model.heads, model.kv_heads, model.seq, model.vocab,
    )  # fmt: skip
    return step, facts, route


def _loss(quality: QualityResults | None, mode: Mode) -> tuple[float | None, float | None]:
    group = quality.get(mode.quality) if quality else None
    return (group.loss, group.loss_std) if group else (None, None)


def predict_all(
    layouts: tuple[Layout, ...],
    cluster_for: Any,
    quality: QualityResults,
    upcycle: QualityResults | None,
    balanced_cv: float,
    perf_router: dict[str, Any],
    syncs: SyncCounts,
) -> list[dict[str, Any]]:
    """Every (layout, mode, scenario) as a flat row for the JSON and the report;
    ``cluster_for(layout)`` gives the cluster a layout runs on."""
    from benchmarks.at_scale.models import modes_for

    rows = []
    for layout in layouts:
        cluster = cluster_for(layout)
        for mode in modes_for(layout.topk):
            loss, loss_std = _loss(quality, mode)
            up_loss, up_std = _loss(upcycle, mode)
            for scenario in SCENARIOS:
                step, facts, route = predict(
                    layout, mode, scenario, cluster, quality, balanced_cv, perf_router, syncs
                )
                layer = step.layer
                rows.append(
                    {
                        "layout": layout.name,
                        "mode": mode.label,
                        "topk": mode.topk,
                        "capacity_factor": mode.capacity_factor,
                        "rectify": mode.rectify,
                        "scenario": scenario,
                        "dropped_pct": 100 * facts.dropped_frac,
                        "ir_pct": 100 * facts.ir_frac,
                        "ir_max_over_mean": route.ir_max_over_mean,
                        "load_max_over_mean": route.rank_load_max_over_mean,
                        "cv": facts.cv,
                        "rates_source": facts.source,
                        "router_ratio": route.router_ratio,
                        "syncs": route.syncs,
                        "expert_rows": layer.expert_rows,
                        "a2a_mb_intra": layer.bytes_intra / 1e6,
                        "a2a_mb_inter": layer.bytes_inter / 1e6,
                        "gemm_ms": 1e3 * layer.gemm_s,
                        "a2a_ms": 1e3 * layer.a2a_s,
                        "a2a_intra_ms": 1e3 * layer.a2a_intra_s,
                        "a2a_inter_ms": 1e3 * layer.a2a_inter_s,
                        "router_ms": 1e3 * layer.router_s,
                        "other_ms": 1e3
                        * (layer.total_s - layer.gemm_s - layer.a2a_s - layer.router_s),
                        "layer_ms": 1e3 * layer.total_s,
                        "step_ms": 1e3 * step.total_s,
                        "tokens_per_s": step.tokens_per_s,
                        "moe_share": step.moe_share,
                        "loss": loss,
                        "loss_std": loss_std,
                        "upcycle_loss": up_loss,
                        "upcycle_loss_std": up_std,
                    }
                )
    return rows
