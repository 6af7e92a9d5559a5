"""``RectifyRouter``: megatron's ``TopKRouter`` with Intra-GPU and Fill-in Rectification.

Owns: turning logits into the rectified decision for one MoE layer call, attaching megatron's
aux losses to it, and keeping the last decision (``last_routing``) for the dispatcher and for
logging. The routing math itself lives in ``megatron.rectify.routing`` (pure tensors); this module
only adds what needs the module: parameters, megatron's score functions and losses, and which
experts are local to this expert-parallel rank.

With rectification off it *is* ``TopKRouter`` (the parent's ``routing`` runs unchanged), so
``probs``/``routing_map`` are bit-identical to megatron's.

Workflow of a rectified call:
    (1) gating: logits = x W_g (on the input's device; megatron's version forces CUDA).
    (2) z-loss, then megatron's top-k selection (score function, pre-softmax, group-limited
        routing, expert bias) gives ``topk_indices`` [T, k] in choice order.
    (3) ``p``: the full score distribution over all experts (softmax, or sigmoid/sqrt-softplus).
    (4) ``rectified_routing``: capacity truncation, FR, IR, gate weights.
    (5) aux losses (load balancing, seq/global, as configured) attached to ``probs``;
        expert-bias token counts updated from the dispatched ``routing_map``.
"""

from __future__ import annotations

import torch
from megatron.core import utils as mcore_utils
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.moe.moe_utils import (
    compute_routing_scores_for_aux_loss,
    get_capacity,
    get_default_pg_collection,
    router_gating_linear,
    topk_routing_with_score_function,
)
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron.rectify.config import RectifyOptions, rectify_options_from_config
from megatron.rectify.routing import (
    RectifiedRouting,
    RoutingStatistics,
    rectified_routing,
    routing_statistics,
)


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
    ``TransformerConfig`` means rectification off. After each call, ``last_routing`` holds the
    full :class:`RectifiedRouting` (IR destinations and weights included) or ``None`` when the
    call was not rectified.
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
        self.last_routing: RectifiedRouting | None = None

    def set_rectify_options(self, options: RectifyOptions) -> None:
        """Switch rectification for later calls (e.g. inference-only rectification)."""
        self.rectify_options = options

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
        """Return ``(probs, routing_map)`` for the dispatcher; rectified when options say so."""
        options = self.rectify_options
        if not options.enabled or self.config.moe_expert_capacity_factor is None:
            self.last_routing = None
            return super().routing(logits, padding_mask=padding_mask)

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
            options,
            self.local_experts,
            selection_scores=selection_scores,
            scaling_factor=self.config.moe_router_topk_scaling_factor,
            candidate_indices=candidate_indices,
        )
        decision.probs = decision.probs.type_as(logits)
        decision.ir_probs = decision.ir_probs.type_as(logits)
        probs = self._attach_aux_losses(decision.probs, logits, padding_mask, seq_length, bsz)
        decision.probs = probs
        self._apply_expert_bias(decision.routing_map, padding_mask=padding_mask)
        self.last_routing = decision
        return probs, decision.routing_map

    def statistics(self) -> RoutingStatistics | None:
        """Counts of the last rectified call (``None`` if it was not rectified)."""
        if self.last_routing is None:
            return None
        return routing_statistics(self.last_routing, self.topk)

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
