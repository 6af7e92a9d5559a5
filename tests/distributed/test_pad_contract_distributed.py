"""The padding-to-capacity contract on a real EP = 2 run (gloo ranks); the single-process checks
are in tests/unit/test_pad_contract.py.
"""

from __future__ import annotations

import pytest


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.parametrize(
    "case",
    [
        pytest.param({"ep": 2, "experts": 4, "topk": 1, "mode": "ir"}, id="ep2-top1-ir"),
        pytest.param({"ep": 2, "experts": 4, "topk": 2, "mode": "ir+fr"}, id="ep2-top2-ir+fr"),
        pytest.param({"ep": 2, "experts": 4, "topk": 1, "mode": "none"}, id="ep2-top1-none"),
    ],
)
def test_every_rank_dispatches_exactly_c_per_column(case: dict) -> None:
    import moe_layer_cases as cases

    from megatron.rectify.dev.multiprocess import run_distributed

    results = run_distributed(
        cases.dispatched_column_counts,
        2,
        expert_model_parallel_size=2,
        timeout_s=240,
        case={**case, "pad": True},
    )
    for result in results:
        assert result["columns"] == [result["capacity"]] * case["experts"], result
    if case["mode"] == "ir":
        assert sum(r["padding_pairs"] for r in results) > 0
