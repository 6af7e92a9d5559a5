"""The at-scale cost model (``benchmarks/at_scale``): formulas against hand derivations and the
project's counted all-to-all bytes, invariants (capacity, IR, nodes), the load model's exact
cases, the published-table parser, the overhead fit, and the report from synthetic input.

Single process, no gloo: the calibration's measurements are not run here, only its fit.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # benchmarks/ is not installed
    sys.path.insert(0, str(REPO))

from benchmarks.at_scale import layer_model as lm  # noqa: E402
from benchmarks.at_scale import plots, report, validate  # noqa: E402
from benchmarks.at_scale.__main__ import layout_json  # noqa: E402
from benchmarks.at_scale.calibrate import Calibration, fit_latency_bandwidth  # noqa: E402
from benchmarks.at_scale.cluster import Cluster, h100  # noqa: E402
from benchmarks.at_scale.inputs import (  # noqa: E402
    InputError,
    QualityGroup,
    QualityResults,
    SyncCounts,
    read_quality,
    router_ratio,
)
from benchmarks.at_scale.models import Layout, MoEModel, modes_for  # noqa: E402
from benchmarks.at_scale.predict import ir_fraction, predict_all  # noqa: E402
from benchmarks.at_scale.routing_load import capacity, fit_cv, simulate  # noqa: E402

# A machine where every number is easy to divide by: 1 GFLOP/s, 1 GB/s NVLink, 0.5 GB/s IB,
# 1 GB/s memory, no latencies, syncs or fixed costs.
UNIT = Cluster(
    name="unit", nodes=2, gpus_per_node=2, peak_flops=1e9, compute_efficiency=1.0,
    efficiency_source="test", intra_bw=1e9, inter_bw=0.5e9, link_efficiency=1.0,
    a2a_latency_intra_s=0.0, a2a_latency_inter_s=0.0, mem_bw=1e9, sync_s=0.0,
    router_fixed_s=0.0, act_bytes=2, prob_bytes=4,
)  # fmt: skip
SHAPE = lm.LayerShape(hidden=8, ffn=16, experts=4, topk=1, tokens=100, ep=4, ep_per_node=2)


# ---- FLOPs and bytes, by hand --------------------------------------------------------------


def test_expert_flops_per_row_by_hand() -> None:
    # H=2, F=3. Gated forward: fc1 2x(2x3) gate+up = 24, fc2 2x3x2 = 12 -> 36; x3 with backward
    assert lm.expert_flops_per_row(2, 3, gated=True) == 108
    # non-gated forward: 12 + 12 = 24 -> 72
    assert lm.expert_flops_per_row(2, 3, gated=False) == 72
    assert lm.gating_flops_per_token(2, 8) == 3 * 2 * 2 * 8


def test_attention_flops_by_hand() -> None:
    # H=4, 2 heads (head dim 2), 1 KV head (kv dim 2), seq 10, causal:
    # QKV 2*4*(4+4) = 64, out 2*4*4 = 32, core 2*2*10*4/2 = 80 -> 176, x3
    assert lm.attention_flops_per_token(4, 2, 1, 10) == 3 * 176


def test_capacity_is_megatrons() -> None:
    from megatron.core.transformer.moe.moe_utils import get_capacity

    for tokens, k, cf, experts in [(2048, 1, 1.0, 8), (100, 2, 0.75, 3), (4096, 6, 0.5, 64)]:
        assert capacity(tokens, k, cf, experts) == get_capacity(tokens * k, experts, cf)


def test_padded_bytes_by_hand() -> None:
    # EP 2, 4 experts, T 64, top-1, cf 1: C = 16; each rank sends C rows to each of the other
    # rank's 2 experts = 32 rows, and gets 32 back; per row fp32: dispatch 16 + 1, combine 16
    rows = lm.padded_remote_rows(64, 1, 1.0, 4, 2)
    assert rows == 32
    assert lm.a2a_bytes_per_rank(rows, rows, 16, 4, 4) == 64 * (2 * 16 * 4 + 4) == 8448


def test_bytes_match_the_counted_bytes_of_benchmarks_perf() -> None:
    """The formula against ``benchmarks/perf``'s counter (wrapped all_to_all_single), every padded
    row of docs/results/perf_bytes.json, every mode (IR and FR send exactly the vanilla bytes)."""
    data = json.loads((REPO / "docs/results/perf_bytes.json").read_text())
    padded = [row for row in data["rows"]["layer"] if row["pad"]]
    assert len(padded) >= 6
    for row in padded:
        remote = lm.padded_remote_rows(
            row["tokens"], row["topk"], row["capacity_factor"], row["experts"], row["ep"]
        )
        expected = lm.a2a_bytes_per_rank(remote, remote, row["hidden"], 4, 4)
        for mode in ("none", "ir", "fr", "ir+fr"):
            assert row["modes"][mode]["payload_per_rank"] == [expected] * row["ep"], (row, mode)


def test_remote_split_by_hand() -> None:
    assert lm.remote_split(8, 8) == (1.0, 0.0)
    assert lm.remote_split(8, 1) == (0.0, 1.0)
    assert lm.remote_split(16, 8) == (7 / 15, 8 / 15)
    assert lm.remote_split(1, 1) == (0.0, 0.0)


def test_expert_rows_by_hand() -> None:
    # C = ceil(100 / 4) = 25 -> 4 experts x 25 = 100 slots; IR 10 % of 100 tokens, slowest 1.5x
    rows, remote = lm.expert_rows(SHAPE, lm.Routing(1.0, ir_frac=0.1, ir_max_over_mean=1.5))
    assert (rows, remote) == (100 + 15, 3 * 1 * 25)
    # dropless: the hottest rank gets 2x the mean k T = 100 rows, 3/4 of them from others
    rows, remote = lm.expert_rows(SHAPE, lm.Routing(None, rank_load_max_over_mean=2.0))
    assert (rows, remote) == (200, 150)


def test_layer_time_by_hand() -> None:
    t = lm.layer_time(SHAPE, lm.Routing(1.0), UNIT)
    flops_row = 3 * 2 * 8 * 16 * 3  # gated, H 8, F 16
    assert t.gemm_s == pytest.approx(100 * flops_row / 1e9)
    wire = (75 + 75) * (2 * 8 * 2 + 4)  # 5400 bytes, 1/3 of peers in the node
    assert t.bytes_intra == pytest.approx(wire / 3) and t.bytes_inter == pytest.approx(wire * 2 / 3)
    # both links at once: the slower one (IB: 3600 B at 0.5 GB/s) sets the time
    assert t.a2a_s == pytest.approx(max(1800 / 1e9, 3600 / 0.5e9))
    assert t.router_s == pytest.approx(100 * 3 * 2 * 8 * 4 / 1e9)
    parts = t.gemm_s + t.a2a_s + t.router_s + t.memory_s + t.rectify_copy_s + t.sync_s
    assert t.total_s == pytest.approx(parts + t.overhead_s)


def test_step_time_adds_the_dense_part() -> None:
    step = lm.step_time(
        SHAPE, lm.Routing(1.0), UNIT, layers=3, heads=2, kv_heads=2, seq=10, vocab=50
    )
    attention = lm.attention_flops_per_token(8, 2, 2, 10) * 100 / 1e9
    head = 3 * 2 * 8 * 50 * 100 / 1e9
    assert step.total_s == pytest.approx(3 * (step.layer.total_s + attention) + head)
    assert step.tokens_per_s == pytest.approx(100 / step.total_s)


# ---- invariants ----------------------------------------------------------------------------


def test_more_capacity_means_more_gemm_time_and_bytes() -> None:
    times = [lm.layer_time(SHAPE, lm.Routing(cf), UNIT) for cf in (0.5, 0.75, 1.0, 1.5, 2.0)]
    for lower, higher in zip(times, times[1:], strict=False):
        assert higher.gemm_s > lower.gemm_s
        assert higher.bytes_inter > lower.bytes_inter


def test_ir_adds_expert_work_but_no_bytes() -> None:
    vanilla = lm.layer_time(SHAPE, lm.Routing(1.0), UNIT)
    rectified = lm.layer_time(
        SHAPE, lm.Routing(1.0, ir_frac=0.3, ir_max_over_mean=1.2, rectified=True), UNIT
    )
    assert rectified.bytes_inter == vanilla.bytes_inter
    assert rectified.bytes_intra == vanilla.bytes_intra
    assert rectified.gemm_s > vanilla.gemm_s and rectified.rectify_copy_s > 0


def test_more_nodes_means_a_bigger_inter_node_share() -> None:
    """EP 64 over 64 GPUs: 8, 4, 2, 1 EP ranks per node (= 8, 16, 32, 64 nodes)."""
    shape = dataclasses.replace(SHAPE, experts=64, ep=64)
    shares = []
    for per_node in (8, 4, 2, 1):
        t = lm.layer_time(dataclasses.replace(shape, ep_per_node=per_node), lm.Routing(1.0), UNIT)
        shares.append(t.bytes_inter / (t.bytes_inter + t.bytes_intra))
    assert shares == sorted(shares) and len(set(shares)) == 4 and shares[-1] == 1.0


def test_dropless_pays_for_the_hottest_rank() -> None:
    even = lm.layer_time(SHAPE, lm.Routing(None, rank_load_max_over_mean=1.0), UNIT)
    hot = lm.layer_time(SHAPE, lm.Routing(None, rank_load_max_over_mean=2.0), UNIT)
    assert hot.gemm_s == pytest.approx(2 * even.gemm_s)
    assert hot.bytes_inter == pytest.approx(2 * even.bytes_inter)


# ---- the load model ------------------------------------------------------------------------


def test_load_model_exact_cases() -> None:
    # one expert on one rank: every request lands there; C = ceil(10 x 0.5) = 5 -> half dropped
    stats = simulate(0.0, 1, 1, 10, 1, 0.5)
    assert stats.dropped_frac == 0.5 and stats.padded_frac == 0.0
    assert stats.rank_load_max_over_mean == 1.0
    # capacity 2 on one expert: nothing dropped, half the slots empty
    stats = simulate(0.0, 1, 1, 10, 1, 2.0)
    assert stats.dropped_frac == 0.0 and stats.padded_frac == 0.5
    # a perfectly even router with many tokens: every rank gets its share (law of large numbers)
    assert simulate(0.0, 4, 4, 10**6, 1, None).rank_load_max_over_mean == pytest.approx(1, abs=0.01)


def test_load_model_monotone() -> None:
    drops = [simulate(cv, 8, 2, 1024, 1, 1.0).dropped_frac for cv in (0.0, 0.3, 0.6, 1.0)]
    assert drops == sorted(drops) and drops[0] < drops[-1]
    # the hottest of more ranks is hotter (one expert per rank)
    loads = [simulate(0.5, ep, ep, 4096, 1, None).rank_load_max_over_mean for ep in (2, 8, 32)]
    assert loads == sorted(loads) and loads[0] > 1


def test_fit_cv_reproduces_the_target() -> None:
    cv = fit_cv(0.3, 8, 2, 1024, 1, 1.0)
    assert simulate(cv, 8, 2, 1024, 1, 1.0).dropped_frac == pytest.approx(0.3, abs=0.002)
    assert fit_cv(0.0001, 8, 2, 1024, 1, 1.0) == 0.0  # sampling noise alone drops more


def test_ir_fraction_by_hand() -> None:
    assert ir_fraction(0.5, 1) == 0.5
    assert ir_fraction(0.5, 2) == 0.75  # at least one of two requests dropped


# ---- inputs --------------------------------------------------------------------------------

QUALITY_MD = """# Quality
- Runs: 6; seeds 1, 2, 3
```
python x.py --num-experts 8 --expert-model-parallel-size 2 --micro-batch-size 4 --seq-length 64
```
## 1. The paper's grid at capacity factor 1.0

| variant | seeds | held-out loss: mean ± std | dropped % | padded % | filled-in % | rectified % |
| --- | ---: | ---: | ---: | ---: | ---: | ---: |
| Top-1 | 3 | 2.5000 ± 0.0100 (2.49–2.51) | 30.0 | 30.0 | 0.0 | 0.0 |
| Top-1+FR+IR | 3 | 2.1000 ± 0.0200 (2.08–2.12) | 20.0 | 5.0 | 15.0 | 20.0 |

## 2. Capacity sweep (Top-1)

| capacity factor | Top-1 | Top-1+IR | Top-1+FR | Top-1 dropped % | Top-1 padded % |
| --- | ---: | ---: | ---: | ---: | ---: |
| 0.5 | 2.6000 ± 0.0300 | 2.3000 ± 0.0100 (Δ -0.3) | — | 60.0 | 20.0 |
| dropless | 2.7000 ± 0.0500 | — | — | 0.0 | 0.0 |
"""


def test_quality_report_is_parsed(tmp_path: Path) -> None:
    path = tmp_path / "quality.md"
    path.write_text(QUALITY_MD)
    q = read_quality(path)
    assert (q.experts, q.ep, q.tokens_per_call, q.seeds) == (8, 2, 256, 3)
    assert q.groups[("Top-1+FR+IR", "1")] == QualityGroup(2.1, 0.02, 20.0, 5.0, 15.0, 20.0)
    assert q.groups[("Top-1", "0.5")].dropped == 60.0
    assert (
        q.groups[("Top-1+IR", "0.5")].loss == 2.3 and q.groups[("Top-1+IR", "0.5")].dropped is None
    )
    assert q.groups[("Top-1", "dropless")].loss == 2.7


def test_quality_report_without_the_grid_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "quality.md"
    path.write_text("# nothing\n## 2. Capacity sweep\n")
    with pytest.raises(InputError, match="quality.md: no '## 1.' grid"):
        read_quality(path)


PERF_ROUTER = {
    "rows": [
        {"experts": 8, "topk": 2, "hidden": 1024, "tokens": 16384, "capacity_factor": 1.0,
         "ratio": 1.2, "vanilla_ms": 80.0},
        {"experts": 64, "topk": 1, "hidden": 1024, "tokens": 16384, "capacity_factor": 1.0,
         "ratio": 0.9, "vanilla_ms": 130.0},
        {"experts": 64, "topk": 2, "hidden": 1024, "tokens": 16384, "capacity_factor": 0.5,
         "ratio": 5.0, "vanilla_ms": 150.0},
    ]
}  # fmt: skip


def test_router_ratio_takes_the_nearest_measured_setting() -> None:
    assert router_ratio(PERF_ROUTER, 8, 1, 4096)[0] == 1.2  # 1 top-k step from E8 k2
    assert router_ratio(PERF_ROUTER, 64, 6, 2048)[0] == 0.9  # capacity 0.5 rows never used


def test_latency_bandwidth_fit_by_hand() -> None:
    latency, bandwidth = fit_latency_bandwidth([(1e6, 0.002), (2e6, 0.003), (4e6, 0.005)])
    assert latency == pytest.approx(0.001) and bandwidth == pytest.approx(1e9)
    # noise: the bigger message measured faster -> through the origin: sum x^2 / sum x y
    # = (1e12 + 16e12) / (3e3 + 8e3) bytes/s
    assert fit_latency_bandwidth([(1e6, 0.003), (4e6, 0.002)]) == (0.0, pytest.approx(17e12 / 11e3))


# ---- validation: the overhead fit ----------------------------------------------------------


def _calibration() -> Calibration:
    return Calibration(
        gemm_flops={1: 1e10, 2: 5e9, 4: 2.5e9}, mem_bw={1: 1e10, 2: 1e10, 4: 5e9},
        a2a_latency_s={2: 1e-4, 4: 2e-4}, a2a_bw={2: 1e9, 4: 5e8}, gemm_by_hidden={},
        wall_s=1.0, load_before=0.0, load_after=0.0, cpu="cpu",
    )  # fmt: skip


def _bench_row(ep: int, vanilla_ms: float, rectified_ms: float, **kw: float) -> dict:
    return {"ep": ep, "tokens": 256, "hidden": 32, "experts": 8, "topk": 1,
            "capacity_factor": 1.0, "pad": True, "ffn_mult": 4, "vanilla_ms": vanilla_ms,
            "rectified_ms": rectified_ms, "ratio": rectified_ms / vanilla_ms,
            "dropped_pct": 10.0, "rectified_pct": 10.0, **kw}  # fmt: skip


def test_overheads_are_fitted_on_one_row_and_predict_the_others() -> None:
    """Timings made in the model's own world (pure model + the two fixed costs, slowed by the
    contention of 2 and 4 processes): fitted on the EP 2 row, the EP 4 row is predicted exactly."""
    cal = _calibration()  # contention: 2x with 2 processes, 4x with 4

    def pure(ep: int, variant: str) -> float:
        return validate.predict_row(_bench_row(ep, 1, 1), variant, cal, PERF_ROUTER).total_s

    extra, rectify = 0.010, 0.004  # per call for one process: every call, the rectified path

    def timed(ep: int) -> dict:
        c = cal.contention(ep)
        vanilla = pure(ep, "vanilla") + c * extra
        rectified = pure(ep, "rectified") + c * (extra + rectify)
        return _bench_row(ep, 1e3 * vanilla, 1e3 * rectified)

    result = validate.validate([timed(2), timed(4)], cal, PERF_ROUTER, {"ep": 2})
    assert result["overhead_one_process_s"] == pytest.approx(extra)
    assert result["rectify_overhead_one_process_s"] == pytest.approx(rectify)
    base, predicted = result["rows"]
    assert base["calibration_row"] and not predicted["calibration_row"]
    for row in (base, predicted):
        assert row["vanilla_error"] == pytest.approx(0, abs=1e-9)
        assert row["rectified_error"] == pytest.approx(0, abs=1e-9)
    assert predicted["predicted_ratio"] == pytest.approx(predicted["measured_ratio"])
    assert predicted["predicted_ratio"] > 1  # IR computes 10 % more rows
    with pytest.raises(ValueError, match="no row"):
        validate.validate([timed(4)], cal, PERF_ROUTER, {"ep": 2})


# ---- the report from synthetic input -------------------------------------------------------

#: Big enough for the GEMMs to dominate the fixed costs, as in the real layouts.
TINY = MoEModel(
    "tiny", hidden=1024, ffn=4096, experts=8, layers=2, heads=8, kv_heads=8, vocab=100, seq=1024
)
TINY_LAYOUTS = (
    Layout("tiny in a node", TINY, 1, 8, 8, 1, tokens=4096, note="test"),
    Layout("tiny across nodes", TINY, 8, 8, 1, 1, tokens=4096, note="test"),
)


def _quality(fr_ir_loss: float) -> QualityResults:
    g = QualityGroup
    groups = {
        ("Top-1", "1"): g(2.3, 0.02, 30.0, 30.0, 0.0, 0.0),
        ("Top-1", "0.5"): g(2.35, 0.02, 60.0, 20.0),
        ("Top-1+IR", "0.5"): g(2.2, 0.02),
        ("Top-1+FR+IR", "1"): g(fr_ir_loss, 0.02, 20.0, 5.0, 15.0, 20.0),
        ("Top-1", "dropless"): g(2.4, 0.05, 0.0, 0.0),
        ("Top-2", "1"): g(2.05, 0.02, 20.0, 20.0, 0.0, 0.0),
        ("Top-2+FR+IR", "1"): g(2.0, 0.02, 18.0, 6.0, 12.0, 33.0),
    }
    return QualityResults("quality.md", groups, experts=8, ep=2, tokens_per_call=256, seeds=3)


def _synthetic_report_data(fr_ir_loss: float) -> dict:
    syncs = SyncCounts(1, 5, 8, "test")
    predictions = predict_all(
        TINY_LAYOUTS, lambda layout: h100(layout.nodes), _quality(fr_ir_loss), None, 0.1,
        PERF_ROUTER, syncs,
    )  # fmt: skip
    validation_row = {
        "ep": 2, "hidden": 32, "experts": 8, "topk": 1, "capacity_factor": 1.0,
        "calibration_row": True, "dropped_pct": 5.0, "rectified_pct": 5.0, "measured_ratio": 1.1,
        "measured_ratio_q1": 1.0, "measured_ratio_q3": 1.2, "predicted_ratio": 1.05,
    }  # fmt: skip
    for variant in ("vanilla", "rectified"):
        validation_row |= {f"{variant}_{k}": 1.0 for k in ("measured_ms", "pure_ms", "ms")}
        validation_row |= {f"{variant}_{k}": 0.0 for k in ("pure_error", "error")}
    return {
        "command": "python -m benchmarks.at_scale",
        "machine": {"date": "today", "cpu": "cpu", "logical_cpus": 2, "torch": "t",
                    "megatron_core": "m", "load_average": 1.0},
        "cluster": [list(r) for r in h100(1).describe()],
        "calibration": dataclasses.asdict(_calibration()),
        "validation": {"perf_layer": {"overhead_one_process_s": 0.01, "rows": [validation_row],
                                      "machine": {"date": "then", "cpu": "cpu",
                                                  "load_average": 2.0},
                                      "load_before": 1.0, "command": "bench"}},
        "balanced_cv": 0.1,
        "balanced_source": "test",
        "quality": {"scratch": {"source": "quality.md", "experts": 8, "ep": 2,
                                "tokens_per_call": 256, "seeds": 3}},
        "syncs": {"source": "test"},
        "layouts": [layout_json(lay) for lay in TINY_LAYOUTS],
        "predictions": predictions,
        "wall_s": 1.0,
    }  # fmt: skip


def test_report_from_synthetic_input(tmp_path: Path) -> None:
    data = _synthetic_report_data(fr_ir_loss=2.1)
    modes = modes_for(1)
    assert len(data["predictions"]) == len(TINY_LAYOUTS) * len(modes) * 2
    text = report.render(json.loads(json.dumps(data)), "plot.png")  # as read back from JSON
    assert "**Answer: Top-1 at capacity 1.0 with FR+IR" in text
    assert "![loss vs predicted throughput](plot.png)" in text
    for layout in TINY_LAYOUTS:
        section = text.split(f"### {layout.name}\n")[1].split("\n#")[0]
        rows = [line for line in section.splitlines() if line.startswith("| Top-")]
        assert [row.split(" | ")[0][2:] for row in rows] == [m.label for m in modes]
    # the FR+IR row's loss is the synthetic group's, and the headline names the Top-1 loss
    assert "| 2.100 ± 0.020 |" in text and "2.300 Top-1" in text
    plots.loss_vs_throughput(data, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").stat().st_size > 10_000


def test_validation_discussion_is_computed_from_the_rows() -> None:
    data = _synthetic_report_data(fr_ir_loss=2.1)
    case = {"ep": 2, "hidden": 32, "experts": 8, "topk": 1, "capacity_factor": 1.0}
    data["validation"]["perf_layer"]["consistency"] = {
        "ps_per_flop_low": 100.0, "ps_per_flop_low_case": case,
        "ps_per_flop_high": 300.0, "ps_per_flop_high_case": {**case, "hidden": 512},
        "ep1_ms": 50.0, "ep2_ms": 120.0,
    }  # fmt: skip
    text = report.discussion(data)
    assert "from 100 ps (EP 2, H 32, E 8, k 1, cf 1) to 300 ps (EP 2, H 512" in text
    assert "3.0x" in text and "EP 1 took 50 ms where EP 2 took 120 ms" in text
    assert "on this machine, at another time" in text  # same CPU name in both


def test_wide_quartiles_mark_a_ratio_noisy() -> None:
    assert report.noisy({"measured_ratio_q1": 1.0, "measured_ratio_q3": 1.31})
    assert not report.noisy({"measured_ratio_q1": 1.0, "measured_ratio_q3": 1.29})
    assert not report.noisy({})


def test_report_does_not_crown_a_beaten_mode() -> None:
    """With FR+IR's loss worse than vanilla Top-1's, a faster mode beats it: no 'Answer' line."""
    text = report.render(_synthetic_report_data(fr_ir_loss=2.5), "plot.png")
    assert "**Answer:" not in text
    assert "Another mode beats it on both counts" in text


def test_layouts_refuse_impossible_ep() -> None:
    with pytest.raises(ValueError, match="do not split over EP 16"):
        Layout("x", TINY, 2, 16, 8, 1)
    assert math.isclose(h100(2).gpus, 16)
