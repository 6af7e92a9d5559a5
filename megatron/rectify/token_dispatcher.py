"""The rectified alltoall token dispatcher: IR tokens stay home, fill-ins ride in padding slots.

Owns: moving one call's rectified decision to the experts and back. It is megatron's
``MoEAlltoAllTokenDispatcher`` for everything that crosses the EP all-to-all, plus the calls into
the IR side batch (``intra_gpu_batch.IntraGpuSideBatch``), which owns the IR tokens' own path.

The decision arrives as an argument: ``RectifyMoELayer.preprocess`` calls
``dispatch_preprocess(hidden_states, routing_map, probs, decision=...)`` with the router's
``RectifiedRouting`` (``None``: megatron routed, nothing to add). Nobody sets dispatcher state
from outside; the side batch keeps its per-call state from ``dispatch_preprocess`` to
``combine_postprocess``, like megatron's own dispatcher keeps its permutation metadata.

Workflow (megatron's steps unchanged, ours marked *; the side batch's step in brackets):
    (1)  dispatch preprocess: metadata + permute the all-to-all tokens (``routing_map`` = kept
         top-k + fill-in; with ``--moe-pad-expert-input-to-capacity`` fill-ins occupy slots
         that would be padding, so buffer shapes stay static, and the router tops every column
         up to exactly ``C`` with zero-weight padding pairs: megatron's padded path, TE's fused
         permute in particular, packs ``C`` rows per expert and relies on that count).
    (1*) [split] the IR tokens of this rank's input, per local expert, with their IR weights
         (static IR, ``--moe-rectify-ir-capacity-factor``: a fixed ``B`` rows per local expert,
         zero-weight rows where the budget is not used; no host sync in any step below).
    (2)  token dispatch: A2A(EP) - IR tokens are not part of it: zero extra inter-rank bytes.
    (3)  dispatch postprocess: AG(expert-TP) -> sort by local expert.
    (3*) [gather, interleave] AG(expert-TP) of the IR batch, merged per local expert with the
         received tokens so the experts run ONE pass over both.
    (4*) combine preprocess: [separate] the expert output into received / IR parts; RS(expert-TP)
         of the IR part.
    (4)  combine preprocess: unsort by local expert -> RS(expert-TP).
    (5)  token combine: A2A(EP).
    (6)  combine postprocess: unpermute (+ shared experts).
    (6*) [add_home] the IR outputs (already weighted with the IR gate weights) added at home.

Without IR tokens every step is megatron's own.
Must not touch: routing decisions (``routing.py``), the IR batch's layout (``intra_gpu_batch.py``).
"""

from __future__ import annotations

import torch
from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

from megatron.rectify.intra_gpu_batch import IntraGpuBatch, IntraGpuSideBatch, intra_gpu_batch
from megatron.rectify.routing import RectifiedRouting

__all__ = [
    "IntraGpuBatch",
    "MoERectifyAlltoAllTokenDispatcher",
    "intra_gpu_batch",
]


class MoERectifyAlltoAllTokenDispatcher(MoEAlltoAllTokenDispatcher):
    """megatron's alltoall dispatcher plus the intra-GPU-rectification side batch."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.intra_gpu = IntraGpuSideBatch(
            self.local_expert_indices[0],
            self.num_local_experts,
            self.tp_group if self.tp_size > 1 else None,
        )

    def dispatch_preprocess(
        self,
        hidden_states: torch.Tensor,
        routing_map: torch.Tensor,
        probs: torch.Tensor,
        decision: RectifiedRouting | None = None,
    ):
        """(1*) split off the decision's IR batch; (1) megatron's preprocess + permute."""
        if decision is None or not decision.intra_gpu:  # FR alone: no IR side batch at all
            self.intra_gpu.split(hidden_states, None, None)
        else:
            self.intra_gpu.split(
                hidden_states,
                decision.ir_expert,
                decision.ir_probs,
                decision.ir_slot,
                decision.ir_capacity,
            )
        return super().dispatch_preprocess(hidden_states, routing_map, probs)

    def dispatch_postprocess(self, global_input_tokens, global_probs):
        """(3) megatron's AG(TP) + sort; (3*) gather the IR batch and interleave per expert."""
        tokens, tokens_per_expert, probs = super().dispatch_postprocess(
            global_input_tokens, global_probs
        )
        if not self.intra_gpu.active:
            return tokens, tokens_per_expert, probs
        ir_tokens, ir_probs = self.intra_gpu.gather()
        return self.intra_gpu.interleave(tokens, probs, tokens_per_expert, ir_tokens, ir_probs)

    def combine_preprocess(self, hidden_states):
        """(4*) split received / IR outputs, RS(TP) the IR part; (4) megatron's unsort + RS."""
        if self.intra_gpu.active:
            hidden_states = self.intra_gpu.separate(hidden_states)
        return super().combine_preprocess(hidden_states)

    def combine_postprocess(self, permutated_local_input_tokens):
        """(6) megatron's unpermute (+ shared experts); (6*) add the IR outputs at home."""
        output = super().combine_postprocess(permutated_local_input_tokens)
        return self.intra_gpu.add_home(output)
