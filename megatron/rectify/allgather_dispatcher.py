"""The rectified allgather token dispatcher: IR pairs join the map every rank gathers anyway.

Owns: expressing one call's rectified decision in megatron's ``MoEAllGatherTokenDispatcher``
(``--moe-token-dispatcher-type allgather``, megatron's choice with TP and few experts). Nothing
else changes: megatron's gather, permute, reduce-scatter run as they are.

Why FR needs nothing here: FR lives in the router's ``routing_map`` and ``probs`` (fill-in pairs,
and with ``--moe-pad-expert-input-to-capacity`` zero-weight padding pairs that make every
column hold exactly ``C`` of this rank's tokens). megatron's allgather dispatcher gathers that map
and those weights over the expert-TP x EP group and permutes each rank's columns with
``num_out_tokens`` counted from the map, so it honours any map; it has no capacity-sized buffer
(unlike the alltoall dispatcher, whose padded path relies on exactly ``C`` per column).

Why IR needs no side batch: every rank of the expert-TP x EP group already receives every token
of the group (hidden states, the [T, E] map and the [T, E] weights). A token that IR sends to
``h``, the best expert of its HOME rank (the rank that routed it; ``RectifyRouter.local_experts``,
the same EP-rank range as this dispatcher's ``local_expert_indices``), therefore only needs the
pair ``(t, h)`` with weight ``ir_probs[t]`` in the map it routed with: after the gather, exactly
the ranks that hold ``h`` (the home rank and its expert-TP peers) compute it, in the same expert
pass as the other tokens, and the reduce-scatter returns the result home. The gathered tensors
have the same shapes with or without IR: zero extra bytes, and no host sync (the alltoall
dispatcher's IR side batch needs four).

A pair that is already in the map (the token kept ``h``, won a fill-in slot at ``h``, or pads
``h``'s column) gets the two weights added: ``(w + w_ir) f_h(x)`` instead of the alltoall path's
``w f_h(x) + w_ir f_h(x)``, the same value up to rounding, the same gradients. IR pairs come on
top of the padded ``C`` per column (IR has no capacity); the gathered column count of a local
expert is then ``group size * C`` plus the group's IR tokens for it.

Must not touch: routing decisions (``routing.py``), megatron's collectives.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.moe.token_dispatcher import MoEAllGatherTokenDispatcher

from megatron.rectify.routing import RectifiedRouting

__all__ = ["MoERectifyAllGatherTokenDispatcher", "with_intra_gpu_pairs"]


def with_intra_gpu_pairs(
    routing_map: torch.Tensor,
    probs: torch.Tensor,
    ir_expert: torch.Tensor,
    ir_probs: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``routing_map`` [T, E] and ``probs`` [T, E] with each IR pair ``(t, ir_expert[t])``
    added, its weight ``ir_probs[t]`` summed into ``probs`` (differentiable in both).

    ``ir_expert`` [T] is a global expert index or -1 (not rectified; ``ir_probs`` is 0 there,
    so those rows are unchanged). No host sync.
    """
    rectified = (ir_expert >= 0).unsqueeze(1)  # [T, 1]
    column = ir_expert.clamp(min=0).unsqueeze(1)  # [T, 1]
    ir_map = torch.zeros_like(routing_map).scatter_(1, column, rectified)
    weights = torch.where(rectified, ir_probs.unsqueeze(1), 0).to(probs.dtype)
    ir_weights = torch.zeros_like(probs).scatter(1, column, weights)
    return routing_map | ir_map, probs + ir_weights


class MoERectifyAllGatherTokenDispatcher(MoEAllGatherTokenDispatcher):
    """megatron's allgather dispatcher whose map also carries the call's IR pairs.

    ``dispatch_preprocess(..., decision=None)`` is megatron's own, call for call (rectification
    off, or a call megatron routed): bit-identical outputs and gradients.
    """

    def dispatch_preprocess(
        self,
        hidden_states: torch.Tensor,
        routing_map: torch.Tensor,
        probs: torch.Tensor,
        decision: RectifiedRouting | None = None,
    ):
        """Add the decision's IR pairs to ``routing_map`` / ``probs``; then megatron's step."""
        if decision is not None and decision.intra_gpu:
            routing_map, probs = with_intra_gpu_pairs(
                routing_map, probs, decision.ir_expert, decision.ir_probs
            )
        return super().dispatch_preprocess(hidden_states, routing_map, probs)
