"""Static IR (``--moe-rectify-ir-capacity-factor``): the budget's size and ranking, and the
fixed-size side batch (its layout, and rows beyond the rescued tokens that carry nothing).

The layer against the loop reference is in ``test_moe_layer.py`` (one process) and
``tests/distributed/test_moe_layer_distributed.py`` (EP 2, expert-TP 2); the routing against the
reference on random inputs in ``test_routing_properties.py``; the host-sync count in
``test_bench_syncs.py``.
"""

from __future__ import annotations

import math

import pytest
import torch
from megatron.core.transformer.moe.moe_utils import get_capacity

from megatron.rectify.config import RectifyOptions
from megatron.rectify.intra_gpu_batch import IntraGpuSideBatch
from megatron.rectify.reference import reference_rectified_routing
from megatron.rectify.routing import intra_gpu_budget, intra_gpu_capacity, rectified_routing
from megatron.rectify.statistics import routing_statistics


@pytest.mark.parametrize(
    ("tokens", "topk", "experts", "factor"),
    [(24, 1, 4, 0.25), (256, 2, 8, 0.25), (100, 2, 6, 0.3), (7, 1, 3, 1.0), (1, 1, 8, 0.01)],
)
def test_the_budget_is_megatrons_capacity_formula(
    tokens: int, topk: int, experts: int, factor: float
) -> None:
    budget = intra_gpu_capacity(tokens, topk, experts, factor)
    assert budget == get_capacity(tokens * topk, experts, factor)
    assert budget == math.ceil(tokens * topk / experts * factor)


def test_the_budget_never_exceeds_the_tokens() -> None:
    assert intra_gpu_capacity(10, 2, 4, 5.0) == 10  # ceil(25) rows could only be padding
    assert intra_gpu_capacity(0, 2, 4, 0.5) == 0


def test_rows_go_to_the_most_lost_choices_then_the_highest_probability_then_the_lower_token():
    # Expert 0 gets five IR tokens, budget 3; expert 1 gets one.
    probs = torch.tensor(
        [
            [0.50, 0.1],  # t0: m=1
            [0.20, 0.1],  # t1: m=2, lower probability than t3
            [0.90, 0.1],  # t2: m=1, the best probability, but fewer lost choices
            [0.30, 0.1],  # t3: m=2
            [0.30, 0.1],  # t4: m=2, ties t3: the lower token (t3) ranks first
            [0.00, 0.7],  # t5: expert 1
            [0.99, 0.0],  # t6: not rescued by IR at all
        ]
    )
    ir_expert = torch.tensor([0, 0, 0, 0, 0, 1, -1])
    multiplicity = torch.tensor([1, 2, 1, 2, 2, 1, 0])
    slots = intra_gpu_budget(probs, ir_expert, multiplicity, capacity=3, topk=2)
    assert slots.tolist() == [-1, 2, -1, 0, 1, 0, -1]


def test_a_token_beyond_the_budget_is_weighted_as_if_ir_had_not_triggered() -> None:
    """Top-2, ignore_kth: both tokens keep their first choice and lose their second; the one
    beyond the budget keeps only its kept choice, renormalised (weight p/sg(p) = 1), and is
    counted; the one within gets the IR term."""
    probs = torch.tensor([[0.6, 0.3, 0.1, 0.0], [0.5, 0.4, 0.05, 0.05]]).requires_grad_()
    topk_indices = torch.tensor([[0, 1], [0, 1]])
    options = RectifyOptions(intra_gpu=True, ir_trigger="ignore_kth", ir_capacity_factor=0.5)
    # C = 1: expert 0 keeps t0 (p 0.6), expert 1 keeps t1 (0.4); IR sends both to expert 2 or 3
    # of this rank (local experts 2, 3): t0 -> 2, t1 -> 2 (tie 0.05 goes to the lower index).
    routing = rectified_routing(probs, topk_indices, 1, options, range(2, 4))
    reference = reference_rectified_routing(probs, topk_indices, 1, options, range(2, 4))
    assert routing.ir_capacity == 1  # ceil(2 * 2 / 4 * 0.5)
    assert routing.ir_expert.tolist() == reference.ir_expert.tolist() == [2, -1]
    assert routing.ir_over_budget.tolist() == [False, True]
    assert routing.probs[1].tolist() == [0.0, 1.0, 0.0, 0.0] and routing.ir_probs[1] == 0
    stats = routing_statistics(routing, topk=2)
    assert (int(stats.ir_over_budget), int(stats.rectified), int(stats.lost)) == (1, 1, 0)
    assert stats.as_percentages()["ir_over_budget_pct"] == 50.0


# ---- the side batch ------------------------------------------------------------------------

HIDDEN = 3
#: 6 tokens, 2 local experts (global 2 and 3), budget 3: expert 2 rescues t0 (row 0) and t3
#: (row 1), expert 3 rescues t2 (row 0) and t5 (row 1); one row of each is unused.
IR_EXPERT = [2, -1, 3, 2, -1, 3]
IR_SLOT = [0, -1, 0, 1, -1, 1]
BUDGET = 3
RECEIVED_PER_EXPERT = [2, 1]


def _side_batch_call(static: bool, poison_unused_rows: bool = False):
    """One call through the side batch with an 'expert' that weights each row's token by its
    gate weight and a per-expert factor; returns outputs and the gradients of every input."""
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(6, 1, HIDDEN, generator=gen).requires_grad_()
    rescued = torch.tensor(IR_EXPERT) >= 0
    ir_probs = (torch.rand(6, generator=gen) * rescued).requires_grad_()
    received = torch.randn(sum(RECEIVED_PER_EXPERT), HIDDEN, generator=gen).requires_grad_()
    received_probs = (torch.rand(received.shape[0], generator=gen) + 0.5).requires_grad_()
    base = torch.randn(6, 1, HIDDEN, generator=gen)

    side = IntraGpuSideBatch(local_expert_start=2, num_local_experts=2, expert_tp_group=None)
    side.split(
        hidden,
        torch.tensor(IR_EXPERT),
        ir_probs,
        torch.tensor(IR_SLOT) if static else None,
        BUDGET if static else None,
    )
    ir_tokens, ir_weights = side.gather()
    tokens, counts, weights = side.interleave(
        received, received_probs, torch.tensor(RECEIVED_PER_EXPERT), ir_tokens, ir_weights
    )
    factors = torch.cat([torch.full((int(n),), 1.0 + e) for e, n in enumerate(counts)])
    expert_output = tokens * weights.unsqueeze(1) * factors.unsqueeze(1)
    if poison_unused_rows:  # an expert output that is not finite on an unused row
        expert_output = torch.where(weights.unsqueeze(1) == 0, float("nan"), expert_output)
    received_output = side.separate(expert_output)
    output = side.add_home(base.clone())
    upstream = torch.randn(output.shape, generator=gen)
    upstream_received = torch.randn(received_output.shape, generator=gen)
    ((output * upstream).sum() + (received_output * upstream_received).sum()).backward()
    return {
        "counts": counts.tolist(),
        "tokens": tokens.detach(),
        "output": output.detach(),
        "received_output": received_output.detach(),
        "hidden_grad": hidden.grad,
        "ir_probs_grad": ir_probs.grad,
        "received_grad": received.grad,
        "received_probs_grad": received_probs.grad,
    }


def test_static_batch_has_budget_rows_per_expert_in_slot_order() -> None:
    static = _side_batch_call(static=True)
    dynamic = _side_batch_call(static=False)
    assert dynamic["counts"] == [2 + 2, 1 + 2]
    assert static["counts"] == [2 + BUDGET, 1 + BUDGET]
    # expert 2: [received 0, 1 | t0, t3, unused (token 0)], expert 3: [received 2 | t2, t5, unused]
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(6, 1, HIDDEN, generator=gen).squeeze(1)
    torch.rand(6, generator=gen)
    received = torch.randn(3, HIDDEN, generator=gen)
    expected = torch.stack(
        [received[0], received[1], hidden[0], hidden[3], hidden[0]]
        + [received[2], hidden[2], hidden[5], hidden[0]]
    )
    assert torch.equal(static["tokens"], expected)


def test_static_and_dynamic_batches_give_the_same_outputs_and_gradients() -> None:
    """Unused rows carry weight exactly 0: outputs and every gradient match the dynamic batch,
    which holds only the rescued tokens (same arithmetic per row, so exactly)."""
    static = _side_batch_call(static=True)
    dynamic = _side_batch_call(static=False)
    for name in ("output", "received_output", "hidden_grad", "ir_probs_grad"):
        assert torch.equal(static[name], dynamic[name]), name
    for name in ("received_grad", "received_probs_grad"):
        assert torch.equal(static[name], dynamic[name]), name
    assert torch.equal(static["ir_probs_grad"][[1, 4]], torch.zeros(2))  # never rescued


def test_unused_rows_add_nothing_even_when_the_expert_output_there_is_not_finite() -> None:
    poisoned = _side_batch_call(static=True, poison_unused_rows=True)
    clean = _side_batch_call(static=True)
    assert torch.isfinite(poisoned["output"]).all()
    assert torch.equal(poisoned["output"], clean["output"])
    assert torch.equal(poisoned["hidden_grad"], clean["hidden_grad"])
    assert torch.equal(poisoned["ir_probs_grad"], clean["ir_probs_grad"])
