"""Capacity-slot ranking for every score a router can produce, not only probabilities in [0, 1].

``slot_winners`` packs (choice tier, score, token) into one int64. The score part must sort like
the float32 value for any finite score of either sign (sqrt-softplus and scaled sigmoid scores
exceed 1, and used to spill into the tier bits once they reached 2.0), and NaN must follow a
rule that cannot reorder the other requests.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from megatron.rectify.config import RectifyOptions
from megatron.rectify.reference import reference_rectified_routing
from megatron.rectify.routing import ordered_score_key, rectified_routing, slot_winners

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
ONE_EXPERT_RANGE = range(0, 3)

float32s = st.floats(allow_nan=False, width=32)  # every finite float32, subnormals, +-inf


# ---- the two cases that were wrong (C = 1 slot per expert) ---------------------------------


def test_scores_above_two_do_not_promote_a_second_choice() -> None:
    """k=2, IR trigger all: expert 1 keeps token 1's FIRST choice (2.2) over token 0's second
    choice (2.5); token 1 is not rectified."""
    probs = torch.tensor([[3.0, 2.5, 0.0], [0.5, 2.2, 0.1]])
    topk_indices = probs.topk(2, dim=1).indices  # token 0: [0, 1], token 1: [1, 0]
    options = RectifyOptions.from_mode("ir", ir_trigger="all")
    routing = rectified_routing(probs, topk_indices, 1, options, ONE_EXPERT_RANGE)
    assert routing.kept_map[1, 1] and not routing.kept_map[0, 1]
    assert routing.kept_map[0, 0]
    assert routing.ir_expert.tolist() == [-1, -1]


def test_fill_in_vacancy_goes_to_the_higher_score_above_one() -> None:
    """k=1, FR next: expert 1 is vacant; both tokens' next choice is expert 1; token 0 (2.5)
    must get it, not token 1 (0.9)."""
    probs = torch.tensor([[3.0, 2.5, 0.0], [1.0, 0.9, 0.0]])
    topk_indices = probs.topk(1, dim=1).indices
    options = RectifyOptions.from_mode("fr", fill_in_candidates="next")
    routing = rectified_routing(probs, topk_indices, 1, options, ONE_EXPERT_RANGE)
    assert routing.fill_in_map[:, 1].tolist() == [True, False]


# ---- the key itself ------------------------------------------------------------------------


@SETTINGS
@given(a=float32s, b=float32s)
def test_ordered_score_key_sorts_like_the_float32_values(a: float, b: float) -> None:
    key_a, key_b = ordered_score_key(torch.tensor([a, b], dtype=torch.float32)).tolist()
    assert 0 <= key_a < 2**32 and 0 <= key_b < 2**32
    assert (key_a < key_b) == (a < b)
    assert (key_a == key_b) == (a == b)  # -0.0 == +0.0 share a key


def test_ordered_score_key_puts_nan_below_every_number() -> None:
    values = torch.tensor([float("nan"), float("-inf"), -3.0e38, -1e-45, 0.0, 1e-45, 7.0])
    keys = ordered_score_key(values).tolist()
    assert keys[0] == 0
    assert keys == sorted(keys) and len(set(keys)) == len(keys)


# ---- slot ranking against the loop reference over wide score ranges ----------------------


@st.composite
def wide_score_problems(draw: st.DrawFn) -> dict:
    num_experts = draw(st.integers(2, 6))
    topk = draw(st.integers(1, num_experts - 1))
    num_tokens = draw(st.integers(1, 16))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    magnitude = draw(st.sampled_from(["wide", "around_two", "tiny", "negative", "huge"]))
    base = torch.randn(num_tokens, num_experts, generator=gen)
    if magnitude == "wide":  # 1e-30 .. 1e30, either sign
        scores = base.sign() * torch.exp(torch.randn(base.shape, generator=gen) * 23.0)
    elif magnitude == "around_two":  # the old spill point
        scores = 2.0 + base * 0.5
    elif magnitude == "tiny":  # subnormal float32s
        scores = base.abs() * 1e-40
    elif magnitude == "negative":
        scores = -base.abs() * 10.0
    else:
        scores = base * 1e37
    if draw(st.booleans()):
        scores = scores.round()  # ties
    scores = scores.float()
    mode = draw(st.sampled_from(["ir", "fr", "ir+fr"]))
    options = RectifyOptions.from_mode(
        mode,
        ir_trigger="ignore_kth" if mode == "ir+fr" else draw(st.sampled_from(["all", "any"])),
        fill_in_candidates=draw(st.sampled_from(["next", "any"])),
        drop_policy=draw(st.sampled_from(["probs", "position"])),
    )
    topk_indices = torch.randperm(num_experts, generator=gen)[:topk].repeat(num_tokens, 1)
    if draw(st.booleans()):  # a score-ordered choice, as routers make
        topk_indices = scores.topk(topk, dim=1).indices
    return {
        "probs": scores,
        "topk_indices": topk_indices,
        "capacity": draw(st.integers(0, num_tokens)),
        "options": options,
        "local_experts": range(0, num_experts),
    }


@SETTINGS
@given(wide_score_problems())
def test_slot_ranking_equals_the_reference_for_any_finite_scores(problem: dict) -> None:
    args = (
        problem["probs"],
        problem["topk_indices"],
        problem["capacity"],
        problem["options"],
        problem["local_experts"],
    )
    fast = rectified_routing(*args)
    slow = reference_rectified_routing(*args)
    for name in ("kept_map", "fill_in_map", "dropped_map", "ir_expert"):
        assert torch.equal(getattr(fast, name), getattr(slow, name)), name


@SETTINGS
@given(wide_score_problems(), st.data())
def test_nan_scores_never_push_out_a_numeric_request(problem: dict, data: st.DataObject) -> None:
    """A NaN request ranks last within its tier: whenever it wins a slot, every numeric request
    of the same tier for that expert won one too; the result equals the reference."""
    probs = problem["probs"].clone()
    nan_mask = torch.tensor(
        data.draw(st.lists(st.booleans(), min_size=probs.numel(), max_size=probs.numel()))
    ).view(probs.shape)
    probs[nan_mask] = float("nan")
    topk_indices = problem["topk_indices"]
    topk = topk_indices.shape[1]
    won = slot_winners(probs, topk_indices, topk, problem["capacity"], "probs")
    request_is_nan = nan_mask.gather(1, topk_indices)
    for expert in range(probs.shape[1]):
        for tier in range(topk):
            asks = topk_indices[:, tier] == expert
            nan_won = (won[:, tier] & asks & request_is_nan[:, tier]).any()
            if nan_won:
                assert won[:, tier][asks & ~request_is_nan[:, tier]].all()
    options = RectifyOptions.from_mode("ir", ir_trigger="all")
    fast = rectified_routing(probs, topk_indices, problem["capacity"], options, range(0, 1))
    slow = reference_rectified_routing(
        probs, topk_indices, problem["capacity"], options, range(0, 1)
    )
    assert torch.equal(fast.kept_map, slow.kept_map)


# ---- the router with a score function whose scores pass 2 ----------------------------------


@pytest.mark.usefixtures("single_rank")
@pytest.mark.parametrize("mode", ["ir", "fr", "ir+fr"])
def test_sqrtsoftplus_router_equals_the_reference(mode: str) -> None:
    from megatron.rectify.config import RectifyTransformerConfig
    from megatron.rectify.router import RectifyRouter, full_score_distribution

    trigger = "ignore_kth" if mode == "ir+fr" else "all"
    config = RectifyTransformerConfig(
        num_layers=1,
        hidden_size=32,
        num_attention_heads=4,
        num_moe_experts=8,
        moe_router_topk=2,
        moe_router_score_function="sqrtsoftplus",
        moe_expert_capacity_factor=0.75,
        moe_router_load_balancing_type="none",
        moe_aux_loss_coeff=0.0,
        moe_rectify=mode,
        moe_rectify_ir_trigger=trigger,
        use_cpu_initialization=True,
    )
    torch.manual_seed(7)
    router = RectifyRouter(config)
    with torch.no_grad():
        router.weight.mul_(40.0)  # logits of several units: sqrt-softplus scores up to ~5
    x = torch.randn(48, 1, config.hidden_size)
    probs, routing_map = router(x)

    logits = x.view(-1, config.hidden_size) @ router.weight.detach().t()
    if router.bias is not None:
        logits = logits + router.bias.detach()
    p = full_score_distribution(logits, "sqrtsoftplus")
    assert p.max() > 2.5 and p.min() < 2.0  # scores straddle the old spill point
    topk_indices = p.topk(2, dim=1).indices
    options = RectifyOptions.from_mode(mode, ir_trigger=trigger)
    expected = reference_rectified_routing(
        p, topk_indices, router.last_routing.capacity, options, range(8)
    )
    decision = router.last_routing
    assert torch.equal(decision.kept_map, expected.kept_map)
    assert torch.equal(decision.fill_in_map, expected.fill_in_map)
    assert torch.equal(decision.ir_expert, expected.ir_expert)
    torch.testing.assert_close(probs.detach(), expected.probs.detach())
    assert decision.dropped_map.any()
    assert math.isfinite(float(probs.sum()))
