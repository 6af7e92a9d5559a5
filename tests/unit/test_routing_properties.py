"""Property tests: the vectorised routing against the loop reference, and the spec's invariants.

Inputs cover random shapes, k, E, capacities, heavy ties and extreme imbalance (all tokens on one
expert, zero tokens, one token, E = 1).
"""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from megatron.core.transformer.moe.moe_utils import apply_router_token_dropping, get_capacity

from megatron.rectify.config import RectifyOptions
from megatron.rectify.reference import reference_rectified_routing
from megatron.rectify.routing import (
    capacity_slot_assignment,
    fill_in_candidates,
    intra_gpu_capacity,
    rectified_routing,
    topk_indices_to_map,
)
from megatron.rectify.statistics import routing_statistics

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def routing_problems(draw: st.DrawFn) -> dict:
    num_experts = draw(st.integers(1, 8))
    topk = draw(st.integers(1, num_experts))
    num_tokens = draw(st.integers(0, 24))
    ep_size = draw(st.sampled_from([d for d in (1, 2, 4) if num_experts % d == 0]))
    ep_rank = draw(st.integers(0, ep_size - 1))
    local = num_experts // ep_size
    shape = draw(st.sampled_from(["random", "ties", "one_expert", "uniform"]))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(num_tokens, num_experts, generator=gen, dtype=torch.float64) * 3
    if shape == "ties":
        logits = logits.round()
    elif shape == "one_expert":
        logits[:, 0] += 50.0  # every token's first choice is expert 0
    elif shape == "uniform":
        logits = torch.zeros_like(logits)
    capacity_factor = draw(st.sampled_from([0.25, 0.5, 1.0, 1.5, 4.0]))
    mode = draw(st.sampled_from(["ir", "fr", "ir+fr"]))
    trigger = draw(st.sampled_from(["all", "ignore_kth"] + (["any"] if mode == "ir" else [])))
    options = RectifyOptions.from_mode(
        mode,
        ir_trigger=trigger,
        fill_in_candidates=draw(st.sampled_from(["next", "any"])),
        straight_through=draw(st.booleans()),
        drop_policy=draw(st.sampled_from(["probs", "position"])),
        # static IR (--moe-rectify-ir-capacity-factor): budgets that bind and ones that do not
        ir_capacity_factor=draw(st.sampled_from([None, 0.1, 0.5, 2.0])) if "ir" in mode else None,
    )
    return {
        "probs": logits.softmax(dim=-1),
        "topk": topk,
        "capacity": get_capacity(num_tokens * topk, num_experts, capacity_factor),
        "options": options,
        "local_experts": range(ep_rank * local, (ep_rank + 1) * local),
    }


def run(problem: dict, implementation=rectified_routing, probs: torch.Tensor | None = None):
    probs = problem["probs"] if probs is None else probs
    topk_indices = problem["probs"].topk(problem["topk"], dim=1).indices
    return implementation(
        probs, topk_indices, problem["capacity"], problem["options"], problem["local_experts"]
    )


@SETTINGS
@given(routing_problems())
def test_vectorised_routing_equals_the_loop_reference(problem: dict) -> None:
    probs = problem["probs"].clone().requires_grad_()
    fast = run(problem, rectified_routing, probs)
    slow = run(problem, reference_rectified_routing, probs)
    for name in ("routing_map", "kept_map", "fill_in_map", "dropped_map", "ir_expert"):
        assert torch.equal(getattr(fast, name), getattr(slow, name)), name
    assert fast.ir_capacity == slow.ir_capacity
    for name in ("ir_slot", "ir_over_budget"):  # static IR: the same rows for the same tokens
        fast_value, slow_value = getattr(fast, name), getattr(slow, name)
        assert (fast_value is None) == (slow_value is None), name
        assert fast_value is None or torch.equal(fast_value, slow_value), name
    torch.testing.assert_close(fast.probs, slow.probs, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fast.ir_probs, slow.ir_probs, rtol=1e-12, atol=1e-12)
    if probs.numel():
        gen = torch.Generator().manual_seed(0)
        upstream = torch.randn(probs.shape, generator=gen, dtype=probs.dtype)
        upstream_ir = torch.randn(probs.shape[0], generator=gen, dtype=probs.dtype)

        def grad_of(result) -> torch.Tensor:
            loss = (result.probs * upstream).sum() + (result.ir_probs * upstream_ir).sum()
            (grad,) = torch.autograd.grad(loss + 0 * probs.sum(), probs)
            return grad

        torch.testing.assert_close(grad_of(fast), grad_of(slow), rtol=1e-12, atol=1e-12)


@SETTINGS
@given(routing_problems())
def test_invariants(problem: dict) -> None:
    routing = run(problem)
    options: RectifyOptions = problem["options"]
    probs, capacity, topk = problem["probs"], problem["capacity"], problem["topk"]
    num_tokens, num_experts = probs.shape
    topk_map = topk_indices_to_map(probs.topk(topk, dim=1).indices, num_experts)

    # No expert over capacity on the all-to-all path.
    assert (routing.routing_map.sum(dim=0) <= capacity).all()
    # The maps partition as they should.
    assert not (routing.kept_map & routing.fill_in_map).any()
    assert torch.equal(routing.kept_map | routing.dropped_map, topk_map)
    assert not (routing.fill_in_map & topk_map).any()  # a fill-in never duplicates a request
    # No top-k token displaced by a fill-in: an expert that dropped a request got no fill-in.
    expert_dropped = routing.dropped_map.any(dim=0)
    assert not (routing.fill_in_map.any(dim=0) & expert_dropped).any()
    assert (routing.kept_map.sum(dim=0)[expert_dropped] == capacity).all()
    # Every padding slot filled before any candidate is discarded.
    if options.fill_in:
        candidates = topk_indices_to_map(
            fill_in_candidates(probs, probs.topk(topk, dim=1).indices, options.fill_in_candidates),
            num_experts,
        )
        unused_candidates = (candidates & ~routing.fill_in_map).any(dim=0)
        vacant = routing.routing_map.sum(dim=0) < capacity
        assert not (unused_candidates & vacant).any()
    else:
        assert not routing.fill_in_map.any()
    # IR: every triggered token rectified exactly once, to a local expert.
    rectified = routing.ir_expert >= 0
    if options.intra_gpu:
        lost_choices = routing.dropped_map.sum(dim=1)
        if options.ir_trigger == "all":
            should = (lost_choices == topk) & ~routing.fill_in_map.any(dim=1)
        else:
            should = lost_choices > 0
        local = problem["local_experts"]
        if options.ir_capacity_factor is None:
            assert routing.ir_over_budget is None and routing.ir_slot is None
            assert torch.equal(rectified, should)
            # No token silently lost: with dynamic IR, every token is computed by some expert.
            assert (routing.routing_map.any(dim=1) | rectified).all()
        else:
            _check_ir_budget(routing, should, probs, topk, local, options.ir_capacity_factor)
        assert (
            (routing.ir_expert[rectified] >= local.start)
            & (routing.ir_expert[rectified] < local.stop)
        ).all()
    else:
        assert not rectified.any()
    # Every token is routed (kept or filled in), IR-rescued, or counted as lost.
    stats = routing_statistics(routing, topk)
    assert int(stats.lost) == int((~routing.routed_map.any(dim=1) & ~rectified).sum())
    # Weights: zero off the routed pairs (padding never carries weight), finite, and each
    # computed token's weights sum to 1 (straight-through changes gradients, not values).
    assert not routing.probs[~routing.routing_map].any()
    assert not routing.ir_probs[~rectified].any()
    assert torch.isfinite(routing.probs).all() and torch.isfinite(routing.ir_probs).all()
    computed = routing.routing_map.any(dim=1) | rectified
    sums = routing.probs.sum(dim=1) + routing.ir_probs
    torch.testing.assert_close(sums[computed], torch.ones_like(sums[computed]))
    assert num_tokens == routing.routing_map.shape[0]


def _check_ir_budget(
    routing, should: torch.Tensor, probs: torch.Tensor, topk: int, local: range, factor: float
) -> None:
    """Static IR: each expert rescues at most B triggered tokens, fills its B rows before
    refusing one, gives each rescued token its own row, and every refusal is counted."""
    num_tokens, num_experts = probs.shape
    budget = intra_gpu_capacity(num_tokens, topk, num_experts, factor)
    assert routing.ir_capacity == budget
    rectified, over = routing.ir_expert >= 0, routing.ir_over_budget
    assert torch.equal(rectified | over, should) and not (rectified & over).any()
    destination = probs[:, local.start : local.stop].argmax(dim=1) + local.start
    assert torch.equal(routing.ir_expert[rectified], destination[rectified])
    assert torch.equal(routing.ir_slot >= 0, rectified)
    for expert in local:
        rows = routing.ir_slot[rectified & (routing.ir_expert == expert)]
        assert rows.numel() <= budget
        assert torch.equal(rows.sort().values, torch.arange(rows.numel()))
        if (over & (destination == expert)).any():
            assert rows.numel() == budget  # a token is refused only by a full expert
    assert int(routing_statistics(routing, topk).ir_over_budget) == int(over.sum())


@settings(max_examples=60, deadline=None)
@given(
    num_tokens=st.integers(1, 40),
    num_experts=st.integers(2, 8),  # E = 1 makes every probability 1.0: megatron's tie order
    capacity_factor=st.sampled_from([0.5, 1.0, 2.0]),
    seed=st.integers(0, 10_000),
)
def test_top1_truncation_equals_megatron_apply_router_token_dropping(
    num_tokens: int, num_experts: int, capacity_factor: float, seed: int
) -> None:
    """For top-1 with distinct probabilities our truncation is megatron's (probs policy).

    (With ties, megatron's ``topk`` order is unspecified while ours goes to the lower token.)
    """
    gen = torch.Generator().manual_seed(seed)
    probs = torch.randn(num_tokens, num_experts, generator=gen).softmax(dim=-1)
    top_p, top_i = probs.topk(1, dim=1)
    sparse_probs = torch.zeros_like(probs).scatter(1, top_i, top_p)
    routing_map = topk_indices_to_map(top_i, num_experts)
    _, megatron_map = apply_router_token_dropping(
        sparse_probs, routing_map, router_topk=1, capacity_factor=capacity_factor
    )
    capacity = get_capacity(num_tokens, num_experts, capacity_factor)
    kept, _ = capacity_slot_assignment(probs, top_i, capacity, "probs")
    assert torch.equal(kept, megatron_map)
