"""The rectified allgather dispatcher in one process: the IR-pair merge, the layer against the
spec reference and against megatron's own allgather layer (the gloo grid over TP / EP /
expert-TP is ``tests/distributed/test_allgather_dispatcher_distributed.py``)."""

from __future__ import annotations

import moe_layer_cases as cases
import pytest
import torch

from megatron.rectify.allgather_dispatcher import (
    MoERectifyAllGatherTokenDispatcher,
    with_intra_gpu_pairs,
)


def test_ir_pairs_join_the_map_and_their_weights_add_up() -> None:
    routing_map = torch.tensor([[1, 0, 0], [0, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=torch.bool)
    probs = torch.tensor(
        [[0.7, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.4, 0.0], [0.0, 0.0, 0.0]],
        requires_grad=True,
    )
    ir_expert = torch.tensor([-1, 2, 1, 0])  # none; a new pair; onto a kept pair; onto padding
    ir_probs = torch.tensor([0.0, 0.9, 0.6, 1.0], requires_grad=True)
    merged_map, merged_probs = with_intra_gpu_pairs(routing_map, probs, ir_expert, ir_probs)
    expected_map = [[1, 0, 0], [0, 0, 1], [0, 1, 0], [1, 0, 1]]
    assert merged_map.tolist() == [[bool(v) for v in row] for row in expected_map]
    expected = [[0.7, 0.0, 0.0], [0.0, 0.0, 0.9], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]
    assert torch.equal(merged_probs.detach(), torch.tensor(expected))
    assert torch.equal(merged_probs[0], probs[0])  # rows without IR are untouched
    upstream = torch.arange(12.0).view(4, 3)
    (merged_probs * upstream).sum().backward()
    assert torch.equal(probs.grad, upstream)
    assert ir_probs.grad.tolist() == [0.0, 5.0, 7.0, 9.0]  # the IR pair's upstream, none for -1


@pytest.mark.usefixtures("single_rank")
@pytest.mark.parametrize(
    "case",
    [
        pytest.param({"topk": 1, "mode": "ir+fr"}, id="top1-pad-ir+fr"),
        pytest.param({"topk": 2, "mode": "ir", "pad": False}, id="top2-nopad-ir"),
        pytest.param({"topk": 2, "mode": "fr"}, id="top2-pad-fr"),
        # static IR: the tokens beyond the IR budget have ir_expert -1, so no IR pair here either
        pytest.param(
            {"topk": 2, "mode": "ir", "pad": False, "ir_capacity_factor": 0.1},
            id="top2-nopad-static-ir-over-budget",
        ),
    ],
)
def test_single_process_allgather_layer_equals_reference(case: dict) -> None:
    case = {"experts": 4, "dispatcher": "allgather", **case}
    layer = cases.build_layer(cases.make_config(case, 1))
    assert isinstance(layer.token_dispatcher, MoERectifyAllGatherTokenDispatcher)
    result = cases.layer_vs_reference(0, 1, case)
    for name in ("output", "x_grad", "fc1", "fc2", "router"):
        assert result[name] < 2e-5 * max(1.0, result["scale"]), (name, result)
    assert result["dropped"] > 0
    assert (result["rectified"] > 0) == ("ir" in case["mode"])
    if "ir_capacity_factor" in case:
        assert result["ir_over_budget"] > 0


@pytest.mark.usefixtures("single_rank")
def test_rectification_off_is_megatrons_allgather_layer() -> None:
    result = cases.layer_vs_megatron(0, 1, {"experts": 4, "topk": 2, "dispatcher": "allgather"})
    assert result["types"] == ["RectifyMoELayer", "MoERectifyAllGatherTokenDispatcher"]
    assert all(result["identical"]), result["identical"]
