"""``RectifyRouter`` under expert parallelism (EP = 2) in two gloo processes."""

from __future__ import annotations

import pytest
import torch

from megatron.rectify.dev.multiprocess import run_distributed

pytestmark = [pytest.mark.multiprocess]

HIDDEN, EXPERTS, TOKENS = 32, 8, 24


def _config(**overrides):
    from megatron.rectify.config import RectifyTransformerConfig

    return RectifyTransformerConfig(
        num_layers=1,
        hidden_size=HIDDEN,
        num_attention_heads=4,
        num_moe_experts=EXPERTS,
        moe_router_topk=2,
        moe_expert_capacity_factor=0.5,
        moe_aux_loss_coeff=0.0,
        expert_model_parallel_size=2,
        add_bias_linear=False,
        use_cpu_initialization=True,
        **overrides,
    )


def _rank_inputs(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Router weights shared by all ranks; tokens differ per rank (as in data parallelism)."""
    weight = torch.randn(EXPERTS, HIDDEN, generator=torch.Generator().manual_seed(7))
    x = torch.randn(TOKENS, 1, HIDDEN, generator=torch.Generator().manual_seed(100 + rank))
    return weight, x


def _route_on_each_rank(rank: int, world_size: int, mode: str) -> dict:
    from megatron.core import parallel_state
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
    from megatron.core.transformer.moe.router import TopKRouter

    from megatron.rectify.config import RectifyOptions
    from megatron.rectify.reference import reference_rectified_routing
    from megatron.rectify.router import RectifyRouter, full_score_distribution

    config = _config(moe_rectify=mode, moe_rectify_ir_trigger="ignore_kth")
    router = RectifyRouter(config)
    weight, x = _rank_inputs(rank)
    router.weight.data.copy_(weight)
    probs, routing_map = router(x.clone().requires_grad_())
    ep_rank = parallel_state.get_expert_model_parallel_rank()
    result = {"ep_rank": ep_rank, "local": (router.local_experts.start, router.local_experts.stop)}
    if mode == "none":
        vanilla = TopKRouter(config, pg_collection=get_default_pg_collection())
        vanilla.weight.data.copy_(weight)
        expected_probs, expected_map = vanilla(x.clone())
        result["identical"] = bool(
            torch.equal(probs, expected_probs) and torch.equal(routing_map, expected_map)
        )
        return result
    # The single-process reference, told which experts are local to this rank.
    p = full_score_distribution(x.view(-1, HIDDEN) @ weight.t(), "softmax")
    options = RectifyOptions.from_mode(mode, ir_trigger="ignore_kth")
    expected = reference_rectified_routing(
        p, p.topk(2, dim=1).indices, router.last_routing.capacity, options, router.local_experts
    )
    result["matches_reference"] = bool(
        torch.equal(routing_map, expected.routing_map)
        and torch.equal(router.last_routing.ir_expert, expected.ir_expert)
        and torch.allclose(probs.detach(), expected.probs.detach())
    )
    ir_expert = router.last_routing.ir_expert
    result["ir_destinations"] = sorted(set(ir_expert[ir_expert >= 0].tolist()))
    result["num_rectified"] = int((ir_expert >= 0).sum())
    return result


@pytest.mark.parametrize("mode", ["ir", "ir+fr"])
def test_ir_destinations_are_local_experts_of_each_rank(mode: str) -> None:
    results = run_distributed(
        _route_on_each_rank, world_size=2, expert_model_parallel_size=2, mode=mode
    )
    assert sorted(r["ep_rank"] for r in results) == [0, 1]
    for result in results:
        start, stop = result["local"]
        assert (start, stop) == (4 * result["ep_rank"], 4 * result["ep_rank"] + 4)
        assert result["matches_reference"]
        assert result["num_rectified"] > 0
        assert all(start <= e < stop for e in result["ir_destinations"])


def test_rectify_off_equals_topk_router_under_ep2() -> None:
    results = run_distributed(
        _route_on_each_rank, world_size=2, expert_model_parallel_size=2, mode="none"
    )
    assert all(r["identical"] for r in results)
