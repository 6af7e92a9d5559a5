"""Routing statistics are correct or absent, whatever the training mode (issue 16, item 6).

``--moe-rectify none --moe-rectify-eval ...`` used to log ``rectify_dropped_pct 0.00`` while
megatron dropped tokens: the names were registered with megatron's MoE metrics, but an
unrectified training call recorded nothing, and megatron reports an unrecorded registered name
as 0.00. Now megatron's own top-k-with-capacity calls are counted too (a vanilla baseline), and
where no truthful count exists (dropless, sinkhorn, replayed routing) nothing is registered.
"""

from __future__ import annotations

import argparse
import re

import moe_layer_cases as cases
import pytest
import torch
from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker
from megatron.core.transformer.moe.moe_utils import get_capacity

from megatron.rectify.config import RectifyOptions
from megatron.rectify.moe_layer import STATISTIC_NAMES
from megatron.rectify.statistics import routing_statistics_available

pytestmark = pytest.mark.usefixtures("single_rank")

EXPERTS = 4


def _true_megatron_rates(topk: int, capacity_factor: float = 0.75) -> dict[str, float]:
    """Vanilla top-k with capacity, counted without megatron's code: every expert keeps
    min(requests, C) of its requests, whichever tokens they are."""
    weights = cases.global_weights(EXPERTS)
    x, _ = cases.rank_tokens(1)
    logits = x[0] @ weights["router"].t()
    chosen = logits.topk(topk, dim=1).indices  # softmax (pre or post) keeps the logits' order
    requests = torch.bincount(chosen.flatten(), minlength=EXPERTS)
    num_tokens = x.shape[1]
    capacity = get_capacity(num_tokens * topk, EXPERTS, capacity_factor)
    kept = int(requests.clamp_max(capacity).sum())
    return {
        "dropped_pct": 100.0 * (num_tokens * topk - kept) / (num_tokens * topk),
        "padded_pct": 100.0 * (EXPERTS * capacity - kept) / (EXPERTS * capacity),
    }


def _vanilla_layer(topk: int, pad: bool, capacity_factor: float | None = 0.75):
    case = {"experts": EXPERTS, "topk": topk, "mode": "none", "pad": pad}
    config = cases.make_config(case, 1)
    config.moe_expert_capacity_factor = capacity_factor
    layer = cases.build_layer(config)
    cases.load_global_weights(layer, cases.global_weights(EXPERTS))
    layer.set_layer_number(1)
    return layer


@pytest.mark.parametrize("pad", [True, False], ids=["pad", "nopad"])
@pytest.mark.parametrize("topk", [1, 2])
def test_unrectified_training_logs_megatrons_true_rates(topk: int, pad: bool) -> None:
    """The reported symptom, end to end: inference-only rectification (training unrectified),
    one training step, megatron's report of the registered names."""
    from megatron.rectify.training import install_eval_rectification

    tracker = get_moe_metrics_tracker()
    tracker.clear()
    layer = _vanilla_layer(topk, pad)
    model = torch.nn.Sequential(layer)
    install_eval_rectification(
        model, RectifyOptions(intra_gpu=True, fill_in=True, ir_trigger="ignore_kth")
    )
    x, upstream = cases.rank_tokens(1)
    model.train()
    cases.run_layer(layer, x[0], upstream[0])
    assert layer.router.last_routing is None  # megatron's own routing trained
    model.eval()
    with torch.no_grad():  # an evaluation pass: rectified, and not counted as training
        model(x[0].unsqueeze(1))
    assert layer.router.last_routing is not None

    log = tracker.report(
        loss_scale=1.0,
        iteration=1,
        force_initialize=True,
        track_names=list(STATISTIC_NAMES),
        num_layers=1,
    )
    logged = {name: float(value) for name, value in re.findall(r"(\w+): ([0-9.]+)", log)}
    expected = _true_megatron_rates(topk)
    assert expected["dropped_pct"] > 0  # megatron drops tokens in this case
    assert logged["rectify_dropped_pct"] == pytest.approx(expected["dropped_pct"], abs=0.006)
    assert logged["rectify_padded_pct"] == pytest.approx(expected["padded_pct"], abs=0.006)
    assert logged["rectify_filled_in_pct"] == 0.0 and logged["rectify_rectified_pct"] == 0.0
    summary = layer.statistics_summary()
    assert summary["dropped_pct"] == pytest.approx(expected["dropped_pct"])
    assert summary["padded_pct"] == pytest.approx(expected["padded_pct"])


@pytest.mark.parametrize("topk", [1, 2])
def test_megatron_padding_pairs_never_count_as_routed(topk: int) -> None:
    """megatron's padded map holds exactly C pairs per expert, zero-weight padding included;
    the statistics see only the kept requests."""
    layer = _vanilla_layer(topk, pad=True)
    x, upstream = cases.rank_tokens(1)
    cases.run_layer(layer, x[0], upstream[0])
    stats = layer.router.statistics()
    capacity = get_capacity(x.shape[1] * topk, EXPERTS, 0.75)
    expected = _true_megatron_rates(topk)
    assert int(stats.padded) > 0 and int(stats.dropped) > 0
    assert int(stats.occupied) + int(stats.padded) == EXPERTS * capacity
    assert stats.as_percentages()["dropped_pct"] == pytest.approx(expected["dropped_pct"])
    assert int(stats.expert_load.sum()) == int(stats.occupied)
    assert int(stats.expert_load.max()) <= capacity


def _counted_from_outside(probs, routing_map, topk: int, capacity_factor: float):
    """Vanilla call counted only from megatron's outputs and its capacity (how the quality
    benchmark counted vanilla calls before the router counted them): with padding megatron's
    map holds exactly C tokens per expert, its padding pairs have probability zero."""
    kept_map = routing_map & (probs.detach() != 0)
    kept = kept_map.sum()
    num_tokens, num_experts = routing_map.shape
    slots = num_experts * get_capacity(num_tokens * topk, num_experts, capacity_factor)
    return {
        "dropped": num_tokens * topk - kept,
        "padded": (slots - kept).clamp_min(0),
        "occupied": kept,
        "lost": (~kept_map.any(dim=1)).sum(),
        "expert_load": kept_map.sum(dim=0),
    }


@pytest.mark.parametrize("pad", [True, False], ids=["pad", "nopad"])
def test_megatron_path_agrees_with_a_count_from_megatrons_outputs(pad: bool) -> None:
    """The router's exact count (kept = megatron's top-k & its final map) agrees with a count
    from megatron's returned tensors alone (kept = non-zero probability)."""
    layer = _vanilla_layer(2, pad)
    x, _ = cases.rank_tokens(1)
    probs, routing_map = layer.router(x[0].unsqueeze(1))
    ours = layer.router.statistics()
    theirs = _counted_from_outside(probs, routing_map, 2, 0.75)
    for name, value in theirs.items():
        assert torch.equal(getattr(ours, name), value), name


def test_no_statistics_where_none_would_be_true() -> None:
    """Dropless routing has no drop rate: nothing recorded, so nothing may be registered."""
    tracker = get_moe_metrics_tracker()
    tracker.clear()
    layer = _vanilla_layer(1, pad=False, capacity_factor=None)
    x, upstream = cases.rank_tokens(1)
    cases.run_layer(layer, x[0], upstream[0])
    assert layer.router.statistics() is None
    assert layer.statistics_summary() == {}
    recorded = {name for name, entry in tracker._metrics.items() if entry.values.any()}
    assert not recorded & set(STATISTIC_NAMES)
    assert not routing_statistics_available(layer.config)


def _args(**overrides) -> argparse.Namespace:
    base = dict(
        num_experts=4,
        moe_expert_capacity_factor=1.0,
        moe_router_load_balancing_type="aux_loss",
        moe_enable_routing_replay=False,
        moe_rectify="none",
        moe_rectify_eval="ir+fr",
    )
    return argparse.Namespace(**{**base, **overrides})


@pytest.mark.parametrize(
    ("overrides", "available"),
    [
        ({}, True),  # --moe-rectify none --moe-rectify-eval ir+fr: megatron's rates
        ({"moe_rectify": "ir", "moe_rectify_eval": "train"}, True),
        ({"moe_rectify_eval": "train"}, True),  # plain vanilla with capacity: a baseline
        ({"moe_expert_capacity_factor": None, "moe_rectify_eval": "train"}, False),
        ({"moe_router_load_balancing_type": "sinkhorn", "moe_rectify_eval": "train"}, False),
        ({"moe_router_load_balancing_type": ["sinkhorn"], "moe_rectify_eval": "train"}, False),
        ({"moe_enable_routing_replay": True, "moe_rectify_eval": "train"}, False),
        ({"num_experts": None, "moe_rectify_eval": "train"}, False),
    ],
)
def test_names_are_registered_exactly_where_they_are_recorded(
    overrides: dict, available: bool
) -> None:
    """The training entry point registers the names with this predicate (parsed args); the
    router records with the same predicate (its config)."""
    assert routing_statistics_available(_args(**overrides)) is available
