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
    )
