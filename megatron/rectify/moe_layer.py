"""``RectifyMoELayer``: megatron's ``MoELayer`` with the rectified router and dispatcher.

Owns: wiring. It stays an ``MoELayer`` (transformer layers check ``isinstance``), builds a
``RectifyRouter`` (the spec may also name it), swaps megatron's alltoall dispatcher for
``MoERectifyAlltoAllTokenDispatcher`` after construction (megatron picks dispatchers by a
hard-coded string), hands each call's IR decision from the router to the dispatcher, and records
the per-layer routing statistics in megatron's MoE metrics tracker, next to the load-balancing
loss, so they reach the training log and TensorBoard.
Must not touch: routing math (``routing.py``), collectives (``token_dispatcher.py``).
"""

from __future__ import annotations

import dataclasses
import weakref

import torch
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker
from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron.rectify.config import RectifyConfigError, rectify_options_from_config
from megatron.rectify.router import RectifyRouter
from megatron.rectify.routing import RoutingStatistics
from megatron.rectify.token_dispatcher import MoERectifyAlltoAllTokenDispatcher

#: Names under which the statistics appear in megatron's MoE metrics (log and TensorBoard).
#: Recorded on every training call for which ``RectifyRouter.statistics()`` has counts: rectified
#: calls and megatron's own top-k-with-capacity calls alike (so ``--moe-rectify none`` logs
#: megatron's real drop rate, a vanilla baseline). Register them only where
#: ``router.routing_statistics_available`` holds: megatron reports an unrecorded name as 0.00.
STATISTIC_NAMES = (
    "rectify_dropped_pct",
    "rectify_padded_pct",
    "rectify_filled_in_pct",
    "rectify_rectified_pct",
    "rectify_max_over_mean_load",
)


#: Every live rectified layer, so that the training entry point can print a per-layer summary.
LIVE_LAYERS: weakref.WeakSet = weakref.WeakSet()

_COUNTS = ("dropped", "padded", "filled_in", "rectified")
_TOTALS = ("num_requests", "slots", "num_tokens")


def statistic_tensors(stats: RoutingStatistics) -> dict[str, torch.Tensor]:
    """The logged rates as 0-d tensors (no host sync on the training path)."""
    load = stats.expert_load.float()
    return {
        "rectify_dropped_pct": 100.0 * stats.dropped.float() / max(stats.num_requests, 1),
        "rectify_padded_pct": 100.0 * stats.padded.float() / max(stats.slots, 1),
        "rectify_filled_in_pct": 100.0 * stats.filled_in.float() / max(stats.slots, 1),
        "rectify_rectified_pct": 100.0 * stats.rectified.float() / max(stats.num_tokens, 1),
        "rectify_max_over_mean_load": load.max() / load.mean().clamp_min(1e-9),
    }


class RectifyMoELayer(MoELayer):
    """An ``MoELayer`` whose top-k routing is rectified (IR / FR) per ``config.moe_rectify``."""

    def __init__(
        self,
        config: TransformerConfig,
        submodules: MoESubmodules | None = None,
        layer_number: int | None = None,
        pg_collection: ProcessGroupCollection | None = None,
        is_mtp_layer: bool = False,
        name: str | None = None,
    ) -> None:
        options = rectify_options_from_config(config)
        if options.enabled and config.moe_token_dispatcher_type != "alltoall":
            raise RectifyConfigError(
                f"--moe-rectify {config.moe_rectify} needs --moe-token-dispatcher-type alltoall "
                f"(got {config.moe_token_dispatcher_type!r}): only the rectified alltoall "
                "dispatcher keeps intra-GPU-rectified tokens off the all-to-all."
            )
        if submodules is not None and submodules.router is TopKRouter:
            submodules = dataclasses.replace(submodules, router=RectifyRouter)
        if pg_collection is None:
            pg_collection = get_default_pg_collection()
        super().__init__(config, submodules, layer_number, pg_collection, is_mtp_layer, name)
        if not isinstance(self.router, RectifyRouter):
            raise TypeError(f"RectifyMoELayer needs a RectifyRouter, got {type(self.router)}")
        if config.moe_token_dispatcher_type == "alltoall":
            self.token_dispatcher = MoERectifyAlltoAllTokenDispatcher(
                self.num_local_experts,
                self.local_expert_indices,
                config=self.config,
                pg_collection=pg_collection,
            )
            if self.use_shared_expert and self.shared_expert_overlap:
                self.token_dispatcher.set_shared_experts(self.shared_experts)
        # Training-time totals since construction (device tensors: no host sync per step).
        self.cumulative_statistics: dict[str, torch.Tensor] = {}
        LIVE_LAYERS.add(self)

    def route(self, hidden_states: torch.Tensor, padding_mask: torch.Tensor | None = None):
        """megatron's routing, then hand the IR decision to the dispatcher and log statistics."""
        probs, routing_map = super().route(hidden_states, padding_mask)
        decision = self.router.last_routing
        if isinstance(self.token_dispatcher, MoERectifyAlltoAllTokenDispatcher):
            if decision is None:
                self.token_dispatcher.set_intra_gpu_assignment(None, None)
            else:
                self.token_dispatcher.set_intra_gpu_assignment(
                    decision.ir_expert, decision.ir_probs
                )
        if self.training and torch.is_grad_enabled():
            stats = self.router.statistics()  # rectified, or megatron's own decision counted
            if stats is not None:
                self._record_statistics(stats)
        return probs, routing_map

    def statistics_summary(self) -> dict[str, float]:
        """Percentages over every training call so far (this rank's tokens); one host sync."""
        totals = {k: float(v) for k, v in self.cumulative_statistics.items()}
        if not totals:
            return {}
        return {
            "dropped_pct": 100.0 * totals["dropped"] / max(totals["num_requests"], 1.0),
            "padded_pct": 100.0 * totals["padded"] / max(totals["slots"], 1.0),
            "filled_in_pct": 100.0 * totals["filled_in"] / max(totals["slots"], 1.0),
            "rectified_pct": 100.0 * totals["rectified"] / max(totals["num_tokens"], 1.0),
        }

    def _record_statistics(self, stats: RoutingStatistics) -> None:
        for name in _COUNTS:
            value = getattr(stats, name).detach().to(torch.float64)
            if name in self.cumulative_statistics:
                self.cumulative_statistics[name] += value
            else:
                self.cumulative_statistics[name] = value.clone()
        for name in _TOTALS:
            self.cumulative_statistics[name] = self.cumulative_statistics.get(name, 0) + getattr(
                stats, name
            )
        if self.layer_number is None:
            return
        num_layers = self.config.num_layers + (self.config.mtp_num_layers or 0)
        layer_number = self.layer_number + (self.config.num_layers if self.is_mtp_layer else 0)
        tracker = get_moe_metrics_tracker()
        for name, value in statistic_tensors(stats).items():
            tracker.record(name, value, layer_number, num_layers, needs_dp_avg=True)
