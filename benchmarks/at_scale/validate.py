"""The model against the CPU layer benchmark: predicted vs measured vanilla and rectified times.

Target: ``docs/results/perf_layer.json`` (``python -m benchmarks.perf --parts layer``): one MoE
layer forward+backward, megatron's local spec (non-gated GELU experts, fp32), alltoall dispatcher,
capacity padding, T = 2048 tokens per rank, one gloo process per EP rank with one thread, the
slowest rank's time. The machine parameters come from :mod:`.calibrate`, run on *this* machine;
the routing rates (dropped %, rectified %) are the benchmark's own, per row.

The pure model leaves out Python and framework overhead (megatron's permutation bookkeeping,
autograd, the dispatcher's small ops), which on a CPU at these sizes is not small. So two fixed
per-call costs are fitted on ONE row (:data:`CALIBRATION_ROW`): one from its vanilla time (every
layer call), one from its rectified time (what the rectified path's own bookkeeping adds). Every
other row, both variants, is a prediction; the report shows the errors with and without them.
"""

from __future__ import annotations

from typing import Any

from benchmarks.at_scale.calibrate import Calibration, cpu_cluster
from benchmarks.at_scale.inputs import router_per_token_s, router_ratio
from benchmarks.at_scale.layer_model import (
    LayerShape,
    LayerTime,
    Routing,
    expert_flops_per_row,
    layer_time,
)
from benchmarks.at_scale.predict import ir_fraction
from benchmarks.at_scale.routing_load import capacity, fit_cv, simulate

#: The row whose vanilla time calibrates the fixed overhead: the layer benchmark's base case.
CALIBRATION_ROW = {"ep": 2, "hidden": 256, "experts": 8, "topk": 1, "capacity_factor": 1.0}
VARIANTS = ("vanilla", "rectified")


def is_row(row: dict[str, Any], key: dict[str, Any]) -> bool:
    return all(row.get(k) == v for k, v in key.items())


def layer_shape(row: dict[str, Any]) -> LayerShape:
    """The benchmark's layer: FFN = ffn_mult x hidden, no gating (megatron's local spec default)."""
    return LayerShape(
        hidden=row["hidden"],
        ffn=row.get("ffn_size") or row["ffn_mult"] * row["hidden"],
        experts=row["experts"],
        topk=row["topk"],
        tokens=row["tokens"],
        ep=row["ep"],
        ep_per_node=row["ep"],
        gated=False,
    )


def layer_routing(row: dict[str, Any], variant: str, perf_router: dict[str, Any]) -> Routing:
    """Vanilla: capacity only. Rectified (IR+FR, ``ignore_kth``): the row's measured rectified
    fraction, the slowest rank's share from a popularity fitted to its dropped fraction, and the
    measured router ratio."""
    cf = row["capacity_factor"]
    if variant == "vanilla":
        return Routing(capacity_factor=cf, syncs=0)
    dropped = row["dropped_pct"] / 100
    cv = fit_cv(dropped, row["experts"], row["ep"], row["tokens"], row["topk"], cf)
    stats = simulate(cv, row["experts"], row["ep"], row["tokens"], row["topk"], cf)
    measured = row.get("rectified_pct")
    ratio, _ = router_ratio(perf_router, row["experts"], row["topk"], row["hidden"])
    return Routing(
        capacity_factor=cf,
        ir_frac=measured / 100 if measured is not None else ir_fraction(dropped, row["topk"]),
        ir_max_over_mean=stats.dropped_max_over_mean,
        rectified=True,
        router_ratio=ratio,
        syncs=0,
    )


def predict_row(
    row: dict[str, Any],
    variant: str,
    cal: Calibration,
    perf_router: dict[str, Any],
    overheads: tuple[float, float] = (0.0, 0.0),
) -> LayerTime:
    """The model's time for one benchmark row and variant on this machine; ``overheads``: the
    fixed per-call costs (every call, rectified path) for one uncontended process."""
    router_token = router_per_token_s(perf_router, row["experts"], cal.gemm_flops[1])
    cluster = cpu_cluster(cal, row["ep"], router_token, *overheads)
    return layer_time(layer_shape(row), layer_routing(row, variant, perf_router), cluster)


def fit_overheads(
    row: dict[str, Any], cal: Calibration, perf_router: dict[str, Any]
) -> tuple[float, float]:
    """The two fixed per-call costs (as one uncontended process pays them) that make the
    predictions of ``row``'s vanilla and rectified times exact: what every layer call costs
    outside the modelled terms, and what the rectified path adds to that. Either may come out
    negative if the model overshoots."""
    contention = cal.contention(row["ep"])
    vanilla = predict_row(row, "vanilla", cal, perf_router).total_s
    overhead = (row["vanilla_ms"] / 1e3 - vanilla) / contention
    rectified = predict_row(row, "rectified", cal, perf_router, (overhead, 0.0)).total_s
    return overhead, (row["rectified_ms"] / 1e3 - rectified) / contention


def validate(
    rows: list[dict[str, Any]],
    cal: Calibration,
    perf_router: dict[str, Any],
    calibration_row: dict[str, Any] = CALIBRATION_ROW,
) -> dict[str, Any]:
    """Predicted vs measured for every row of ``rows`` with EP > 1, both variants, and the
    rectified / vanilla ratio; the overheads fitted on ``calibration_row`` (which must be among
    them). Errors are predicted / measured - 1."""
    anchor = next((r for r in rows if is_row(r, calibration_row)), None)
    if anchor is None:
        raise ValueError(f"no row {calibration_row} to calibrate the overhead on")
    overheads = fit_overheads(anchor, cal, perf_router)
    table = []
    for row in rows:
        if row["ep"] < 2:
            continue
        out: dict[str, Any] = {
            **{k: row[k] for k in ("ep", "hidden", "experts", "topk", "capacity_factor")},
            "calibration_row": is_row(row, calibration_row),
            "dropped_pct": row.get("dropped_pct"),
            "rectified_pct": row.get("rectified_pct"),
            "measured_ratio": row.get("ratio"),
            "measured_ratio_q1": row.get("ratio_q1"),
            "measured_ratio_q3": row.get("ratio_q3"),
        }
        for variant in VARIANTS:
            measured = row[f"{variant}_ms"] / 1e3
            pure = predict_row(row, variant, cal, perf_router)
            fitted = predict_row(row, variant, cal, perf_router, overheads)
            out[f"{variant}_measured_ms"] = 1e3 * measured
            out[f"{variant}_pure_ms"] = 1e3 * pure.total_s
            out[f"{variant}_pure_error"] = pure.total_s / measured - 1
            out[f"{variant}_ms"] = 1e3 * fitted.total_s
            out[f"{variant}_error"] = fitted.total_s / measured - 1
            out[f"{variant}_gemm_ms"] = 1e3 * fitted.gemm_s
            out[f"{variant}_pure_gemm_ms"] = 1e3 * pure.gemm_s
            out[f"{variant}_a2a_ms"] = 1e3 * fitted.a2a_s
            out[f"{variant}_overhead_ms"] = 1e3 * (fitted.overhead_s + fitted.rectify_overhead_s)
        out["predicted_ratio"] = out["rectified_ms"] / out["vanilla_ms"]
        table.append(out)
    return {
        "overhead_one_process_s": overheads[0],
        "rectify_overhead_one_process_s": overheads[1],
        "calibration_row": calibration_row,
        "rows": table,
        "consistency": consistency(rows),
    }


def consistency(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """How far the measured rows agree with *each other*, whatever the model: measured vanilla
    time per expert-GEMM FLOP (model FLOPs, per rank), min and max over the rows; and, where the
    benchmark has EP 1 and EP 2 base rows (the same work per rank), their time ratio."""
    per_flop = []
    for row in rows:
        shape = layer_shape(row)
        slots = shape.experts * capacity(
            row["tokens"], row["topk"], row["capacity_factor"], row["experts"]
        )
        flops = slots * expert_flops_per_row(shape.hidden, shape.ffn, gated=False)
        per_flop.append((row["vanilla_ms"] / 1e3 / flops * 1e12, row))
    low, high = min(per_flop, key=lambda p: p[0]), max(per_flop, key=lambda p: p[0])
    out: dict[str, Any] = {
        "ps_per_flop_low": low[0],
        "ps_per_flop_low_case": {
            k: low[1][k] for k in ("ep", "hidden", "experts", "topk", "capacity_factor")
        },
        "ps_per_flop_high": high[0],
        "ps_per_flop_high_case": {
            k: high[1][k] for k in ("ep", "hidden", "experts", "topk", "capacity_factor")
        },
    }
    base = {k: v for k, v in CALIBRATION_ROW.items() if k != "ep"}
    ep1 = next((r for r in rows if is_row(r, {**base, "ep": 1})), None)
    ep2 = next((r for r in rows if is_row(r, {**base, "ep": 2})), None)
    if ep1 and ep2:
        out["ep1_ms"], out["ep2_ms"] = ep1["vanilla_ms"], ep2["vanilla_ms"]
    return out


def remeasure(repeats: int = 10, warmup: int = 2, budget_s: float = 10.0) -> list[dict[str, Any]]:
    """The layer benchmark's EP 2 base, EP 2 capacity 0.75 and EP 4 base cases, timed now on this
    machine with ``benchmarks.perf.layer`` itself: at least ``repeats`` interleaved repeats, more
    within ``budget_s`` per case (about a minute on 2 cores)."""
    from benchmarks.perf import layer
    from benchmarks.perf.sweeps import LayerCase

    base = LayerCase(ep=2, tokens=2048, hidden=256, experts=8, topk=1, capacity_factor=1.0)
    cases = [base, LayerCase(2, 2048, 256, 8, 1, 0.75), LayerCase(4, 2048, 256, 8, 1, 1.0)]
    return layer.run(cases, repeats=repeats, warmup=warmup, budget_s=budget_s)
