"""``RectifyMoELayer`` and the rectified specs in one process (EP = 1)."""

from __future__ import annotations

import moe_layer_cases as cases
import pytest
import torch
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker

from megatron.rectify.config import RectifyConfigError, RectifyTransformerConfig
from megatron.rectify.layer_specs import (
    get_gpt_decoder_block_spec_rectify,
)
from megatron.rectify.moe_layer import STATISTIC_NAMES, RectifyMoELayer
from megatron.rectify.router import RectifyRouter
from megatron.rectify.token_dispatcher import MoERectifyAlltoAllTokenDispatcher

pytestmark = pytest.mark.usefixtures("single_rank")


def test_spec_builds_a_rectified_layer_that_is_still_an_moe_layer() -> None:
    layer = cases.build_layer(cases.make_config({"experts": 4, "topk": 1}, 1))
    assert isinstance(layer, RectifyMoELayer) and isinstance(layer, MoELayer)
    assert isinstance(layer.router, RectifyRouter)
    assert isinstance(layer.token_dispatcher, MoERectifyAlltoAllTokenDispatcher)


def test_decoder_block_spec_respects_moe_layer_freq() -> None:
    config = RectifyTransformerConfig(
        num_layers=4,
        hidden_size=16,
        num_attention_heads=4,
        num_moe_experts=4,
        moe_layer_freq=2,
        moe_router_topk=1,
        moe_router_pre_softmax=True,
        moe_expert_capacity_factor=1.0,
        moe_rectify="ir",
        add_bias_linear=False,
    )
    block = get_gpt_decoder_block_spec_rectify(config, use_transformer_engine=False)
    built = [_built_class(spec.submodules.mlp) for spec in block.layer_specs]
    assert built == [RectifyMoELayer, MLP, RectifyMoELayer, MLP]


def _built_class(builder) -> type:
    """What a spec entry builds: a ``functools.partial`` (of a class or of a classmethod such
    as ``MLP.as_mlp_submodule``) or a ``ModuleSpec``."""
    target = getattr(builder, "func", None) or builder.module
    return getattr(target, "__self__", target)


@pytest.mark.parametrize(
    "case",
    [
        pytest.param({"experts": 4, "topk": 1, "mode": "ir+fr"}, id="top1-ir+fr"),
        pytest.param({"experts": 4, "topk": 2, "mode": "fr", "pad": False}, id="top2-fr-nopad"),
        # Large capacity: nothing is dropped, so IR has nothing to do and FR fills vacancies.
        pytest.param(
            {"experts": 4, "topk": 1, "mode": "fr", "capacity_factor": 3.0}, id="no-drops"
        ),
        # Static IR (--moe-rectify-ir-capacity-factor): a budget that leaves tokens unrescued,
        # with and without padding, top-1 and top-2, and one that rescues them all.
        pytest.param(
            {"experts": 4, "topk": 1, "mode": "ir+fr", "ir_capacity_factor": 0.1},
            id="static-ir-top1-ir+fr-over-budget",
        ),
        pytest.param(
            {"experts": 4, "topk": 2, "mode": "ir", "ir_capacity_factor": 0.1, "pad": False},
            id="static-ir-top2-ir-nopad-over-budget",
        ),
        pytest.param(
            {"experts": 4, "topk": 1, "mode": "ir", "ir_capacity_factor": 1.0},
            id="static-ir-top1-ir-within-budget",
        ),
    ],
)
def test_single_process_layer_equals_reference(case: dict) -> None:
    result = cases.layer_vs_reference(0, 1, case)
    for name in ("output", "x_grad", "fc1", "fc2", "router"):
        assert result[name] < 2e-5 * max(1.0, result["scale"]), (name, result)
    if "ir_capacity_factor" in case:  # the case exercises rescue, and the budget when small
        assert result["rectified"] > 0, result
        assert (result["ir_over_budget"] > 0) == (case["ir_capacity_factor"] < 0.5), result


def test_routing_statistics_reach_megatrons_metrics_tracker() -> None:
    tracker = get_moe_metrics_tracker()
    tracker.clear()
    layer = cases.build_layer(cases.make_config({"experts": 4, "topk": 1}, 1))
    layer.set_layer_number(1)
    x, upstream = cases.rank_tokens(1)
    cases.run_layer(layer, x[0], upstream[0])
    recorded = {name: entry.values for name, entry in tracker._metrics.items()}
    for name in STATISTIC_NAMES:
        assert name in recorded, sorted(recorded)
    expected = layer.router.statistics().as_percentages()
    assert recorded["rectify_dropped_pct"][0].item() == pytest.approx(expected["dropped_pct"])
    assert recorded["rectify_rectified_pct"][0].item() == pytest.approx(expected["rectified_pct"])


def test_rectification_refuses_the_flex_dispatcher() -> None:
    """Refused before megatron builds the flex dispatcher (which needs DeepEP / HybridEP)."""
    config = cases.make_config({"experts": 4, "topk": 1, "pad": False}, 1)
    config.moe_token_dispatcher_type = "flex"
    expected = "--moe-token-dispatcher-type alltoall or allgather \\(got 'flex'\\)"
    with pytest.raises(RectifyConfigError, match=expected):
        cases.build_layer(config)


def test_shared_experts_are_added_to_the_rectified_output() -> None:
    """Same routed weights with and without a shared expert: the difference is exactly the
    shared expert's output."""
    base = {"experts": 4, "topk": 1, "mode": "ir+fr"}
    weights = cases.global_weights(4)
    x, _ = cases.rank_tokens(1)
    plain = cases.build_layer(cases.make_config(base, 1))
    cases.load_global_weights(plain, weights)
    config = cases.make_config(base, 1)
    config.moe_shared_expert_intermediate_size = 32
    shared = cases.build_layer(config)
    cases.load_global_weights(shared, weights)
    with torch.no_grad():
        tokens = x[0].unsqueeze(1)
        without, _ = plain(tokens)
        with_shared, _ = shared(tokens)
        shared_only = shared.shared_experts(tokens)
    assert shared.router.last_routing.ir_expert.ge(0).any()
    torch.testing.assert_close(with_shared, without + shared_only)


def test_inference_only_rectification_switches_with_eval_mode() -> None:
    """--moe-rectify none --moe-rectify-eval ir+fr: vanilla routing in training, rectified
    routing in evaluation passes (the paper's inference-only rectification)."""
    from megatron.rectify.config import RectifyOptions
    from megatron.rectify.training import install_eval_rectification

    layer = cases.build_layer(cases.make_config({"experts": 4, "topk": 1, "mode": "none"}, 1))
    model = torch.nn.Sequential(layer)
    eval_options = RectifyOptions(intra_gpu=True, fill_in=True, ir_trigger="ignore_kth")
    install_eval_rectification(model, eval_options)
    x, _ = cases.rank_tokens(1)
    tokens = x[0].unsqueeze(1)
    model.train()
    model(tokens)
    assert layer.router.last_routing is None  # megatron's own top-k routing
    model.eval()
    with torch.no_grad():
        model(tokens)
    assert layer.router.last_routing is not None
    assert (layer.router.last_routing.ir_expert >= 0).any()
    model.train()
    model(tokens)
    assert layer.router.last_routing is None
