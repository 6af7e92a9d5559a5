"""``RectifyRouter`` in one process: megatron's ``TopKRouter`` when off, the spec when on."""

from __future__ import annotations

import ast
import copy
import inspect
import textwrap

import pytest
import torch
from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
from megatron.core.transformer.moe.router import TopKRouter

from megatron.rectify.config import RectifyOptions, RectifyTransformerConfig
from megatron.rectify.reference import reference_rectified_routing
from megatron.rectify.router import RectifyRouter, full_score_distribution

pytestmark = pytest.mark.usefixtures("single_rank")


BASE = dict(
    num_layers=1,
    hidden_size=32,
    num_attention_heads=4,
    num_moe_experts=8,
    moe_router_topk=2,
    moe_expert_capacity_factor=1.0,
    moe_router_load_balancing_type="aux_loss",
    moe_aux_loss_coeff=0.01,
    use_cpu_initialization=True,
)

# Every TopKRouter feature the rectified router must keep working.
FEATURES = {
    "softmax_top2": {},
    "top1_pre_softmax": {"moe_router_topk": 1, "moe_router_pre_softmax": True},
    "pre_softmax_top2": {"moe_router_pre_softmax": True},
    "pad_to_capacity": {"moe_pad_expert_input_to_capacity": True},
    "position_drop": {"moe_token_drop_policy": "position"},
    "dropless": {"moe_expert_capacity_factor": None},
    "sigmoid_expert_bias": {
        "moe_router_score_function": "sigmoid",
        "moe_router_enable_expert_bias": True,
        "moe_router_load_balancing_type": "none",
        "moe_aux_loss_coeff": 0.0,
    },
    "group_limited": {"moe_router_num_groups": 4, "moe_router_group_topk": 2},
    "seq_aux_loss": {"moe_router_load_balancing_type": "seq_aux_loss"},
    "global_aux_loss": {"moe_router_load_balancing_type": "global_aux_loss"},
    "z_loss": {"moe_z_loss_coeff": 1e-3},
    "input_jitter": {"moe_input_jitter_eps": 0.1},
    "router_fp64": {"moe_router_dtype": "fp64"},
    "scaling_factor": {"moe_router_topk_scaling_factor": 2.0},
}


def make_config(**overrides) -> RectifyTransformerConfig:
    return RectifyTransformerConfig(**{**BASE, **overrides})


def forward_backward(router: torch.nn.Module, x: torch.Tensor, seed: int = 0):
    """Run one router call and a backward through probs (and IR weights, when present)."""
    x = x.detach().clone().requires_grad_()
    torch.manual_seed(seed)  # input jitter draws random numbers
    probs, routing_map = router(x)
    upstream = torch.linspace(-1.0, 1.0, probs.numel(), dtype=probs.dtype).view_as(probs)
    loss = (probs * upstream).sum()
    last = getattr(router, "last_routing", None)
    if last is not None:
        loss = loss + (last.ir_probs * torch.linspace(0.5, 1.5, last.ir_probs.numel())).sum()
    loss.backward()
    return probs.detach(), routing_map, x.grad, router.weight.grad.clone()


def paired_routers(config: RectifyTransformerConfig) -> tuple[TopKRouter, RectifyRouter]:
    torch.manual_seed(1234)
    vanilla = TopKRouter(config, pg_collection=get_default_pg_collection())
    rectified = RectifyRouter(config)
    rectified.load_state_dict(vanilla.state_dict())
    return vanilla, rectified


@pytest.mark.parametrize("feature", FEATURES)
def test_rectify_off_is_bit_identical_to_topk_router(feature: str) -> None:
    config = make_config(**FEATURES[feature])
    vanilla, rectified = paired_routers(config)
    x = torch.randn(16, 2, config.hidden_size)
    for call in range(2):  # the second call sees the expert bias / trackers the first updated
        expected = forward_backward(vanilla, x, seed=call)
        actual = forward_backward(rectified, x, seed=call)
        vanilla.weight.grad = rectified.weight.grad = None
        for name, a, b in zip(
            ("probs", "routing_map", "x.grad", "weight.grad"), actual, expected, strict=True
        ):
            assert torch.equal(a, b), f"{feature}: {name} differs on call {call}"
    assert rectified.last_routing is None
    if config.moe_router_enable_expert_bias:
        assert torch.equal(rectified.local_tokens_per_expert, vanilla.local_tokens_per_expert)


@pytest.mark.parametrize("mode", ["ir", "fr", "ir+fr"])
@pytest.mark.parametrize("topk", [1, 2])
@pytest.mark.parametrize("straight_through", [True, False])
def test_rectified_router_equals_the_spec_reference(
    mode: str, topk: int, straight_through: bool
) -> None:
    trigger = "ignore_kth" if mode == "ir+fr" else "all"
    config = make_config(
        moe_router_topk=topk,
        moe_router_pre_softmax=topk == 1,
        moe_rectify=mode,
        moe_rectify_ir_trigger=trigger,
        moe_rectify_straight_through=straight_through,
        moe_expert_capacity_factor=0.75,
        moe_aux_loss_coeff=0.0,
    )
    _, router = paired_routers(config)
    x = torch.randn(24, 1, config.hidden_size)
    probs, routing_map, x_grad, weight_grad = forward_backward(router, x)

    # The reference, from the same weights: logits -> p -> loops over the spec's rules.
    weight = router.weight.detach().clone().requires_grad_()
    bias = router.bias.detach()  # megatron's router has a bias with add_bias_linear (default)
    x_ref = x.detach().clone().view(-1, config.hidden_size).requires_grad_()
    p = full_score_distribution(x_ref @ weight.t() + bias, "softmax")
    topk_indices = p.detach().topk(topk, dim=1).indices
    capacity = router.last_routing.capacity
    options = RectifyOptions.from_mode(mode, ir_trigger=trigger, straight_through=straight_through)
    expected = reference_rectified_routing(p, topk_indices, capacity, options, range(8))
    assert torch.equal(routing_map, expected.routing_map)
    assert torch.equal(router.last_routing.ir_expert, expected.ir_expert)
    torch.testing.assert_close(probs, expected.probs.detach())
    torch.testing.assert_close(router.last_routing.ir_probs.detach(), expected.ir_probs.detach())
    upstream = torch.linspace(-1.0, 1.0, probs.numel()).view_as(probs)
    loss = (expected.probs * upstream).sum() + (
        expected.ir_probs * torch.linspace(0.5, 1.5, expected.ir_probs.numel())
    ).sum()
    ref_x_grad, ref_weight_grad = torch.autograd.grad(loss, (x_ref, weight), allow_unused=True)
    torch.testing.assert_close(x_grad.view(-1, config.hidden_size), ref_x_grad)
    torch.testing.assert_close(weight_grad, ref_weight_grad)
    assert expected.dropped_map.any() or expected.fill_in_map.any()  # rectification happened


@pytest.mark.parametrize("feature", [f for f in FEATURES if f != "dropless"])
@pytest.mark.parametrize("mode", ["ir", "fr", "ir+fr"])
def test_rectified_router_keeps_every_topk_feature_working(feature: str, mode: str) -> None:
    overrides = dict(FEATURES[feature])
    topk = overrides.get("moe_router_topk", 2)
    if mode != "fr" and topk * overrides.get("moe_expert_capacity_factor", 1.0) >= 8:
        pytest.skip("no token can be dropped")
    config = make_config(
        **overrides,
        moe_rectify=mode,
        moe_rectify_ir_trigger="ignore_kth",
        moe_expert_capacity_factor=0.5,
    )
    _, router = paired_routers(config)
    x = torch.randn(32, 2, config.hidden_size)
    probs, routing_map, x_grad, weight_grad = forward_backward(router, x)
    stats = router.statistics()
    capacity = router.last_routing.capacity
    assert (routing_map.sum(dim=0) <= capacity).all()
    assert torch.isfinite(probs).all() and torch.isfinite(weight_grad).all()
    assert weight_grad.abs().sum() > 0 and x_grad.abs().sum() > 0
    assert not probs[~routing_map].any()
    if "ir" in mode:
        assert int(stats.lost) == 0
        rectified = router.last_routing.ir_expert >= 0
        assert torch.equal(rectified, router.last_routing.dropped_map.any(dim=1))
    if config.moe_router_enable_expert_bias:
        assert torch.equal(router.local_tokens_per_expert, routing_map.sum(dim=0).float())


def test_rectified_router_attaches_megatron_aux_loss() -> None:
    from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker

    config = make_config(moe_rectify="ir", moe_expert_capacity_factor=0.5)
    _, router = paired_routers(config)
    router.set_layer_number(1)
    tracker = get_moe_metrics_tracker()
    tracker.clear() if hasattr(tracker, "clear") else None
    forward_backward(router, torch.randn(16, 1, config.hidden_size))
    recorded = str(getattr(tracker, "__dict__", {}))
    assert "load_balancing_loss" in recorded


def test_router_gradient_survives_top1_only_with_straight_through() -> None:
    """Top-1 + IR: every token has exactly one term (its kept choice or its IR expert), weighing
    exactly 1; only the straight-through trick gives the router a gradient from the model loss
    (aux loss off)."""
    grads = {}
    for straight_through in (True, False):
        config = make_config(
            moe_router_topk=1,
            moe_router_pre_softmax=True,
            moe_rectify="ir",
            moe_rectify_straight_through=straight_through,
            moe_aux_loss_coeff=0.0,
            moe_expert_capacity_factor=0.5,
        )
        _, router = paired_routers(config)
        probs, routing_map, _, weight_grad = forward_backward(router, torch.randn(16, 1, 32))
        decision = router.last_routing
        assert (decision.ir_expert >= 0).any()
        assert torch.equal(probs[routing_map], torch.ones(int(routing_map.sum())))
        assert torch.equal(
            decision.ir_probs[decision.ir_expert >= 0],
            torch.ones(int((decision.ir_expert >= 0).sum())),
        )
        grads[straight_through] = weight_grad.abs().max().item()
    assert grads[True] > 1e-4
    assert grads[False] < 1e-4 * grads[True]  # float32 round-off of p/p, nothing more


def test_router_never_asks_for_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """megatron's gating moves weights to ``torch.cuda.current_device()``; ours follows x."""

    def no_cuda(*args, **kwargs):
        raise AssertionError("RectifyRouter called torch.cuda.current_device()")

    config = make_config(moe_rectify="ir+fr", moe_rectify_ir_trigger="ignore_kth")
    router = RectifyRouter(copy.deepcopy(config))
    monkeypatch.setattr(torch.cuda, "current_device", no_cuda)
    probs, _ = router(torch.randn(8, 1, config.hidden_size))
    assert probs.device.type == "cpu" and router.weight.device.type == "cpu"


def test_inference_only_rectification_switch() -> None:
    config = make_config()
    vanilla, router = paired_routers(config)
    x = torch.randn(16, 1, config.hidden_size)
    with torch.no_grad():
        router.eval()
        vanilla.eval()
        assert torch.equal(router(x)[0], vanilla(x)[0])
        router.set_rectify_options(
            RectifyOptions(intra_gpu=True, fill_in=True, ir_trigger="ignore_kth")
        )
        probs, routing_map = router(x)
    assert router.last_routing is not None
    assert router.statistics().as_percentages()["lost_pct"] == 0.0
    assert (routing_map.sum(dim=0) <= router.last_routing.capacity).all()


def _statements(function) -> list[str]:
    """A function's statements (docstring dropped), normalised by ``ast.unparse``."""
    body = ast.parse(textwrap.dedent(inspect.getsource(function))).body[0].body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]
    return [ast.unparse(statement) for statement in body]


def test_router_logits_reproduces_megatrons_forward() -> None:
    """``RectifyRouter.router_logits`` is ``TopKRouter.forward`` up to its ``routing`` call.

    When this fails, megatron's router ``forward`` changed: re-read it and update
    ``router_logits`` (the rectified router returns its decision as a value, so it cannot
    inherit that ``forward``).
    """
    megatron = _statements(TopKRouter.forward)
    ours = _statements(RectifyRouter.router_logits)
    assert megatron[-2:] == [
        "probs, routing_map = self.routing(logits, padding_mask=padding_mask)",
        "return (probs, routing_map)",
    ]
    assert ours[-1] == "return logits"
    assert megatron[:-2] == ours[:-1]


def test_forward_returns_the_decision_as_a_value() -> None:
    """``with_decision=True`` hands the whole call over; plain calls keep megatron's pair."""
    router = RectifyRouter(make_config(moe_rectify="ir", moe_expert_capacity_factor=0.5))
    x = torch.randn(16, 1, BASE["hidden_size"])
    output = router(x, with_decision=True)
    assert output.decision is not None and (output.decision.ir_expert >= 0).any()
    assert output.routing_map is output.decision.routing_map
    assert router.last_routing is output.decision  # the observation point
    probs, routing_map = router(x)
    assert torch.equal(routing_map, output.routing_map)
    torch.testing.assert_close(probs, output.probs)
