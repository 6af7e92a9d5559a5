"""Routing statistics in a real training run (torchrun, CPU emulation); the in-process checks are
in tests/unit/test_statistics_modes.py.
"""

from __future__ import annotations

import re

import pytest


@pytest.mark.slow
@pytest.mark.multiprocess
def test_inference_only_rectification_run_logs_megatrons_drop_rate() -> None:
    """``pretrain_gpt_rectify.py --moe-rectify none --moe-rectify-eval ir+fr``: the training
    log's ``rectify_dropped_pct`` is megatron's real rate (it read 0.00 on every line)."""
    from test_pretrain_e2e import ok, torchrun

    log = ok(
        torchrun(
            1,
            *("--moe-rectify", "none", "--moe-rectify-eval", "ir+fr", "--train-iters", "4"),
            *("--eval-interval", "4", "--eval-iters", "1"),
        )
    )
    dropped = [float(v) for v in re.findall(r"rectify_dropped_pct: ([0-9.]+)", log)]
    assert len(dropped) == 4, log[-3000:]
    assert max(dropped) > 0, log[-3000:]  # random router, capacity 1.0: megatron drops
    summary = re.findall(r"MoE layer (\d): dropped ([0-9.]+) %", log)
    assert [layer for layer, _ in summary] == ["1", "2"], log[-3000:]
    assert any(float(rate) > 0 for _, rate in summary)
