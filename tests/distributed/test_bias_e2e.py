"""Biases on the local spec's experts in real training runs (torchrun, CPU emulation).

megatron-core 0.19.2 crashed every local-spec MoE run with biases at EP = expert-TP = 1; our
spec's ExpertRowParallelLinear avoids it (megatron/rectify/mlp.py). The in-process checks of the
expert and the layer are in tests/unit/test_expert_bias.py.
"""

from __future__ import annotations

import math

import pytest
from test_pretrain_e2e import TINY, losses, ok, torchrun

RECTIFY = ["--moe-rectify", "ir+fr", "--moe-rectify-ir-trigger", "ignore_kth"]


def _trains(nproc: int, *extra: str, iterations: int = 8) -> None:
    """Trains with rc 0 and a finite, falling loss."""
    log = ok(torchrun(nproc, *RECTIFY, *extra, "--train-iters", str(iterations)))
    loss = losses(log)
    assert sorted(loss) == list(range(1, iterations + 1)), log[-3000:]
    assert all(math.isfinite(v) for v in loss.values()), loss
    assert loss[iterations] < loss[1], loss


@pytest.mark.slow
@pytest.mark.multiprocess
def test_ep1_single_process_trains_with_biases() -> None:
    assert "--disable-bias-linear" not in TINY
    _trains(1)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_ep1_pipeline_parallel_trains_with_biases() -> None:
    _trains(2, "--pipeline-model-parallel-size", "2")


@pytest.mark.slow
@pytest.mark.multiprocess
def test_ep2_trains_with_biases() -> None:
    _trains(2, "--expert-model-parallel-size", "2")
