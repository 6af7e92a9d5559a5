"""Routing statistics of one router call, as pure tensor functions.

Owns: what a routing decision is counted as (dropped, padded, filled-in, rectified, lost
requests; per-expert load) and the one definition of every rate (:data:`RATES`). The counts stay
0-d tensors so that counting forces no device sync; converting to Python numbers is the
caller's choice (:meth:`RoutingStatistics.as_percentages`, for logs and summaries).
Must not touch: the routing decision itself (``routing.py``), process groups, module state.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from megatron.rectify.routing import RectifiedRouting

__all__ = [
    "RATES",
    "RATE_COUNTS",
    "RATE_TOTALS",
    "RoutingStatistics",
    "max_over_mean_load",
    "routing_rates",
    "routing_statistics",
]


@dataclass
class RoutingStatistics:
    """Counts for one router call, kept as 0-d tensors so that no device sync is forced.

    ``padded`` counts slots a padded all-to-all would still send and compute with no token in
    them (``num_experts * capacity - occupied``); ``lost`` counts tokens that no expert computes.
    ``ir_over_budget`` (static IR only, else 0) counts tokens IR would have rescued that found
    their expert's IR rows full: each is also in ``dropped`` (its lost requests) and, when no
    routed pair is left to it, in ``lost``. So every token is routed (kept or filled in),
    IR-rescued (``rectified``) or counted in ``lost``; nothing disappears uncounted.
    """

    num_tokens: int
    num_requests: int
    slots: int
    dropped: torch.Tensor
    filled_in: torch.Tensor
    rectified: torch.Tensor
    occupied: torch.Tensor
    padded: torch.Tensor
    lost: torch.Tensor
    expert_load: torch.Tensor  # [E] tokens per expert, IR tokens included
    ir_over_budget: torch.Tensor | int = 0

    def as_percentages(self) -> dict[str, float]:
        """Human-readable rates (this is where the one host sync happens, for logging)."""
        counts = {name: float(getattr(self, name)) for name in RATE_COUNTS}
        counts.update({name: getattr(self, name) for name in RATE_TOTALS})
        load = self.expert_load
        return {
            **routing_rates(counts),
            "max_over_mean_load": float(max_over_mean_load(load)) if load.numel() else 0.0,
        }


#: The one definition of every routing rate: ``rate = 100 * count / max(total, 1)``.
#: (rate name, count it measures, total it is a share of); the names are ``RoutingStatistics``'.
RATES = (
    ("dropped_pct", "dropped", "num_requests"),
    ("padded_pct", "padded", "slots"),
    ("filled_in_pct", "filled_in", "slots"),
    ("rectified_pct", "rectified", "num_tokens"),
    ("lost_pct", "lost", "num_tokens"),
    ("ir_over_budget_pct", "ir_over_budget", "num_tokens"),
)
RATE_COUNTS = tuple(count for _, count, _ in RATES)
RATE_TOTALS = tuple(dict.fromkeys(total for _, _, total in RATES))


def routing_rates(counts: Mapping[str, Any]) -> dict[str, Any]:
    """Percentages from counts: every rate of ``RATES`` whose count is in ``counts``.

    ``counts`` maps count and total names to numbers: Python floats (summaries, after their one
    host sync) or 0-d tensors (the training log: the rates stay tensors, no host sync).
    """
    return {
        rate: 100.0 * counts[count] / max(counts[total], 1)
        for rate, count, total in RATES
        if count in counts
    }


def max_over_mean_load(expert_load: torch.Tensor) -> torch.Tensor:
    """Load imbalance: the busiest expert's tokens over the mean, 0-d tensor (no host sync)."""
    load = expert_load.float()
    return load.max() / load.mean().clamp_min(1e-9)


def routing_statistics(routing: RectifiedRouting, topk: int) -> RoutingStatistics:
    """Count dropped / padded / filled-in / rectified / lost for one call (no host sync).

    Everything counts ``routed_map`` (kept + fill-in), never the dispatch ``routing_map``:
    padding pairs are empty slots, so they count as ``padded``, not as occupied or as load.
    """
    routed_map = routing.routed_map
    num_tokens, num_experts = routed_map.shape
    occupied = routed_map.sum()
    slots = num_experts * routing.capacity
    rectified = routing.ir_expert >= 0
    # scatter_add, not bincount of a masked selection: boolean indexing would sync the host.
    ir_load = torch.zeros(num_experts, dtype=torch.int64, device=rectified.device)
    ir_load = ir_load.scatter_add(0, routing.ir_expert.clamp_min(0), rectified.to(torch.int64))
    over_budget = routing.ir_over_budget
    return RoutingStatistics(
        num_tokens=num_tokens,
        num_requests=num_tokens * topk,
        slots=slots,
        dropped=routing.dropped_map.sum(),
        filled_in=routing.fill_in_map.sum(),
        rectified=rectified.sum(),
        occupied=occupied,
        padded=(slots - occupied).clamp_min(0),
        lost=(~routed_map.any(dim=1) & ~rectified).sum(),
        expert_load=routed_map.sum(dim=0) + ir_load,
        ir_over_budget=torch.zeros_like(occupied) if over_budget is None else over_budget.sum(),
    )


#: megatron's routing types that are not top-k-with-capacity (no drop rate to report).
_NOT_TOPK_ROUTING = ("sinkhorn", "quantile_balancing")


def routing_statistics_available(config: Any) -> bool:
    """Whether every training call of a ``RectifyRouter`` built from ``config`` (a
    ``TransformerConfig`` or megatron's parsed args) yields :meth:`RectifyRouter.statistics`.

    The training entry point registers the ``rectify_*`` names with megatron's MoE metrics only
    when this holds: megatron reports a registered name that nobody recorded as 0.00, which
    would read as "no token dropped". Rectified calls always have statistics; megatron's own
    top-k path has them when capacity is limited (dropless routing has no drop rate), when its
    routing is top-k (not sinkhorn / quantile balancing) and when no replayed routing bypasses
    the top-k that the statistics recompute.
    """
    num_experts = getattr(config, "num_moe_experts", None) or getattr(config, "num_experts", None)
    if not num_experts or getattr(config, "moe_expert_capacity_factor", None) is None:
        return False
    routing_type = getattr(config, "moe_router_load_balancing_type", "aux_loss")
    if isinstance(routing_type, list) and len(routing_type) == 1:
        routing_type = routing_type[0]
    if isinstance(routing_type, str) and routing_type in _NOT_TOPK_ROUTING:
        return False
    return not getattr(config, "moe_enable_routing_replay", False)
