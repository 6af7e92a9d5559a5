"""Gradients of the rectified gate weights: exact (gradcheck) without the straight-through trick,
and exactly the spec's surrogate with it."""

from __future__ import annotations

import pytest
import torch

from megatron.rectify.config import RectifyOptions
from megatron.rectify.router import full_score_distribution
from megatron.rectify.routing import rectified_routing


def distinct_logits(num_tokens: int, num_experts: int, seed: int) -> torch.Tensor:
    """Well-separated logits, so a finite-difference step never flips a routing decision."""
    gen = torch.Generator().manual_seed(seed)
    ranks = torch.stack([torch.randperm(num_experts, generator=gen) for _ in range(num_tokens)])
    return ranks.to(torch.float64) * 0.7 + 0.01 * torch.rand(num_tokens, num_experts, generator=gen)


CASES = [
    ("ir", 1, "all"),
    ("fr", 1, "all"),
    ("ir+fr", 1, "ignore_kth"),
    ("ir", 2, "any"),
    ("ir+fr", 2, "all"),
]


@pytest.mark.parametrize(("mode", "topk", "trigger"), CASES)
def test_gradcheck_without_straight_through(mode: str, topk: int, trigger: str) -> None:
    logits = distinct_logits(12, 4, seed=topk).requires_grad_()
    options = RectifyOptions.from_mode(mode, ir_trigger=trigger, straight_through=False)
    topk_indices = logits.detach().topk(topk, dim=1).indices

    def weights(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        routing = rectified_routing(
            full_score_distribution(x, "softmax"), topk_indices, 2, options, range(2, 4)
        )
        assert routing.dropped_map.any()  # the case exercises rectification
        return routing.probs, routing.ir_probs

    assert torch.autograd.gradcheck(weights, (logits,), eps=1e-6, atol=1e-8)


@pytest.mark.parametrize(("mode", "topk", "trigger"), CASES)
def test_straight_through_gradient_is_the_detached_denominator_surrogate(
    mode: str, topk: int, trigger: str
) -> None:
    probs = distinct_logits(12, 4, seed=10 + topk).softmax(dim=-1).requires_grad_()
    options = RectifyOptions.from_mode(mode, ir_trigger=trigger, straight_through=True)
    topk_indices = probs.detach().topk(topk, dim=1).indices
    routing = rectified_routing(probs, topk_indices, 2, options, range(2, 4))
    gen = torch.Generator().manual_seed(1)
    upstream = torch.randn(probs.shape, generator=gen, dtype=probs.dtype)
    upstream_ir = torch.randn(probs.shape[0], generator=gen, dtype=probs.dtype)
    (grad,) = torch.autograd.grad(
        (routing.probs * upstream).sum() + (routing.ir_probs * upstream_ir).sum(), probs
    )

    # Surrogate: the same weights with the denominator S a constant (top-1 single terms: w = p).
    with torch.no_grad():
        mask = routing.routing_map.to(probs.dtype)
        has_ir = routing.ir_expert >= 0
        lost = routing.dropped_map.sum(dim=1).to(probs.dtype) * has_ir
        ir_index = routing.ir_expert.clamp_min(0)
        total = (probs * mask).sum(dim=1) + lost * probs.gather(1, ir_index[:, None])[:, 0]
        denominator = torch.where(total > 0, total, torch.ones_like(total))
        if topk == 1:
            single = (mask.sum(dim=1) + has_ir) == 1
            denominator = torch.where(single, torch.ones_like(denominator), denominator)
    expected = mask * upstream / denominator[:, None]
    expected.scatter_add_(1, ir_index[:, None], (lost * upstream_ir / denominator)[:, None])
    torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-12)
    assert grad.abs().sum() > 0


def test_gradient_vanishes_for_single_survivors_without_straight_through_only() -> None:
    """Top-1 + FR: every routed token has one term, so p/p = 1 and the plain gradient is 0."""
    probs = distinct_logits(16, 4, seed=3).softmax(dim=-1).requires_grad_()
    topk_indices = probs.detach().topk(1, dim=1).indices
    for straight_through, expect_zero in ((False, True), (True, False)):
        options = RectifyOptions(fill_in=True, straight_through=straight_through)
        routing = rectified_routing(probs, topk_indices, 4, options, range(4))
        single = routing.routing_map.sum(dim=1) == 1
        assert single.any()
        loss = (routing.probs[single] * torch.arange(1.0, 5.0, dtype=probs.dtype)).sum()
        (grad,) = torch.autograd.grad(loss, probs)
        assert (grad.abs().max().item() < 1e-12) is expect_zero
