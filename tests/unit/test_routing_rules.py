"""Hand-worked examples, one per rule of docs/routing.md, for the pure routing math."""

from __future__ import annotations

import pytest
import torch

from megatron.rectify.config import RectifyOptions
from megatron.rectify.routing import (
    capacity_slot_assignment,
    fill_in_candidates,
    intra_gpu_rectification,
    rectified_gate_weights,
    rectified_routing,
    topk_indices_to_map,
)
from megatron.rectify.statistics import routing_statistics


def pairs(bool_map: torch.Tensor) -> set[tuple[int, int]]:
    return {(int(t), int(e)) for t, e in bool_map.nonzero().tolist()}


# --- capacity truncation -------------------------------------------------------------------------


def test_probs_policy_keeps_the_highest_probabilities() -> None:
    # 4 tokens all choose expert 0; capacity 2 keeps tokens 1 and 3 (the two highest p).
    probs = torch.tensor([[0.6, 0.4], [0.9, 0.1], [0.55, 0.45], [0.7, 0.3]])
    topk = torch.zeros(4, 1, dtype=torch.long)
    kept, fill = capacity_slot_assignment(probs, topk, capacity=2, drop_policy="probs")
    assert pairs(kept) == {(1, 0), (3, 0)}
    assert not fill.any()


def test_position_policy_keeps_the_earliest_tokens() -> None:
    probs = torch.tensor([[0.6, 0.4], [0.9, 0.1], [0.55, 0.45], [0.7, 0.3]])
    topk = torch.zeros(4, 1, dtype=torch.long)
    kept, _ = capacity_slot_assignment(probs, topk, capacity=2, drop_policy="position")
    assert pairs(kept) == {(0, 0), (1, 0)}


def test_first_choices_are_placed_before_second_choices() -> None:
    # Token 0's second choice (p=0.45) beats token 1's first choice (p=0.40) on probability,
    # but first choices are placed first: expert 1's single slot goes to token 1.
    probs = torch.tensor([[0.50, 0.45, 0.05], [0.30, 0.40, 0.30]])
    topk = torch.tensor([[0, 1], [1, 0]])
    kept, _ = capacity_slot_assignment(probs, topk, capacity=1, drop_policy="probs")
    assert (1, 1) in pairs(kept) and (0, 1) not in pairs(kept)
    assert (0, 0) in pairs(kept) and (1, 0) not in pairs(kept)


def test_equal_probabilities_go_to_the_lower_token_index() -> None:
    probs = torch.full((5, 2), 0.5)
    topk = torch.ones(5, 1, dtype=torch.long)
    kept, _ = capacity_slot_assignment(probs, topk, capacity=3, drop_policy="probs")
    assert pairs(kept) == {(0, 1), (1, 1), (2, 1)}


def test_capacity_zero_and_no_tokens() -> None:
    probs = torch.rand(3, 4).softmax(-1)
    topk = probs.topk(2, dim=1).indices
    kept, fill = capacity_slot_assignment(probs, topk, capacity=0)
    assert not kept.any() and not fill.any()
    kept, fill = capacity_slot_assignment(torch.zeros(0, 4), torch.zeros(0, 2, dtype=torch.long), 5)
    assert kept.shape == (0, 4) and fill.shape == (0, 4)


# --- fill-in rectification -----------------------------------------------------------------------


def test_fill_in_takes_vacancies_with_the_best_next_choices() -> None:
    # Top-1: tokens 0,1,2 choose expert 0; token 3 chooses expert 1. Capacity 2.
    # Expert 0 drops token 2 (lowest p); expert 1 has one vacancy. Next choices: tokens 0,1,2 ->
    # expert 1, token 3 -> expert 0 (full). Expert 1's vacancy goes to the candidate with the
    # highest p for expert 1: token 2 (0.35) over token 0 (0.30) and token 1 (0.20).
    probs = torch.tensor(
        [[0.60, 0.30, 0.10], [0.70, 0.20, 0.10], [0.50, 0.35, 0.15], [0.30, 0.50, 0.20]]
    )
    topk = probs.topk(1, dim=1).indices
    candidates = fill_in_candidates(probs, topk, "next")
    assert pairs(topk_indices_to_map(candidates, 3)) == {(0, 1), (1, 1), (2, 1), (3, 0)}
    kept, fill = capacity_slot_assignment(probs, topk, 2, "probs", candidates)
    assert pairs(kept) == {(0, 0), (1, 0), (3, 1)}
    assert pairs(fill) == {(2, 1)}


def test_fill_in_never_displaces_a_top_k_token() -> None:
    # Expert 0 is requested by 2 tokens with tiny p; a candidate with huge p for expert 0 still
    # cannot take their slots (capacity 2, no vacancy).
    probs = torch.tensor([[0.30, 0.70], [0.30, 0.70], [0.01, 0.99]])
    topk = torch.tensor([[0], [0], [1]])
    candidates = fill_in_candidates(probs, topk, "any")
    kept, fill = capacity_slot_assignment(probs, topk, 2, "probs", candidates)
    assert pairs(kept) == {(0, 0), (1, 0), (2, 1)}
    assert pairs(fill) == {(0, 1)}  # expert 1 has one vacancy; the tie goes to token 0


def test_fill_in_candidates_next_excludes_deeper_choices() -> None:
    probs = torch.tensor([[0.5, 0.3, 0.2]])
    topk = torch.tensor([[0]])
    assert fill_in_candidates(probs, topk, "next").tolist() == [[1]]
    assert fill_in_candidates(probs, topk, "any").tolist() == [[1, 2]]  # best first
    assert fill_in_candidates(probs, torch.tensor([[0, 1, 2]]), "next").shape == (1, 0)


def test_fill_in_under_position_policy_still_ranks_candidates_by_probability() -> None:
    probs = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.7, 0.3]])
    topk = torch.zeros(3, 1, dtype=torch.long)
    candidates = fill_in_candidates(probs, topk, "next")
    kept, fill = capacity_slot_assignment(probs, topk, 2, "position", candidates)
    assert pairs(kept) == {(0, 0), (1, 0)}
    assert pairs(fill) == {(1, 1), (2, 1)}  # two vacancies at expert 1, best first


# --- intra-GPU rectification ---------------------------------------------------------------------


def test_ir_sends_a_dropped_token_to_its_best_local_expert_by_global_probability() -> None:
    # 4 experts, this rank holds experts 2 and 3. Token 1 is dropped by expert 0; among local
    # experts its global p is higher for expert 3 (0.25 > 0.05).
    probs = torch.tensor([[0.6, 0.2, 0.1, 0.1], [0.5, 0.2, 0.05, 0.25]])
    topk = torch.tensor([[0], [0]])
    kept, fill = capacity_slot_assignment(probs, topk, capacity=1)
    ir_expert, multiplicity = intra_gpu_rectification(
        probs, kept.sum(dim=1), fill.any(dim=1), 1, range(2, 4), "all"
    )
    assert ir_expert.tolist() == [-1, 3]
    assert multiplicity.tolist() == [0, 1]


@pytest.mark.parametrize(
    ("trigger", "expected"), [("all", [-1, -1, 0]), ("any", [-1, 0, 0]), ("ignore_kth", [-1, 0, 0])]
)
def test_ir_triggers_for_top_2(trigger: str, expected: list[int]) -> None:
    # kept: token 0 both choices, token 1 one of two, token 2 none.
    kept = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]], dtype=torch.bool)
    fill = torch.zeros_like(kept)
    probs = torch.tensor([[0.5, 0.3, 0.2]] * 3)
    ir_expert, multiplicity = intra_gpu_rectification(
        probs, kept.sum(dim=1), fill.any(dim=1), 2, range(0, 1), trigger
    )
    assert ir_expert.tolist() == expected
    lost = [0, 1, 2]
    assert multiplicity.tolist() == [0 if e < 0 else m for e, m in zip(expected, lost, strict=True)]


def test_an_unknown_ir_trigger_is_refused_by_the_math_and_the_reference() -> None:
    from megatron.rectify.reference import reference_rectified_routing

    probs = torch.tensor([[0.5, 0.3, 0.2]] * 3)
    kept = torch.zeros(3, dtype=torch.long)
    with pytest.raises(ValueError, match="unknown IR trigger"):
        intra_gpu_rectification(probs, kept, kept.bool(), 1, range(3), "most")
    options = RectifyOptions(intra_gpu=True)
    object.__setattr__(options, "ir_trigger", "most")  # past the options' own validation
    topk_indices = torch.zeros(3, 1, dtype=torch.long)
    with pytest.raises(ValueError, match="unknown IR trigger"):
        reference_rectified_routing(probs, topk_indices, 1, options, range(3))


def test_ir_trigger_all_is_not_fired_by_a_token_that_won_a_fill_in_slot() -> None:
    kept = torch.tensor([[0, 0, 0]], dtype=torch.bool)
    fill = torch.tensor([[0, 0, 1]], dtype=torch.bool)
    probs = torch.tensor([[0.5, 0.3, 0.2]])
    kept_count, won_fill_in = kept.sum(dim=1), fill.any(dim=1)
    ir_expert, _ = intra_gpu_rectification(probs, kept_count, won_fill_in, 1, range(3), "all")
    assert ir_expert.tolist() == [-1]
    ir_expert, _ = intra_gpu_rectification(
        probs, kept_count, won_fill_in, 1, range(3), "ignore_kth"
    )
    assert ir_expert.tolist() == [0]


def test_ir_has_no_capacity_limit() -> None:
    probs = torch.tensor([[0.9, 0.05, 0.05]] * 6)
    topk = torch.zeros(6, 1, dtype=torch.long)
    options = RectifyOptions(intra_gpu=True)
    routing = rectified_routing(probs, topk, 1, options, local_experts=range(1, 3))
    assert int(routing.kept_map.sum()) == 1
    assert (routing.ir_expert[1:] == 1).all()  # five dropped tokens, all on expert 1


# --- gate weights -------------------------------------------------------------------------------


def gate_weights(probs, routing_map, ir_expert, multiplicity, **kwargs):
    """``rectified_gate_weights`` with every expert listed as a request and ``routing_map`` won."""
    every_expert = torch.arange(probs.shape[1]).expand(probs.shape[0], -1)
    return rectified_gate_weights(
        probs, every_expert, routing_map, ir_expert, multiplicity, **kwargs
    )


def test_top2_weights_with_one_lost_choice_follow_the_spec_formula() -> None:
    # Token keeps expert 0 (p=0.5), loses expert 1, IR to expert 2 (p=0.2), m = 1.
    probs = torch.tensor([[0.5, 0.3, 0.2]], dtype=torch.float64, requires_grad=True)
    routing_map = torch.tensor([[True, False, False]])
    weights, ir_weights = gate_weights(
        probs, routing_map, torch.tensor([2]), torch.tensor([1]), topk=2
    )
    assert torch.allclose(weights, torch.tensor([[0.5 / 0.7, 0.0, 0.0]], dtype=torch.float64))
    assert torch.allclose(ir_weights, torch.tensor([0.2 / 0.7], dtype=torch.float64))


def test_multiplicity_scales_the_ir_term() -> None:
    # Top-2, both choices lost: y = 2 p_h E_h / sg(2 p_h) -> forward weight 1.
    probs = torch.tensor([[0.5, 0.3, 0.2]], dtype=torch.float64)
    weights, ir_weights = gate_weights(
        probs, torch.zeros(1, 3, dtype=torch.bool), torch.tensor([2]), torch.tensor([2]), topk=2
    )
    assert not weights.any()
    assert ir_weights.tolist() == [1.0]


def test_top1_single_term_weight_is_one_with_gradient_of_p() -> None:
    probs = torch.tensor([[0.25, 0.75]], requires_grad=True)
    routing_map = torch.tensor([[False, True]])
    weights, _ = gate_weights(probs, routing_map, torch.tensor([-1]), torch.tensor([0]), topk=1)
    assert weights.tolist() == [[0.0, 1.0]]  # exactly 1.0
    (grad,) = torch.autograd.grad(weights[0, 1], probs)
    assert grad.tolist() == [[0.0, 1.0]]  # d(1 + p - sg(p))/dp = 1


def test_straight_through_keeps_router_gradient_alive_and_plain_normalisation_kills_it() -> None:
    """The spec's 'gradient vanishing': one surviving top-2 choice has weight p/p = 1."""
    probs = torch.tensor([[0.5, 0.3, 0.2]], dtype=torch.float64, requires_grad=True)
    routing_map = torch.tensor([[True, False, False]])
    no_ir = torch.tensor([-1])
    plain, _ = gate_weights(
        probs, routing_map, no_ir, torch.tensor([0]), topk=2, straight_through=False
    )
    (plain_grad,) = torch.autograd.grad(plain.sum(), probs)
    assert plain.sum().item() == 1.0 and plain_grad.abs().max().item() == 0.0
    straight, _ = gate_weights(
        probs, routing_map, no_ir, torch.tensor([0]), topk=2, straight_through=True
    )
    (st_grad,) = torch.autograd.grad(straight.sum(), probs)
    assert straight.sum().item() == 1.0
    assert torch.allclose(st_grad, torch.tensor([[1 / 0.5, 0.0, 0.0]], dtype=torch.float64))


def test_scaling_factor_multiplies_every_weight() -> None:
    probs = torch.tensor([[0.5, 0.3, 0.2]])
    routing_map = torch.tensor([[True, True, False]])
    weights, _ = gate_weights(
        probs, routing_map, torch.tensor([-1]), torch.tensor([0]), topk=2, scaling_factor=2.5
    )
    assert torch.allclose(weights, torch.tensor([[2.5 * 0.5 / 0.8, 2.5 * 0.3 / 0.8, 0.0]]))


# --- the whole decision --------------------------------------------------------------------------


def test_ir_plus_fr_end_to_end_example_and_statistics() -> None:
    # 4 experts over 2 ranks; this rank owns experts 0 and 1. Top-1, capacity 1.
    probs = torch.tensor(
        [
            [0.70, 0.10, 0.15, 0.05],  # -> e0 kept
            [0.60, 0.05, 0.30, 0.05],  # -> e0 dropped; next choice e2 (vacant) -> fill-in
            [0.55, 0.25, 0.10, 0.10],  # -> e0 dropped; next e1 taken -> IR to e0 (best local p)
            [0.10, 0.60, 0.20, 0.10],  # -> e1 kept
        ]
    )
    topk = probs.topk(1, dim=1).indices
    options = RectifyOptions(intra_gpu=True, fill_in=True, ir_trigger="all")
    routing = rectified_routing(probs, topk, 1, options, local_experts=range(0, 2))
    assert pairs(routing.kept_map) == {(0, 0), (3, 1)}
    assert pairs(routing.fill_in_map) == {(1, 2)}
    assert routing.ir_expert.tolist() == [-1, -1, 0, -1]  # IR has no capacity limit
    assert routing.probs[1, 2].item() == 1.0 and routing.ir_probs[2].item() == 1.0
    stats = routing_statistics(routing, topk=1)
    assert (int(stats.dropped), int(stats.filled_in), int(stats.rectified)) == (2, 1, 1)
    assert int(stats.lost) == 0 and int(stats.padded) == 1  # expert 3's slot stays empty
    assert stats.expert_load.tolist() == [2, 1, 1, 0]
    rates = stats.as_percentages()
    assert rates["dropped_pct"] == 50.0 and rates["padded_pct"] == 25.0


def test_topk_indices_to_map() -> None:
    assert pairs(topk_indices_to_map(torch.tensor([[2, 0]]), 3)) == {(0, 0), (0, 2)}
