"""``RectifyRouter``: megatron's ``TopKRouter`` with Intra-GPU and Fill-in Rectification.

Owns: turning logits into the rectified decision for one MoE layer call, attaching megatron's
aux losses to it, and returning it to the layer as a value (:class:`RouterOutput`). The routing
math itself lives in ``megatron.rectify.routing`` (pure tensors); this module only adds what
needs the module: parameters, megatron's score functions and losses, and which experts are
local to this expert-parallel rank.
Must not touch: the dispatcher or its state, process groups beyond reading the EP rank.

With rectification off it *is* ``TopKRouter`` (the parent's ``routing`` runs unchanged), so
``probs``/``routing_map`` are bit-identical to megatron's.

Hand-off: ``router(x)`` keeps megatron's contract ``(probs, routing_map)``;
``router(x, with_decision=True)`` (what ``RectifyMoELayer.route`` calls) returns the
:class:`RouterOutput`, whose ``decision`` (IR destinations and weights included) the layer
passes on to the dispatcher. ``last_output`` / ``last_routing`` are observation points for
tests, logging and benchmarks only: no product code reads them.

Workflow of a rectified call:
    (1) gating: logits = x W_g (on the input's device; megatron's version forces CUDA), after
        megatron's input jitter, and with its forced-balance / forced-bias benchmark logits.
    (2) z-loss, then megatron's top-k selection (score function, pre-softmax, group-limited
        routing, expert bias) gives ``topk_indices`` [T, k] in choice order.
    (3) ``p``: the full score distribution over all experts (softmax, or sigmoid/sqrt-softplus).
    (4) ``rectified_routing``: capacity truncation, FR, IR, gate weights, and with
        ``--moe-pad-expert-input-to-capacity`` zero-weight padding so every column of the
        returned ``routing_map`` holds exactly ``C`` tokens (megatron's padded dispatcher
        contract; see ``RectifiedRouting``).
    (5) aux losses (load balancing, seq/global, as configured) attached to ``probs``;
        expert-bias token counts updated from the routed pairs only (``routed_map``: padding
        pairs are no tokens an expert serves).

Statistics (``statistics(output)``) exist for megatron's path too, so that a run that trains
unrectified (``--moe-rectify none``, e.g. with inference-only ``--moe-rectify-eval``) logs
megatron's true drop / padding rates instead of zeros.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core import utils as mcore_utils
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.moe.moe_utils import (
    apply_biased_logits,
    apply_random_logits,
    compute_routing_scores_for_aux_loss,
    get_capacity,
    get_default_pg_collection,
    router_gating_linear,
    topk_routing_with_score_function,
)
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron.rectify.config import (
    RectifyConfigError,
    RectifyOptions,
    rectify_options_from_config,
    uses_alltoall_dispatcher,
)
from megatron.rectify.routing import RectifiedRouting, rectified_routing
from megatron.rectify.statistics import (
    RoutingStatistics,
    routing_statistics,
    routing_statistics_available,
)


@dataclass
class _MegatronCall:
    """What megatron's own routing returned, kept so the statistics can count it later."""

    logits: torch.Tensor  # [T, E], detached
    probs: torch.Tensor  # [T, E], detached
    routing_map: torch.Tensor  # [T, E]: kept top-k requests (+ megatron's zero-weight padding)
    grad_enabled: bool  # megatron's top-k sorts only with grad on; recompute in the same mode


@dataclass
class RouterOutput:
    """One router call, as the router hands it to the layer.

    Attributes:
        probs: [T, E] gate weights for the dispatcher (megatron's ``probs``).
        routing_map: [T, E] bool pairs sent through the all-to-all (megatron's ``routing_map``).
        decision: the full rectified decision (IR destinations and weights, kept / fill-in /
            dropped / padding maps), or ``None`` when megatron's own top-k routed the call.
        megatron_call: megatron's own result, kept for ``RectifyRouter.statistics`` (``None``
            when rectified, or when megatron's path has no truthful statistics).
    """

    probs: torch.Tensor
    routing_map: torch.Tensor
    decision: RectifiedRouting | None = None
    megatron_call: _MegatronCall | None = None


def full_score_distribution(logits: torch.Tensor, score_function: str) -> torch.Tensor:
    """``p`` over all experts, as megatron's score functions define it (no top-k).

    Computed in fp32 like megatron, or in fp64 when the logits are fp64 (``--moe-router-dtype
    fp64``), so that asking for more precision is never silently undone.
    """
    dtype = torch.promote_types(logits.dtype, torch.float32)
    if score_function == "softmax":
        return torch.softmax(logits, dim=-1, dtype=dtype)
    if score_function == "sigmoid":
        return torch.sigmoid(logits.to(dtype))
    if score_function == "sqrtsoftplus":
        return torch.nn.functional.softplus(logits.to(dtype)).sqrt()
    raise ValueError(f"Invalid score_function: {score_function}")


def router_compute_dtype(config: TransformerConfig, input_dtype: torch.dtype) -> torch.dtype:
    """The dtype the gating GEMM runs in (``--moe-router-dtype``)."""
    if config.moe_router_dtype == "fp32":
        return torch.float32
    if config.moe_router_dtype == "fp64":
        return torch.float64
    return input_dtype


class RectifyRouter(TopKRouter):
    """Top-k router whose capacity overflow and padding are rectified (IR / FR).

    Reads its settings from ``config.moe_rectify*`` (see ``RectifyTransformerConfig``); a plain
    ``TransformerConfig`` means rectification off. ``forward(x, with_decision=True)`` returns
    the :class:`RouterOutput` of the call; ``last_output`` keeps it for observation only.
    """

    def __init__(
        self,
        config: TransformerConfig,
        pg_collection: ProcessGroupCollection | None = None,
        is_mtp_layer: bool = False,
    ) -> None:
        if pg_collection is None:
            pg_collection = get_default_pg_collection()
        super().__init__(config=config, pg_collection=pg_collection, is_mtp_layer=is_mtp_layer)
        ep_group = getattr(pg_collection, "ep", None)
        ep_size = mcore_utils.get_pg_size(ep_group)
        ep_rank = mcore_utils.get_pg_rank(ep_group)
        num_local = self.num_experts // ep_size
        self.local_experts = range(ep_rank * num_local, (ep_rank + 1) * num_local)
        self.rectify_options: RectifyOptions = rectify_options_from_config(config)
        #: The last call's output. An observation point for tests, logging and benchmarks,
        #: never a control path: the layer gets each call's output as the return value.
        self.last_output: RouterOutput | None = None
        #: The gate-scaling control (``set_unit_gate``); off unless a caller switches it on.
        self.unit_gate = False

    @property
    def last_routing(self) -> RectifiedRouting | None:
        """The last call's rectified decision (``None``: megatron routed). Observation only."""
        return None if self.last_output is None else self.last_output.decision

    def set_rectify_options(self, options: RectifyOptions) -> None:
        """Switch rectification for later calls (e.g. inference-only rectification)."""
        self.rectify_options = options

    def set_unit_gate(self, enabled: bool) -> None:
        """The gate-scaling control of the quality benchmark (``Top-1 (gate 1)``): unrectified
        top-1 calls weight each routed token ``1 + p - sg(p)`` (forward 1, gradient as if
        ``p``), the gate weight every rectified top-1 call has, instead of megatron's ``p``; so
        that a rectified-vs-vanilla comparison does not also compare two gate scalings.

        Applied to the ``probs`` megatron's routing returns, after its aux-loss autograd hooks
        (the load-balancing gradient is unchanged); zero entries (dropped, padding) stay zero.
        No effect on rectified calls or with top-k > 1. Not a training flag: the benchmark sets
        it on the built model.
        """
        self.unit_gate = enabled

    def rectifies(self) -> bool:
        """Whether calls are rectified now: rectification on and a capacity to rectify."""
        return self.rectify_options.enabled and self.config.moe_expert_capacity_factor is not None

    def forward(
        self,
        input: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
        *,
        with_decision: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor] | RouterOutput:
        """megatron's ``(probs, routing_map)``, or with ``with_decision`` the whole
        :class:`RouterOutput` (the decision the layer hands to the dispatcher)."""
        output = self.route_logits(self.router_logits(input), padding_mask)
        self.last_output = output
        if with_decision:
            return output
        return output.probs, output.routing_map

    def router_logits(self, input: torch.Tensor) -> torch.Tensor:
        """Steps (1) of a call: ``TopKRouter.forward`` of megatron-core 0.19.2 up to its
        ``self.routing(logits)`` call, line for line.

        NOTE: reproduced rather than inherited because megatron's ``forward`` returns only
        ``routing``'s two tensors, and the decision must come back as a value.
        ``tests/unit/test_router.py`` fails loudly when megatron's ``forward`` changes.
        """
        self._maintain_float32_expert_bias()
        input = self.apply_input_jitter(input)
        logits = self.gating(input)
        if self.config.moe_router_force_load_balancing:
            logits = apply_random_logits(logits)
        if self.config.moe_router_force_biased is not None:
            logits = apply_biased_logits(
                logits, self.config.moe_router_force_biased, self.layer_number
            )
        return logits

    def gating(self, input: torch.Tensor) -> torch.Tensor:
        """Router logits on the input's device (megatron's version moves weights to CUDA)."""
        for param in (self.weight, self.bias):
            if param is not None and param.device != input.device:
                param.data = param.data.to(device=input.device)
        dtype = router_compute_dtype(self.config, input.dtype)
        return router_gating_linear(input, self.weight, self.bias, dtype)

    def routing(
        self, logits: torch.Tensor, padding_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """megatron's ``TopKRouter.routing`` contract, for callers of that hook (``forward``
        itself calls ``route_logits``)."""
        output = self.route_logits(logits, padding_mask)
        self.last_output = output
        return output.probs, output.routing_map

    def route_logits(
        self, logits: torch.Tensor, padding_mask: torch.Tensor | None = None
    ) -> RouterOutput:
        """Steps (2)-(5): megatron's own routing, or the rectified decision."""
        self._refuse_capacity_beyond_the_tokens(logits.numel() // self.num_experts)
        if not self.rectifies():
            probs, routing_map = super().routing(logits, padding_mask=padding_mask)
            megatron_call = None
            if routing_statistics_available(self.config):
                megatron_call = _MegatronCall(
                    logits.detach().view(-1, self.num_experts),
                    probs.detach(),
                    routing_map,
                    torch.is_grad_enabled(),
                )
            if self.unit_gate and self.topk == 1:
                probs = torch.where(probs != 0, 1 + probs - probs.detach(), probs)
            return RouterOutput(probs, routing_map, megatron_call=megatron_call)
        decision = self._rectified_decision(logits, padding_mask)
        return RouterOutput(decision.probs, decision.routing_map, decision=decision)

    def _rectified_decision(
        self, logits: torch.Tensor, padding_mask: torch.Tensor | None
    ) -> RectifiedRouting:
        seq_length, bsz = logits.shape[:2]
        logits = logits.view(-1, self.num_experts)
        if padding_mask is not None:
            padding_mask = padding_mask.reshape(-1)
        logits = self.apply_z_loss(logits, padding_mask=padding_mask)

        probs_full = full_score_distribution(logits, self.score_function)  # [T, E]
        selection_scores = probs_full
        if self.expert_bias is not None and self.score_function != "softmax":
            selection_scores = probs_full + self.expert_bias.float()
        topk_indices, candidate_indices = self._select_experts(logits, selection_scores)

        num_tokens = logits.shape[0]
        capacity = get_capacity(
            num_tokens=num_tokens * self.topk,
            num_experts=self.num_experts,
            capacity_factor=self.config.moe_expert_capacity_factor,
        )
        decision = rectified_routing(
            probs_full,
            topk_indices,
            capacity,
            self.rectify_options,
            self.local_experts,
            selection_scores=selection_scores,
            scaling_factor=self.config.moe_router_topk_scaling_factor,
            candidate_indices=candidate_indices,
            pad_to_capacity=self.config.moe_pad_expert_input_to_capacity,
        )
        decision.probs = decision.probs.type_as(logits)
        decision.ir_probs = decision.ir_probs.type_as(logits)
        decision.probs = self._attach_aux_losses(
            decision.probs, logits, padding_mask, seq_length, bsz
        )
        # Only real (token, expert) pairs steer the expert bias; padding pairs are empty slots.
        self._apply_expert_bias(decision.routed_map, padding_mask=padding_mask)
        return decision

    def statistics(self, output: RouterOutput | None = None) -> RoutingStatistics | None:
        """Counts of one call (``output``; by default the last call, as an observation):
        rectified, or megatron's own top-k with capacity.

        ``None`` when there is nothing truthful to count (see ``routing_statistics_available``).
        For megatron's path, call it right after the router call (``RectifyMoELayer.route``
        does): it recomputes megatron's top-k from the kept logits with the current expert bias.
        """
        if output is None:
            output = self.last_output
        if output is None:
            return None
        if output.decision is not None:
            return routing_statistics(output.decision, self.topk)
        if output.megatron_call is None:
            return None
        return routing_statistics(self._megatron_decision(output.megatron_call), self.topk)

    def _megatron_decision(self, call: _MegatronCall) -> RectifiedRouting:
        """megatron's routing as a ``RectifiedRouting`` (no FR, no IR), for the statistics.

        megatron returns only its final map: with ``--moe-pad-expert-input-to-capacity`` that
        map also holds its zero-weight padding pairs, which must not count as routed. Its own
        top-k selection (same function, same arguments, same grad mode, so the same experts)
        separates them exactly: kept = final & top-k, padding = final & ~top-k, dropped =
        top-k & ~final. No host sync.
        """
        num_tokens, num_experts = call.logits.shape
        with torch.set_grad_enabled(call.grad_enabled):
            _, topk_map = topk_routing_with_score_function(
                call.logits,
                self.topk,
                use_pre_softmax=self.config.moe_router_pre_softmax,
                num_groups=self.config.moe_router_num_groups,
                group_topk=self.config.moe_router_group_topk,
                scaling_factor=self.config.moe_router_topk_scaling_factor,
                score_function=self.score_function,
                expert_bias=self.expert_bias,
                fused=self.config.moe_router_fusion,
            )
        routing_map = call.routing_map
        return RectifiedRouting(
            probs=call.probs,
            routing_map=routing_map,
            ir_expert=torch.full((num_tokens,), -1, dtype=torch.int64, device=topk_map.device),
            ir_probs=torch.zeros(num_tokens, dtype=call.probs.dtype, device=topk_map.device),
            kept_map=routing_map & topk_map,
            fill_in_map=torch.zeros_like(routing_map),
            dropped_map=topk_map & ~routing_map,
            padding_map=routing_map & ~topk_map,
            capacity=get_capacity(
                num_tokens=num_tokens * self.topk,
                num_experts=num_experts,
                capacity_factor=self.config.moe_expert_capacity_factor,
            ),
        )

    def _refuse_capacity_beyond_the_tokens(self, num_tokens: int) -> None:
        """Padding to capacity ``C`` needs ``C`` distinct tokens per expert buffer.

        With ``C > T`` (``k * f > E``, or ``k * f == E`` and a float round-up in megatron's
        ``get_capacity``) megatron's padded alltoall dispatcher fails with a shape error, and
        an exactly-``C`` rectified map cannot exist. Host integers only: no sync.
        """
        config = self.config
        if not config.moe_pad_expert_input_to_capacity or config.moe_expert_capacity_factor is None:
            return
        if not self.rectifies() and not uses_alltoall_dispatcher(config):
            return
        capacity = get_capacity(
            num_tokens=num_tokens * self.topk,
            num_experts=self.num_experts,
            capacity_factor=config.moe_expert_capacity_factor,
        )
        if capacity > num_tokens:
            raise RectifyConfigError(
                f"--moe-pad-expert-input-to-capacity with --moe-expert-capacity-factor "
                f"{config.moe_expert_capacity_factor}, top-{self.topk} and {self.num_experts} "
                f"experts gives {capacity} slots per expert but this rank routes only "
                f"{num_tokens} tokens: a padded expert buffer cannot be filled. Use a capacity "
                f"factor below {self.num_experts / self.topk:g} or drop "
                "--moe-pad-expert-input-to-capacity."
            )

    def _select_experts(
        self, logits: torch.Tensor, selection_scores: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Top-k experts in choice order [T, k], and the (k+1)-th choice [T, 1] when FR wants it.

        NOTE: without group-limited routing the selection is a plain top-k of the selection
        scores (the same experts megatron picks: softmax preserves the logits' order, and expert
        bias enters exactly as in megatron's sigmoid path), taken sorted in one call that also
        yields the fill-in candidate. Group-limited routing goes through megatron's own function,
        whose indices are re-sorted, because choice rank matters for capacity (first choices are
        placed before second choices); its fill-in candidates are computed by the routing math.
        """
        options = self.rectify_options
        wants_next = (
            options.fill_in
            and options.fill_in_candidates == "next"
            and self.topk < self.num_experts
        )
        if not self.config.moe_router_group_topk:
            depth = self.topk + int(wants_next)
            ranked = selection_scores.detach().topk(depth, dim=1, sorted=True).indices
            return ranked[:, : self.topk], (ranked[:, self.topk :] if wants_next else None)
        _, topk_indices = topk_routing_with_score_function(
            logits,
            self.topk,
            use_pre_softmax=self.config.moe_router_pre_softmax,
            num_groups=self.config.moe_router_num_groups,
            group_topk=self.config.moe_router_group_topk,
            score_function=self.score_function,
            expert_bias=self.expert_bias,
            fused=False,
            dense_output=True,
        )
        chosen_scores = selection_scores.detach().gather(1, topk_indices)
        order = chosen_scores.sort(dim=1, descending=True, stable=True).indices
        return topk_indices.gather(1, order), None

    def _attach_aux_losses(
        self,
        probs: torch.Tensor,
        logits: torch.Tensor,
        padding_mask: torch.Tensor | None,
        seq_length: int,
        bsz: int,
    ) -> torch.Tensor:
        """Attach megatron's configured load-balancing losses, computed as ``TopKRouter`` does.

        The losses see the unrectified top-k selection: they balance what the router *wants*,
        which rectification does not change.
        """
        if not (self.training and torch.is_grad_enabled() and self.is_aux_loss_enabled()):
            return probs
        routing_map_for_aux_loss, scores_for_aux_loss = compute_routing_scores_for_aux_loss(
            logits,
            self.topk,
            self.score_function,
            fused=self.config.moe_router_fusion,
            padding_mask=padding_mask,
        )
        with_padding_mask = padding_mask is not None
        probs = self._apply_aux_loss(
            probs, scores_for_aux_loss, routing_map_for_aux_loss, with_padding_mask
        )
        probs = self._apply_seq_aux_loss(
            probs,
            scores_for_aux_loss,
            routing_map_for_aux_loss,
            seq_length,
            bsz,
            with_padding_mask,
        )
        return self._apply_global_aux_loss(
            probs, scores_for_aux_loss, routing_map_for_aux_loss, with_padding_mask
        )
