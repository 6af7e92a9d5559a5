"""``--overlap-moe-expert-parallel-comm`` end to end (issue 12): megatron's overlapped
expert-parallel schedule (``combined_1f1b``) asks the forward step for the model's schedule
plan; our GPT recipe once did not accept ``return_schedule_plan`` and every run with the flag
crashed in its first step, rectified or not. FR trains through the schedule's nodes and gives
the losses of the same run without the overlap (IR is refused: tests/unit/test_option_checks.py).
"""

from __future__ import annotations

import pytest
from test_pretrain_e2e import losses, ok, torchrun

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

#: EP 2 in bf16 (megatron requires bf16 or fp16 for the overlap), FR padded, 4 iterations.
RUN = [
    "--expert-model-parallel-size", "2", "--bf16", "--moe-rectify", "fr",
    "--train-iters", "4", "--eval-iters", "0", "--eval-interval", "1000",
]  # fmt: skip


def test_fill_in_trains_with_the_overlapped_expert_parallel_schedule() -> None:
    overlapped = ok(torchrun(2, *RUN, "--overlap-moe-expert-parallel-comm"))
    plain = ok(torchrun(2, *RUN))
    with_overlap, without = losses(overlapped), losses(plain)
    assert sorted(with_overlap) == [1, 2, 3, 4], overlapped[-3000:]
    assert "rectify_filled_in_pct" in overlapped
    for iteration in range(1, 5):  # bf16: the schedule may order reductions differently
        assert with_overlap[iteration] == pytest.approx(without[iteration], rel=1e-2), iteration
