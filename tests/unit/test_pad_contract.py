"""Padding to capacity: the dispatched map holds exactly ``C`` tokens per expert (issue 16, item 5).

megatron's alltoall dispatcher with ``--moe-pad-expert-input-to-capacity`` sizes every expert
buffer as ``C`` rows and assumes every ``routing_map`` column holds exactly ``C`` entries. The
rectified map used to hold *at most* ``C``: megatron's unfused permute tolerates that by accident,
TE's fused permute (``--moe-permute-fusion``) packs the columns back to back and hands tokens to
the wrong experts. These tests pin the contract for every mode, check that padding pairs are
invisible (weight 0, gradient 0, not in any statistic, expert-bias count or IR trigger), and
show the wrong-expert bug on a CPU re-implementation of the fused packing.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from megatron.core.transformer.moe.moe_utils import get_capacity, permute, unpermute

from megatron.rectify.config import RectifyConfigError, RectifyOptions, RectifyTransformerConfig
from megatron.rectify.reference import reference_rectified_routing
from megatron.rectify.routing import RectifiedRouting, capacity_padding, rectified_routing
from megatron.rectify.statistics import routing_statistics

NUM_TOKENS, NUM_EXPERTS, CAPACITY_FACTOR = 24, 6, 0.75
# Skewed router: experts 0/1 overflow (drops, IR work), experts 4/5 stay short (vacancies).
EXPERT_BIAS = torch.tensor([2.0, 1.5, 0.5, 0.0, -1.0, -1.5])


def _options(mode: str, topk: int, drop_policy: str, candidates: str) -> RectifyOptions:
    trigger = "ignore_kth" if mode == "ir+fr" else ("all" if topk == 1 else "any")
    return RectifyOptions.from_mode(
        mode, ir_trigger=trigger, drop_policy=drop_policy, fill_in_candidates=candidates
    )


CASES = [
    pytest.param(mode, topk, policy, candidates, id=f"{mode}-top{topk}-{policy}-{candidates}")
    for mode in ("none", "ir", "fr", "ir+fr")
    for topk in (1, 2)
    for policy in ("probs", "position")
    for candidates in (("next", "any") if "fr" in mode else ("next",))
]


def _inputs(seed: int = 0, bias: torch.Tensor = EXPERT_BIAS) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(NUM_TOKENS, NUM_EXPERTS, generator=gen) + bias).requires_grad_()


def _route(logits: torch.Tensor, options: RectifyOptions, topk: int, pad: bool, impl=None):
    probs = torch.softmax(logits, dim=-1)
    topk_indices = probs.detach().topk(topk, dim=1).indices
    capacity = get_capacity(NUM_TOKENS * topk, NUM_EXPERTS, CAPACITY_FACTOR)
    local = range(0, NUM_EXPERTS // 2)  # EP=2 view: IR may only use experts 0-2
    route = impl or rectified_routing
    return route(probs, topk_indices, capacity, options, local, pad_to_capacity=pad)


def _lowest_free_tokens(routed_map: torch.Tensor, capacity: int) -> torch.Tensor:
    """The padding rule, written out per column."""
    expected = torch.zeros_like(routed_map)
    for expert in range(routed_map.shape[1]):
        free = (~routed_map[:, expert]).nonzero().flatten()
        vacancies = capacity - int(routed_map[:, expert].sum())
        expected[free[:vacancies], expert] = True
    return expected


def _grad(decision: RectifiedRouting, logits: torch.Tensor, upstream: torch.Tensor):
    loss = (decision.probs * upstream).sum() + (decision.ir_probs * upstream[:, 0]).sum()
    return torch.autograd.grad(loss, logits, retain_graph=True)[0]


@pytest.mark.parametrize(("mode", "topk", "drop_policy", "candidates"), CASES)
def test_pad_contract_holds_in_every_mode(
    mode: str, topk: int, drop_policy: str, candidates: str
) -> None:
    options = _options(mode, topk, drop_policy, candidates)
    logits = _inputs()
    padded = _route(logits, options, topk, pad=True)
    plain = _route(logits, options, topk, pad=False)
    capacity = padded.capacity
    assert capacity < NUM_TOKENS

    # Without padding: at most C per column, no padding pairs, dispatch map == routed map.
    assert (plain.routing_map.sum(dim=0) <= capacity).all()
    assert not plain.padding_map.any()
    assert torch.equal(plain.routing_map, plain.routed_map)
    # With padding: exactly C per column; padding is disjoint from the routed pairs.
    assert torch.equal(padded.routing_map.sum(dim=0), torch.full((NUM_EXPERTS,), capacity))
    assert torch.equal(padded.routing_map, padded.routed_map | padded.padding_map)
    assert not (padded.padding_map & padded.routed_map).any()
    vacant = padded.routed_map.sum(dim=0) < capacity
    assert bool(padded.padding_map.any()) == bool(vacant.any())
    if not options.fill_in:
        assert vacant.any()  # the case leaves slots to pad (FR may fill them all)
    assert torch.equal(padded.padding_map, _lowest_free_tokens(padded.routed_map, capacity))

    # Padding changes nothing else: slots, IR (so its triggers), weights.
    for name in ("kept_map", "fill_in_map", "dropped_map", "ir_expert", "probs", "ir_probs"):
        assert torch.equal(getattr(padded, name), getattr(plain, name)), name
    # Padding weights are exactly 0 and pass no gradient, whatever gradient reaches them.
    assert not padded.probs[padded.padding_map].any()
    upstream = torch.linspace(-1.0, 2.0, NUM_TOKENS * NUM_EXPERTS).view(NUM_TOKENS, NUM_EXPERTS)
    grad = _grad(padded, logits, upstream)
    assert torch.equal(grad, _grad(padded, logits, upstream * ~padded.padding_map))
    assert torch.equal(grad, _grad(plain, logits, upstream))

    # Statistics never count padding as routed: identical with and without padding.
    stats, plain_stats = routing_statistics(padded, topk), routing_statistics(plain, topk)
    for field in dataclasses.fields(stats):
        a, b = getattr(stats, field.name), getattr(plain_stats, field.name)
        assert torch.equal(torch.as_tensor(a), torch.as_tensor(b)), field.name
    assert int(stats.padded) == int(padded.padding_map.sum())
    assert int(stats.occupied) == int(padded.routed_map.sum())

    # The loop reference pads the same pairs.
    expected = _route(logits, options, topk, pad=True, impl=reference_rectified_routing)
    for name in ("routing_map", "padding_map", "kept_map", "fill_in_map", "dropped_map"):
        assert torch.equal(getattr(padded, name), getattr(expected, name)), name
    assert torch.equal(padded.ir_expert, expected.ir_expert)
    torch.testing.assert_close(padded.probs, expected.probs)


def test_capacity_padding_refuses_more_slots_than_tokens() -> None:
    with pytest.raises(ValueError, match="capacity 5"):
        capacity_padding(torch.zeros(4, 2, dtype=torch.bool), 5)
    full = capacity_padding(torch.zeros(4, 2, dtype=torch.bool), 4)
    assert full.all()  # C == T: every token in every column


# ---- TE's fused permute, on the CPU -------------------------------------------------------


def fused_permute_emulation(
    tokens: torch.Tensor, routing_map: torch.Tensor, probs: torch.Tensor, num_out_tokens: int
):
    """TE's mask-map permute (``moe_permute_with_probs``), as its row-id map defines it.

    Row of pair (t, e) = (entries of all experts before e) + (rank of t in column e): every
    column is packed right after the previous one, with as many rows as it has entries; rows
    at or beyond ``num_out_tokens`` are dropped. No per-expert padding: the kernel trusts the
    map's column counts. Returns the permuted tokens and probs and the [T, E] row ids (-1 off
    the map).
    """
    counts = routing_map.sum(dim=0)
    column_start = counts.cumsum(0) - counts
    rank_in_column = routing_map.long().cumsum(dim=0) - 1
    row_id = torch.where(routing_map, column_start + rank_in_column, -1)
    permuted = torch.zeros(num_out_tokens, tokens.shape[1], dtype=tokens.dtype)
    permuted_probs = torch.zeros(num_out_tokens, dtype=probs.dtype)
    token, expert = (routing_map & (row_id < num_out_tokens)).nonzero(as_tuple=True)
    permuted[row_id[token, expert]] = tokens[token]
    permuted_probs[row_id[token, expert]] = probs[token, expert]
    return permuted, permuted_probs, row_id


def padded_dispatch_through_fused_permute(x, routing_map, probs, capacity, weights):
    """megatron's padded alltoall path with ``--moe-permute-fusion`` (EP = 1): fused permute with
    ``num_out_tokens = E * C``, experts each take their ``C``-row buffer, probs applied in the
    expert, fused unpermute sums each pair's row back into its token."""
    num_experts = routing_map.shape[1]
    permuted, permuted_probs, row_id = fused_permute_emulation(
        x, routing_map, probs, num_experts * capacity
    )
    expert_of_row = torch.arange(num_experts * capacity) // capacity  # C rows per expert
    expert_out = torch.einsum("rij,rj->ri", weights[expert_of_row], permuted)
    expert_out = expert_out * permuted_probs.unsqueeze(1)
    y = torch.zeros_like(x)
    token, expert = (row_id >= 0).nonzero(as_tuple=True)
    return y.index_add(0, token, expert_out[row_id[token, expert]])


def padded_dispatch_through_unfused_permute(x, routing_map, probs, capacity, weights):
    """The same path with megatron's own (unfused) drop-and-pad permute / unpermute."""
    num_experts = routing_map.shape[1]
    permuted, permuted_probs, sorted_indices, _, _ = permute(
        x, routing_map, probs=probs, num_out_tokens=num_experts * capacity, drop_and_pad=True
    )
    expert_of_row = torch.arange(num_experts * capacity) // capacity
    expert_out = torch.einsum("rij,rj->ri", weights[expert_of_row], permuted)
    expert_out = expert_out * permuted_probs.unsqueeze(1)
    y = unpermute(expert_out, sorted_indices, x.shape, routing_map=routing_map, drop_and_pad=True)
    return y, sorted_indices


@pytest.mark.parametrize("mode", ["ir", "fr", "ir+fr"])
@pytest.mark.parametrize("topk", [1, 2])
def test_fused_permute_needs_exactly_c_per_column(mode: str, topk: int) -> None:
    """Yesterday's map (routed pairs only, at most C) puts tokens on the wrong experts under
    the fused packing; the padded map gives the direct per-expert result."""
    options = _options(mode, topk, "probs", "next")
    logits = _inputs(seed=3, bias=EXPERT_BIAS.flip(0))  # early experts short, late ones full
    decision = _route(logits, options, topk, pad=True)
    capacity = decision.capacity
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(NUM_TOKENS, 5, generator=gen)
    weights = torch.randn(NUM_EXPERTS, 5, 5, generator=gen)  # toy linear "expert" per expert
    probs = decision.probs.detach()
    old_map = decision.routed_map  # what the router dispatched before the fix
    new_map = decision.routing_map
    counts = old_map.sum(dim=0)
    # Precondition: a short column with a non-empty column after it (the packing shifts it).
    assert any(counts[e] < capacity and counts[e + 1 :].any() for e in range(NUM_EXPERTS))

    # Direct reference: y_t = sum over routed pairs of w_te * W_e x_t (IR tokens aside).
    direct = torch.einsum("te,eij,tj->ti", probs * old_map, weights, x)

    fused_old = padded_dispatch_through_fused_permute(x, old_map, probs, capacity, weights)
    fused_new = padded_dispatch_through_fused_permute(x, new_map, probs, capacity, weights)
    assert not torch.allclose(fused_old, direct, atol=1e-4)  # the silent wrong result
    torch.testing.assert_close(fused_new, direct)

    # megatron's unfused permute: right with both maps, and each expert buffer holds the very
    # same tokens (the padding rule is what its sort already took), only now in token order.
    unfused_old, rows_old = padded_dispatch_through_unfused_permute(
        x, old_map, probs, capacity, weights
    )
    unfused_new, rows_new = padded_dispatch_through_unfused_permute(
        x, new_map, probs, capacity, weights
    )
    torch.testing.assert_close(unfused_old, direct)
    torch.testing.assert_close(unfused_new, direct)
    per_expert = (NUM_EXPERTS, capacity)
    assert torch.equal(
        rows_old.view(per_expert).sort().values, rows_new.view(per_expert).sort().values
    )


# ---- router and layer: what the dispatcher receives ----------------------------------------

ROUTER_BASE = dict(
    num_layers=1,
    hidden_size=32,
    num_attention_heads=4,
    num_moe_experts=8,
    moe_router_topk=2,
    moe_expert_capacity_factor=0.5,
    moe_pad_expert_input_to_capacity=True,
    moe_aux_loss_coeff=0.0,
    use_cpu_initialization=True,
)


def _router(**overrides):
    from megatron.rectify.router import RectifyRouter

    torch.manual_seed(1234)
    return RectifyRouter(RectifyTransformerConfig(**{**ROUTER_BASE, **overrides}))


@pytest.mark.usefixtures("single_rank")
@pytest.mark.parametrize("mode", ["none", "ir", "fr", "ir+fr"])
@pytest.mark.parametrize("topk", [1, 2])
def test_router_hands_the_dispatcher_exactly_c_per_column(mode: str, topk: int) -> None:
    trigger = "ignore_kth" if mode == "ir+fr" else "all"
    overrides = dict(moe_rectify=mode, moe_router_topk=topk, moe_rectify_ir_trigger=trigger)
    if topk == 1:
        overrides["moe_router_pre_softmax"] = True
    x = torch.randn(16, 2, 32, generator=torch.Generator().manual_seed(2))
    router = _router(**overrides)
    probs, routing_map = router(x)
    capacity = get_capacity(32 * topk, 8, 0.5)
    assert torch.equal(routing_map.sum(dim=0), torch.full((8,), capacity))  # megatron's too
    if mode == "none":
        return
    decision = router.last_routing
    assert not probs[decision.padding_map].any()
    if mode == "ir":  # without FR the vacancies stay: padding is what fills them
        assert decision.padding_map.any()
    unpadded = _router(**overrides, moe_pad_expert_input_to_capacity=False)
    unpadded_probs, unpadded_map = unpadded(x)
    assert torch.equal(unpadded_map, decision.routed_map)
    assert torch.equal(unpadded_probs, probs)
    assert torch.equal(unpadded.last_routing.ir_expert, decision.ir_expert)


@pytest.mark.usefixtures("single_rank")
def test_expert_bias_counts_only_routed_pairs() -> None:
    overrides = dict(
        moe_rectify="ir",  # no FR: vacancies stay, so there is padding
        moe_router_score_function="sigmoid",
        moe_router_enable_expert_bias=True,
        moe_router_load_balancing_type="none",
    )
    router = _router(**overrides)
    x = torch.randn(16, 2, 32, generator=torch.Generator().manual_seed(4))
    x.requires_grad_()  # expert-bias counts are updated only with grad enabled
    _, routing_map = router(x)
    routed = router.last_routing.routed_map
    assert router.last_routing.padding_map.any()
    assert torch.equal(router.local_tokens_per_expert, routed.sum(dim=0).float())
    assert not torch.equal(router.local_tokens_per_expert, routing_map.sum(dim=0).float())


@pytest.mark.usefixtures("single_rank")
@pytest.mark.parametrize("mode", ["none", "ir", "fr", "ir+fr"])
@pytest.mark.parametrize("topk", [1, 2])
def test_layer_dispatches_exactly_c_per_column(mode: str, topk: int) -> None:
    """The map megatron's dispatcher is given, inside the real layer (EP = 1)."""
    import moe_layer_cases as cases

    case = {"experts": 4, "topk": topk, "mode": mode, "pad": True}
    layer = cases.build_layer(cases.make_config(case, 1))
    seen = []
    original = layer.token_dispatcher.dispatch_preprocess

    def recording(hidden_states, routing_map, probs, **decision):
        seen.append(routing_map.clone())
        return original(hidden_states, routing_map, probs, **decision)

    layer.token_dispatcher.dispatch_preprocess = recording
    x, upstream = cases.rank_tokens(1)
    cases.run_layer(layer, x[0], upstream[0])
    capacity = get_capacity(cases.TOKENS_PER_RANK * topk, 4, 0.75)
    (routing_map,) = seen
    assert torch.equal(routing_map.sum(dim=0), torch.full((4,), capacity))
    if mode == "ir" and topk == 1:  # a case whose routed map leaves a column short
        assert layer.router.last_routing.padding_map.any()


# ---- more slots than tokens -----------------------------------------------------------------


def test_megatron_itself_cannot_pad_beyond_the_tokens() -> None:
    """Why C > T is refused: megatron's padded permute fails on it (4 tokens, C = 5)."""
    routing_map = torch.ones(4, 2, dtype=torch.bool)
    with pytest.raises(RuntimeError):
        permute(
            torch.randn(4, 3), routing_map, probs=torch.rand(4, 2), num_out_tokens=10,
            drop_and_pad=True,
        )  # fmt: skip


def test_config_refuses_padding_with_more_slots_than_tokens() -> None:
    base = {**ROUTER_BASE, "moe_rectify": "fr", "moe_expert_capacity_factor": 5.0}
    with pytest.raises(RectifyConfigError) as error:
        RectifyTransformerConfig(**base)  # top-2 x 5.0 > 8 experts
    message = str(error.value)
    assert "--moe-expert-capacity-factor" in message
    assert "--moe-pad-expert-input-to-capacity" in message
    assert "\n" not in message
    RectifyTransformerConfig(**{**base, "moe_pad_expert_input_to_capacity": False})
    RectifyTransformerConfig(**{**base, "moe_expert_capacity_factor": 4.0})  # k f == E: C == T


@pytest.mark.usefixtures("single_rank")
@pytest.mark.parametrize("mode", ["none", "fr"])
def test_router_refuses_a_capacity_rounded_past_the_tokens(mode: str) -> None:
    """k f == E passes the config check, but megatron's float capacity can round up to T + 1
    (7 experts, top-1, f = 7, 29 tokens: C = 30); the router says so instead of crashing."""
    router = _router(
        num_moe_experts=7,
        moe_router_topk=1,
        moe_router_pre_softmax=True,
        moe_expert_capacity_factor=7.0,
        moe_rectify=mode,
        moe_token_dispatcher_type="alltoall",
    )
    assert get_capacity(29, 7, 7.0) == 30
    with pytest.raises(RectifyConfigError, match="--moe-pad-expert-input-to-capacity"):
        router(torch.randn(29, 1, 32))
    router(torch.randn(28, 1, 32))  # C == T == 28 is fine
