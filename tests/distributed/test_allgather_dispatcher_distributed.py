"""Rectification with megatron's allgather dispatcher over real gloo collectives.

One 4-process run walks every layout (TP2+SP with expert-TP 2, EP2, TP2+SP x EP2, TP2+SP x EP2
x expert-TP 2) by re-initialising megatron's process groups in the ranks, instead of one run per
case: starting processes is most of the cost of a distributed test on 2 cores. Per layout it
checks
- fr / ir / ir+fr, top-1 and top-2, padded and unpadded: outputs, input gradients, expert and
  router weight gradients equal the single-process spec reference (``moe_layer_cases.reference``:
  each rank's tokens routed with that rank's capacity and IR restricted to its EP rank's experts);
- ``none``: bit-identical to megatron's own ``MoELayer`` with its allgather dispatcher, padded
  and unpadded;
- ir+fr gathers and reduce-scatters exactly the elements vanilla top-k does (IR tokens never
  travel beyond what the allgather moves anyway).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import moe_layer_cases as cases
import pytest

from megatron.rectify.dev.multiprocess import run_distributed

if TYPE_CHECKING:
    import torch

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

WORLD = 4
#: name -> (tensor-parallel (with SP), expert-parallel, expert-tensor-parallel) on 4 processes.
LAYOUTS = {
    "tp2_sp_etp2": (2, 1, 2),
    "ep2": (1, 2, 1),
    "tp2_sp_ep2": (2, 2, 1),
    "tp2_sp_ep2_etp2": (2, 2, 2),
}
#: (top-k, pad to capacity, mode): each mode with top-1 and top-2, padded and unpadded.
VARIANTS = [
    (1, True, "ir+fr"),
    (2, False, "ir+fr"),
    (2, True, "ir"),
    (1, False, "ir"),
    (1, True, "fr"),
    (2, False, "fr"),
]
EXPERTS = 4


def _use_layout(tp: int, ep: int, etp: int) -> None:
    """Re-initialise megatron's process groups (and RNG tracker) for one layout in place."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        expert_model_parallel_size=ep,
        expert_tensor_parallel_size=etp,
    )
    model_parallel_cuda_manual_seed(1234)


def _versus_reference(rank: int, case: dict) -> dict:
    """The rectified allgather layer against the spec reference, plus what the case exercised."""
    layer = cases.build_layer(cases.make_config(case, WORLD))
    assert type(layer.token_dispatcher).__name__ == "MoERectifyAllGatherTokenDispatcher"
    cases.load_global_weights(layer, cases.global_weights(EXPERTS))
    x_all, upstream_all = cases.rank_tokens(WORLD)
    output, x_grad = cases.run_layer(layer, x_all[rank], upstream_all[rank])
    grads = cases.summed_expert_grads(layer, EXPERTS)
    expected = cases.reference(case, WORLD)
    decision = layer.router.last_routing
    rectified = decision.ir_expert >= 0
    # IR pairs that land on a pair the map already has (summed weights in the merged map)
    collisions = decision.routing_map[rectified, decision.ir_expert[rectified]].sum()
    stats = layer.router.statistics()
    errors = {
        "output": (output - expected["output"][rank]).abs().max(),
        "x_grad": (x_grad - expected["x_grad"][rank]).abs().max(),
        **{name: (grads[name] - expected[name]).abs().max() for name in ("fc1", "fc2", "router")},
    }
    return {
        "errors": {name: float(value) for name, value in errors.items()},
        "scale": float(expected["output"].abs().max()),
        "dropped": int(stats.dropped),
        "rectified": int(stats.rectified),
        "filled_in": int(stats.filled_in),
        "collisions": int(collisions),
        "columns": decision.routing_map.sum(dim=0).tolist(),
        "capacity": decision.capacity,
    }


def _elements_moved(rank: int, case: dict) -> dict:
    """Elements this rank puts into the forward all-gather and reduce-scatter of the
    dispatcher (tokens, map, weights; expert outputs), for megatron's layer (vanilla top-k)
    and the rectified one, with the same weights and tokens."""
    from megatron.core.transformer.moe import token_dispatcher

    counter = {"elements": 0}
    originals = {
        name: getattr(token_dispatcher, name)
        for name in (
            "gather_from_sequence_parallel_region",
            "reduce_scatter_to_sequence_parallel_region",
        )
    }

    def counting(original: Callable) -> Callable:
        def wrapper(input_: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            counter["elements"] += input_.numel()
            return original(input_, *args, **kwargs)

        return wrapper

    for name, original in originals.items():
        setattr(token_dispatcher, name, counting(original))
    x_all, upstream_all = cases.rank_tokens(WORLD)
    moved = {}
    try:
        for name, mode in (("megatron", "none"), ("rectify", case["mode"])):
            layer = cases.build_layer(cases.make_config({**case, "mode": mode}, WORLD), name)
            cases.load_global_weights(layer, cases.global_weights(EXPERTS))
            counter["elements"] = 0
            cases.run_layer(layer, x_all[rank], upstream_all[rank])
            moved[name] = counter["elements"]
        moved["rectified"] = int(layer.router.statistics().rectified)
    finally:
        for name, original in originals.items():
            setattr(token_dispatcher, name, original)
    return moved


def allgather_grid(rank: int, world_size: int) -> dict:
    """Rank body: every layout and variant, one process-group set-up per layout."""
    assert world_size == WORLD
    results: dict = {}
    for name, (tp, ep, etp) in LAYOUTS.items():
        _use_layout(tp, ep, etp)
        base = {"dispatcher": "allgather", "experts": EXPERTS, "tp": tp, "ep": ep, "etp": etp}
        for topk, pad, mode in VARIANTS:
            case = {**base, "topk": topk, "pad": pad, "mode": mode}
            results[(name, topk, pad, mode)] = _versus_reference(rank, case)
        for pad in (True, False):
            off = cases.layer_vs_megatron(rank, WORLD, {**base, "topk": 2, "pad": pad})
            results[(name, "none", pad)] = off
        results[(name, "moved")] = _elements_moved(rank, {**base, "topk": 1, "mode": "ir+fr"})
    _use_layout(1, 1, 1)  # leave the groups run_distributed set up for its clean-up
    return results


@pytest.fixture(scope="module")
def grid() -> list[dict]:
    return run_distributed(allgather_grid, WORLD, timeout_s=300)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_allgather_layer_equals_the_spec_reference(grid: list[dict], layout: str) -> None:
    exercised = {"dropped": 0, "rectified": 0, "filled_in": 0, "collisions": 0}
    for topk, pad, mode in VARIANTS:
        per_rank = [results[(layout, topk, pad, mode)] for results in grid]
        for rank, result in enumerate(per_rank):
            tolerance = 2e-5 * max(1.0, result["scale"])
            for name, error in result["errors"].items():
                assert error < tolerance, f"{topk=} {pad=} {mode} rank {rank}: {name} off {error}"
            if pad:  # the pad contract: the router's map holds exactly C per expert column
                assert result["columns"] == [result["capacity"]] * EXPERTS, result["columns"]
            for key in exercised:
                exercised[key] += result[key]
        if "ir" in mode:
            assert sum(r["rectified"] for r in per_rank) > 0, (topk, pad, mode)
        else:
            assert sum(r["rectified"] for r in per_rank) == 0, (topk, pad, mode)
    assert exercised["dropped"] > 0 and exercised["filled_in"] > 0
    # some IR pair met a pair already in the map (kept, fill-in or padding): summed weights
    assert exercised["collisions"] > 0, exercised


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_allgather_rectification_off_is_bit_identical_to_megatron(
    grid: list[dict], layout: str
) -> None:
    for results in grid:
        for pad in (True, False):
            result = results[(layout, "none", pad)]
            assert result["types"] == ["RectifyMoELayer", "MoERectifyAllGatherTokenDispatcher"]
            assert all(result["identical"]), (pad, result["identical"])  # output, x, 3 grads


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_allgather_ir_moves_exactly_the_elements_of_vanilla_top_k(
    grid: list[dict], layout: str
) -> None:
    moved = [results[(layout, "moved")] for results in grid]
    for rank, counts in enumerate(moved):
        assert counts["rectify"] == counts["megatron"] > 0, f"rank {rank}: {counts}"
    assert sum(counts["rectified"] for counts in moved) > 0
