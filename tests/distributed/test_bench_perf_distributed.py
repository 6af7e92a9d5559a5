"""The cost benchmarks (benchmarks/perf) on real 2-process gloo runs: the EP all-to-all byte
accounting against closed-form counts, and the timing parts end to end on tiny cases. The
report, sweep and GPU-script checks are in tests/unit/test_bench_perf.py.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # benchmarks/ is not installed; rank processes import it too
    sys.path.insert(0, str(REPO))

from benchmarks.perf import a2a_bytes  # noqa: E402
from benchmarks.perf.sweeps import IterationCase, LayerCase  # noqa: E402

# EP=2, 4 experts (2 per rank), top-1, 64 tokens per rank, capacity factor 1: this seed drops
# tokens AND leaves padding slots, so IR, FR and the re-dispatch baseline all have work.
CASE = LayerCase(ep=2, tokens=64, hidden=16, experts=4, topk=1, capacity_factor=1.0)
FP32 = 4


@pytest.fixture(scope="module")
def byte_rows() -> list[dict]:
    return a2a_bytes.run_layer([CASE, dataclasses.replace(CASE, pad=False)])


def _padded_vanilla_bytes_per_rank(case: LayerCase) -> int:
    """Closed form: with padding each rank sends capacity rows per expert of the other rank:
    tokens (H) + gate weight (1) in the dispatch, outputs (H) in the combine; x2 backward."""
    capacity = math.ceil(case.topk * case.capacity_factor * case.tokens / case.experts)
    rows_to_others = (case.ep - 1) * (case.experts // case.ep) * capacity
    return 2 * rows_to_others * (2 * case.hidden + 1) * FP32


@pytest.mark.multiprocess
def test_rectified_modes_send_exactly_the_vanilla_bytes(byte_rows: list[dict]) -> None:
    modes = byte_rows[0]["modes"]
    expected = _padded_vanilla_bytes_per_rank(CASE)
    assert modes["none"]["payload_per_rank"] == [expected, expected]
    for mode in ("ir", "fr", "ir+fr"):
        assert modes[mode]["payload_per_rank"] == modes["none"]["payload_per_rank"], mode
    assert modes["ir+fr"]["dropped"] > 0 and modes["ir+fr"]["rectified"] > 0
    assert modes["ir+fr"]["filled_in"] > 0  # FR used padding slots, and still no extra byte


@pytest.mark.multiprocess
def test_redispatch_baseline_pays_for_every_remote_token(byte_rows: list[dict]) -> None:
    for row in byte_rows:
        modes = row["modes"]
        baseline = modes["redispatch"]
        remote = baseline["redispatched_remote"]
        assert baseline["redispatched_tokens"] == modes["ir"]["rectified"] > 0
        assert remote > 0 and baseline["payload_bytes"] > modes["none"]["payload_bytes"]
        # round 2 = token (H) + weight (1) out, output (H) back; x2 backward; counts = metadata
        extra = baseline["payload_bytes"] - modes["none"]["payload_bytes"]
        assert extra == 2 * remote * (2 * CASE.hidden + 1) * FP32
        assert baseline["metadata_bytes"] == CASE.ep * (CASE.experts // CASE.ep) * 8


@pytest.mark.multiprocess
def test_without_padding_ir_still_sends_the_vanilla_bytes(byte_rows: list[dict]) -> None:
    modes = byte_rows[1]["modes"]
    assert modes["ir"]["payload_per_rank"] == modes["none"]["payload_per_rank"]
    assert modes["fr"]["payload_bytes"] >= modes["none"]["payload_bytes"]


@pytest.mark.multiprocess
def test_timed_parts_return_interleaved_ratios() -> None:
    from benchmarks.perf import iteration, layer

    layer_case = LayerCase(ep=2, tokens=64, hidden=16, experts=4, topk=1, capacity_factor=1.0)
    iteration_case = IterationCase(1, 1, 32, 4, 1, 1.0, seq_length=16, micro_batch=2)
    rows = layer.run([layer_case], repeats=2, warmup=0)
    rows += iteration.run([iteration_case], repeats=2, warmup=0)
    for row in rows:
        assert row["repeats"] == 2 and row["vanilla_ms"] > 0 and row["rectified_ms"] > 0
        assert 0 < row["ratio_q1"] <= row["ratio"] <= row["ratio_q3"]  # per-repeat ratios
        assert row["rectified_pct"] >= 0
