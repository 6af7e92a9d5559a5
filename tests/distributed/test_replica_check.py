"""The data-parallel replica check used after training must catch a diverged replica."""

from __future__ import annotations

import pytest

from megatron.rectify.dev.multiprocess import run_distributed

pytestmark = pytest.mark.multiprocess


def _check(rank: int, world_size: int, diverge: bool) -> str:
    import torch

    from megatron.rectify.dev.replica_check import check_data_parallel_replicas

    model = torch.nn.Linear(4, 4)
    torch.nn.init.constant_(model.weight, 1.0)
    if diverge and rank == 1:
        with torch.no_grad():
            model.weight[0, 0] += 1e-6
    try:
        check_data_parallel_replicas([model])
    except RuntimeError as error:
        return f"error: {error}"
    return "ok"


def test_identical_replicas_pass() -> None:
    assert run_distributed(_check, 2, diverge=False) == ["ok", "ok"]


def test_a_diverged_replica_is_reported() -> None:
    results = run_distributed(_check, 2, diverge=True)
    assert all(r.startswith("error:") and "weight" in r for r in results), results
