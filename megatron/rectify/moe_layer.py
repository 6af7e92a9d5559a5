"""``RectifyMoELayer``: megatron's ``MoELayer`` with the rectified router and dispatcher.

Owns: wiring. It stays an ``MoELayer`` (transformer layers check ``isinstance``), builds a
``RectifyRouter`` (the spec may also name it), swaps megatron's alltoall / allgather dispatcher
for ``MoERectifyAlltoAllTokenDispatcher`` / ``MoERectifyAllGatherTokenDispatcher`` after
construction (megatron picks dispatchers by a hard-coded string), hands each call's decision
from the router to the dispatcher, and records the per-layer routing statistics in megatron's
MoE metrics tracker, next to the load-balancing loss, so they reach the training log and
TensorBoard, and hands every call's statistics to the registered routing observers
(``add_routing_observer``: benchmarks, evaluation summaries).
Must not touch: routing math (``routing.py``), collectives (``token_dispatcher.py``,
``intra_gpu_batch.py``, ``allgather_dispatcher.py``).

One call, top-down (megatron's ``MoELayer.forward`` drives it; ours marked *):
    route*       ``self.router(x, with_decision=True)`` -> ``RouterOutput`` (probs, routing_map,
                 decision); statistics recorded from it; the decision is handed to preprocess.
    preprocess*  ``token_dispatcher.dispatch_preprocess(x, routing_map, probs, decision=...)``:
                 megatron's permute plus the IR split (alltoall), or the IR pairs added
                 to the map every rank gathers anyway (allgather).
    dispatch / routed_experts_compute / combine / postprocess: megatron's, through the
                 dispatcher's hooks (see ``token_dispatcher.py``).

NOTE: the hand-off from ``route`` to ``preprocess`` is the one place where the decision rides
on the layer (``_decision_for_preprocess``, set by ``route``, taken by the next ``preprocess``).
megatron's ``forward``, its fine-grained schedule callables and its CUDA-graph paths all call
``route()`` and then ``preprocess(hidden_states, probs, routing_map)`` with megatron's two tensors
only; passing a third value would mean re-implementing ``MoELayer.forward`` (recompute, partial
CUDA-graph capture, execution maps). From ``preprocess`` on, the decision is an argument.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker
from megatron.core.transformer.moe.moe_utils import (
    get_default_pg_collection,
    maybe_skip_or_early_return_by_cudagraph,
)
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron.rectify.allgather_dispatcher import MoERectifyAllGatherTokenDispatcher
from megatron.rectify.config import (
    ALLGATHER,
    ALLTOALL,
    RectifyConfigError,
    dispatcher_problem,
)
from megatron.rectify.router import RectifyRouter
from megatron.rectify.routing import RectifiedRouting
from megatron.rectify.statistics import (
    RATE_TOTALS,
    RoutingStatistics,
    max_over_mean_load,
    routing_rates,
)
from megatron.rectify.token_dispatcher import MoERectifyAlltoAllTokenDispatcher

#: The rates of ``statistics.RATES`` that the training log carries (``lost`` is only summarised by
#: the quality benchmark), plus the load imbalance.
LOGGED_RATES = ("dropped_pct", "padded_pct", "filled_in_pct", "rectified_pct")

#: Names under which the statistics appear in megatron's MoE metrics (log and TensorBoard).
#: Recorded on every training call for which ``RectifyRouter.statistics()`` has counts: rectified
#: calls and megatron's own top-k-with-capacity calls alike (so ``--moe-rectify none`` logs
#: megatron's real drop rate, a vanilla baseline). Register them only where
#: ``statistics.routing_statistics_available`` holds: megatron reports an unrecorded name as 0.00.
STATISTIC_NAMES = (
    *(f"rectify_{rate}" for rate in LOGGED_RATES),
    "rectify_max_over_mean_load",
)


#: megatron's dispatcher name -> the rectified dispatcher ``RectifyMoELayer`` builds instead
#: (always, so that ``--moe-rectify none`` and runtime switches use the same object).
RECTIFIED_DISPATCHERS = {
    ALLTOALL: MoERectifyAlltoAllTokenDispatcher,
    ALLGATHER: MoERectifyAllGatherTokenDispatcher,
}

#: ``observer(layer, stats, training)``; see ``add_routing_observer``.
RoutingObserver = Callable[["RectifyMoELayer", RoutingStatistics | None, bool], None]
_ROUTING_OBSERVERS: list[RoutingObserver] = []


def add_routing_observer(observer: RoutingObserver) -> Callable[[], None]:
    """Call ``observer(layer, stats, training)`` after every routed call of every
    ``RectifyMoELayer``, training and evaluation calls alike; returns a function that removes it.

    ``stats`` is the call's ``RoutingStatistics`` (``layer.router.statistics(output)``: rectified
    calls, and megatron's own top-k with a capacity), or ``None`` where the router has no
    truthful count (dropless, sinkhorn, replayed routing; see
    ``statistics.routing_statistics_available``). ``training`` is whether the layer counted the call
    as training (training mode and gradients on): those statistics are already in
    ``cumulative_statistics`` and the training log. The counts are device tensors: an observer
    that reads them syncs the host. Observation only: an observer must not change the routing.
    While an observer is registered, evaluation calls compute their statistics too (on
    megatron's path one top-k recompute per call).
    """
    _ROUTING_OBSERVERS.append(observer)

    def remove() -> None:
        if observer in _ROUTING_OBSERVERS:
            _ROUTING_OBSERVERS.remove(observer)

    return remove


#: What ``cumulative_statistics`` sums: the counts and totals of the logged rates.
_COUNTS = ("dropped", "padded", "filled_in", "rectified")
_TOTALS = RATE_TOTALS


def statistic_tensors(stats: RoutingStatistics) -> dict[str, torch.Tensor]:
    """The logged rates as 0-d tensors (no host sync on the training path)."""
    counts = {name: getattr(stats, name).float() for name in _COUNTS}
    counts.update({name: getattr(stats, name) for name in _TOTALS})
    rates = routing_rates(counts)
    return {
        **{f"rectify_{rate}": rates[rate] for rate in LOGGED_RATES},
        "rectify_max_over_mean_load": max_over_mean_load(stats.expert_load),
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
        problem = dispatcher_problem(config)
        if problem:
            raise RectifyConfigError(problem)
        if submodules is not None and submodules.router is TopKRouter:
            submodules = dataclasses.replace(submodules, router=RectifyRouter)
        if pg_collection is None:
            pg_collection = get_default_pg_collection()
        super().__init__(config, submodules, layer_number, pg_collection, is_mtp_layer, name)
        if not isinstance(self.router, RectifyRouter):
            raise TypeError(f"RectifyMoELayer needs a RectifyRouter, got {type(self.router)}")
        dispatcher_class = RECTIFIED_DISPATCHERS.get(config.moe_token_dispatcher_type)
        if dispatcher_class is not None:
            self.token_dispatcher = dispatcher_class(
                self.num_local_experts,
                self.local_expert_indices,
                config=self.config,
                pg_collection=pg_collection,
            )
            if self.use_shared_expert and self.shared_expert_overlap:
                self.token_dispatcher.set_shared_experts(self.shared_experts)
        # Training-time totals since construction (device tensors: no host sync per step).
        self.cumulative_statistics: dict[str, torch.Tensor] = {}
        # The route -> preprocess hand-off (see the module docstring's NOTE).
        self._decision_for_preprocess: RectifiedRouting | None = None

    @maybe_skip_or_early_return_by_cudagraph("route")
    def route(self, hidden_states: torch.Tensor, padding_mask: torch.Tensor | None = None):
        """The router's output: ``(probs, routing_map)`` for megatron's forward, the decision
        for the next ``preprocess``, and the call's statistics for the training log and the
        routing observers."""
        output = self.router(hidden_states, padding_mask, with_decision=True)
        self._decision_for_preprocess = output.decision
        training = self.training and torch.is_grad_enabled()
        if training or _ROUTING_OBSERVERS:
            stats = self.router.statistics(output)  # rectified, or megatron's decision counted
            if training and stats is not None:
                self.record_statistics(stats)
            for observer in tuple(_ROUTING_OBSERVERS):
                observer(self, stats, training)
        return output.probs, output.routing_map

    @maybe_skip_or_early_return_by_cudagraph("preprocess")
    def preprocess(
        self, hidden_states: torch.Tensor, probs: torch.Tensor, routing_map: torch.Tensor
    ):
        """Hand the decision of the preceding ``route`` to the dispatcher's preprocess.

        A call megatron routed (no decision), or another dispatcher, runs megatron's own
        ``MoELayer.preprocess`` unchanged. A rectified call runs that method's training steps
        (the latent projection, then ``dispatch_preprocess``) with the decision as an argument.
        """
        decision = self._take_decision(routing_map)
        if decision is None or not isinstance(
            self.token_dispatcher, tuple(RECTIFIED_DISPATCHERS.values())
        ):
            return _megatron_preprocess(self, hidden_states, probs, routing_map)
        if self.config.moe_latent_size:
            if self.shared_expert_overlap:  # megatron refuses this outside NVLS inference
                raise AssertionError(
                    "Shared expert overlap with MoE latent projections is not supported with "
                    "a rectified dispatcher. Disable moe_shared_expert_overlap."
                )
            hidden_states, _ = self.fc1_latent_proj(hidden_states)
        return self.token_dispatcher.dispatch_preprocess(
            hidden_states, routing_map, probs, decision=decision
        )

    def _take_decision(self, routing_map: torch.Tensor) -> RectifiedRouting | None:
        """The decision ``route`` left for this ``preprocess``, if it belongs to ``routing_map``.

        It belongs when ``routing_map`` is the very tensor ``route`` returned. It does not when
        ``route`` was skipped (a CUDA-graph replay of the router): a stale decision is dropped,
        and refused when it may carry IR tokens, which would otherwise be computed for the wrong
        rows or lost.
        """
        decision, self._decision_for_preprocess = self._decision_for_preprocess, None
        if decision is None or decision.routing_map is routing_map:
            return decision
        if self.router.rectify_options.intra_gpu:
            raise RuntimeError(
                "RectifyMoELayer.preprocess got a routing_map its route() did not return (is the "
                "router replayed from a CUDA graph?): intra-GPU rectification needs each call's "
                "decision. Leave the MoE router out of the CUDA graph with --moe-rectify ir."
            )
        return None

    def statistics_summary(self) -> dict[str, float]:
        """Percentages over every training call so far (this rank's tokens); one host sync."""
        totals = {k: float(v) for k, v in self.cumulative_statistics.items()}
        if not totals:
            return {}
        return routing_rates(totals)

    def record_statistics(self, stats: RoutingStatistics) -> None:
        """Add one training call's counts to ``cumulative_statistics`` and to megatron's MoE
        metrics. ``route`` does it for every training call the router can count; a caller that
        counts calls the router cannot (e.g. the quality benchmark's dropless runs, which drop
        nothing by definition) may add them here."""
        for name in _COUNTS:
            value = getattr(stats, name).detach().to(torch.float64)
            if name in self.cumulative_statistics:
                self.cumulative_statistics[name] += value
            else:
                self.cumulative_statistics[name] = value.clone()
        for name in _TOTALS:  # device tensors added in place, like the counts: a CUDA-graph
            total = getattr(stats, name)  # replay re-runs the captured add, never this Python
            if name in self.cumulative_statistics:
                self.cumulative_statistics[name] += total
            else:
                self.cumulative_statistics[name] = torch.full(
                    (), total, dtype=torch.float64, device=stats.dropped.device
                )
        if self.layer_number is None:
            return
        num_layers = self.config.num_layers + (self.config.mtp_num_layers or 0)
        layer_number = self.layer_number + (self.config.num_layers if self.is_mtp_layer else 0)
        tracker = get_moe_metrics_tracker()
        for name, value in statistic_tensors(stats).items():
            tracker.record(name, value, layer_number, num_layers, needs_dp_avg=True)


#: megatron's ``MoELayer.preprocess`` without its CUDA-graph decorator (ours wraps the override).
_megatron_preprocess = MoELayer.preprocess.__wrapped__
