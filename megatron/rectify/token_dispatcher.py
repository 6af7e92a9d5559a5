"""The rectified alltoall token dispatcher: IR tokens stay home, fill-ins ride in padding slots.

Owns: moving the rectified decision's tokens to experts and back. It is megatron's
``MoEAlltoAllTokenDispatcher`` for everything that crosses the EP all-to-all, plus a side batch
for the intra-GPU-rectified (IR) tokens that never enters it.

Workflow (megatron's steps unchanged, ours marked *):
    (1)  dispatch preprocess: metadata + permute the all-to-all tokens (``routing_map`` = kept
         top-k + fill-in; with ``--moe-pad-expert-input-to-capacity`` fill-ins occupy slots
         that would be padding, so buffer shapes stay static, and the router tops every column
         up to exactly ``C`` with zero-weight padding pairs: megatron's padded path, TE's fused
         permute in particular, packs ``C`` rows per expert and relies on that count).
    (1*) split off the IR tokens: rows of this rank's input whose IR destination is a local
         expert, grouped by local expert, with their IR gate weights.
    (2)  token dispatch: A2A(EP) - IR tokens are not part of it: zero extra inter-rank bytes.
    (3)  dispatch postprocess: AG(expert-TP) -> sort by local expert.
    (3*) AG(expert-TP) of the IR batch, then interleave it per local expert so the experts run
         ONE pass (one grouped GEMM / one ``SequentialMLP`` loop) over received + IR tokens.
    (4*) combine preprocess: split the expert output back into received / IR parts; RS(expert-TP)
         of the IR part.
    (4)  combine preprocess: unsort by local expert -> RS(expert-TP).
    (5)  token combine: A2A(EP).
    (6)  combine postprocess: unpermute (+ shared experts).
    (6*) add the IR outputs (already weighted by the experts with the IR gate weights) at home.

The router hands the IR decision over through ``set_intra_gpu_assignment`` before each dispatch
(``RectifyMoELayer.route`` does that). Without IR tokens every step is megatron's own.
NOTE: the IR batch is variable-sized, so its per-expert counts need one host sync (the padded
all-to-all path itself stays sync-free).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

from megatron.rectify.comm import gather_rows, reduce_scatter_rows


@dataclass
class IntraGpuBatch:
    """This rank's IR tokens, grouped by local expert.

    Attributes:
        token_indices: [N] rows of the flattened layer input, grouped by local expert.
        counts: [num_local_experts] tokens per local expert on this rank (host list).
        probs: [N] IR gate weights of those rows.
    """

    token_indices: torch.Tensor
    counts: list[int]
    probs: torch.Tensor


def intra_gpu_batch(
    ir_expert: torch.Tensor, ir_probs: torch.Tensor, local_expert_start: int, num_local: int
) -> IntraGpuBatch:
    """Group the IR tokens (``ir_expert >= 0``) by local expert; ties keep token order."""
    rectified = (ir_expert >= 0).nonzero().squeeze(1)
    local = ir_expert[rectified] - local_expert_start
    order = local.argsort(stable=True)
    token_indices = rectified[order]
    counts = torch.bincount(local, minlength=num_local).tolist()  # the one host sync
    return IntraGpuBatch(token_indices, counts, ir_probs[token_indices])


def _concat(chunks: list[torch.Tensor] | tuple[torch.Tensor, ...]) -> torch.Tensor:
    """``torch.cat`` that returns a lone chunk as the view it is (one local expert, no TP)."""
    return chunks[0] if len(chunks) == 1 else torch.cat(list(chunks))


class MoERectifyAlltoAllTokenDispatcher(MoEAlltoAllTokenDispatcher):
    """megatron's alltoall dispatcher plus the intra-GPU-rectification side batch."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._ir_expert: torch.Tensor | None = None
        self._ir_probs: torch.Tensor | None = None
        self._ir: IntraGpuBatch | None = None
        self._ir_counts_per_tp_rank: list[list[int]] | None = None  # [tp][local expert]
        self._received_per_expert: list[int] | None = None
        self._ir_output: torch.Tensor | None = None
        # NOTE: the IR side batch is variable-sized, so it is not part of ``cudagraph_attrs``:
        # capturing the MoE preprocess in a CUDA graph is only valid with IR off.

    def set_intra_gpu_assignment(
        self, ir_expert: torch.Tensor | None, ir_probs: torch.Tensor | None
    ) -> None:
        """IR destinations [T] (global expert index or -1) and weights [T] for the next call."""
        self._ir_expert, self._ir_probs = ir_expert, ir_probs

    # ---- dispatch -------------------------------------------------------------------------

    def dispatch_preprocess(
        self, hidden_states: torch.Tensor, routing_map: torch.Tensor, probs: torch.Tensor
    ):
        """(1) megatron's preprocess + permute; (1*) split off the IR batch."""
        self._ir = None
        if self._ir_expert is not None:
            batch = intra_gpu_batch(
                self._ir_expert,
                self._ir_probs,
                self.local_expert_indices[0],
                self.num_local_experts,
            )
            if self.tp_size > 1 or sum(batch.counts) > 0:
                self._ir = batch
                flat = hidden_states.reshape(-1, hidden_states.shape[-1])
                self._ir_input = flat.index_select(0, batch.token_indices)
        self._ir_expert = self._ir_probs = None
        return super().dispatch_preprocess(hidden_states, routing_map, probs)

    def dispatch_postprocess(self, global_input_tokens, global_probs):
        """(3) megatron's AG(TP) + sort; (3*) gather the IR batch and interleave per expert."""
        tokens, tokens_per_expert, probs = super().dispatch_postprocess(
            global_input_tokens, global_probs
        )
        if self._ir is None:
            return tokens, tokens_per_expert, probs
        ir_tokens, ir_probs = self._gather_intra_gpu_batch()
        received = [int(n) for n in tokens_per_expert.tolist()]
        self._received_per_expert = received
        ir_chunks = self._split_ir_by_rank_and_expert(ir_tokens)
        ir_prob_chunks = self._split_ir_by_rank_and_expert(ir_probs)
        token_chunks, prob_chunks = [], []
        for expert, (token_part, prob_part) in enumerate(
            zip(tokens.split(received), probs.split(received), strict=True)
        ):
            token_chunks.append(token_part)
            prob_chunks.append(prob_part)
            for tp_rank in range(self.tp_size):
                token_chunks.append(ir_chunks[tp_rank][expert])
                prob_chunks.append(ir_prob_chunks[tp_rank][expert])
        ir_per_expert = [
            sum(c[e] for c in self._ir_counts_per_tp_rank) for e in range(self.num_local_experts)
        ]
        merged_counts = torch.tensor(
            [r + i for r, i in zip(received, ir_per_expert, strict=True)],
            dtype=tokens_per_expert.dtype,
            device=tokens_per_expert.device,
        )
        return torch.cat(token_chunks), merged_counts, torch.cat(prob_chunks)

    # ---- combine --------------------------------------------------------------------------

    def combine_preprocess(self, hidden_states):
        """(4*) split received / IR outputs, RS(TP) the IR part; (4) megatron's unsort + RS."""
        if self._ir is None:
            return super().combine_preprocess(hidden_states)
        counts = self._ir_counts_per_tp_rank
        sizes = []
        for expert, received in enumerate(self._received_per_expert):
            sizes.append(received)
            sizes.extend(counts[tp_rank][expert] for tp_rank in range(self.tp_size))
        chunks = hidden_states.split(sizes)
        stride = 1 + self.tp_size
        received_part = _concat(chunks[0::stride])
        # IR part back into [tp rank][local expert] order, the layout the gather produced.
        ir_part = _concat(
            [
                chunks[expert * stride + 1 + tp_rank]
                for tp_rank in range(self.tp_size)
                for expert in range(self.num_local_experts)
            ]
        )
        per_rank_totals = [sum(c) for c in counts]
        self._ir_output = reduce_scatter_rows(ir_part, per_rank_totals, self._expert_tp_group())
        return super().combine_preprocess(received_part)

    def combine_postprocess(self, permutated_local_input_tokens):
        """(6) megatron's unpermute (+ shared experts); (6*) add the IR outputs at home."""
        output = super().combine_postprocess(permutated_local_input_tokens)
        if self._ir is None:
            return output
        flat = output.reshape(-1, output.shape[-1])
        flat = flat.index_add(0, self._ir.token_indices, self._ir_output.to(flat.dtype))
        self._ir = self._ir_output = self._ir_input = None
        return flat.view(output.shape)

    # ---- helpers --------------------------------------------------------------------------

    def _expert_tp_group(self):
        return self.tp_group if self.tp_size > 1 else None

    def _gather_intra_gpu_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """AG(expert-TP) of the IR tokens and weights: every TP rank computes all of them."""
        group = self._expert_tp_group()
        batch = self._ir
        if group is None:
            self._ir_counts_per_tp_rank = [batch.counts]
            return self._ir_input, batch.probs
        device = self._ir_input.device
        counts = torch.tensor(batch.counts, dtype=torch.int64, device=device)
        gathered_counts = [torch.zeros_like(counts) for _ in range(self.tp_size)]
        torch.distributed.all_gather(gathered_counts, counts, group=group)
        self._ir_counts_per_tp_rank = [c.tolist() for c in gathered_counts]
        totals = [sum(c) for c in self._ir_counts_per_tp_rank]
        tokens = gather_rows(self._ir_input, totals, group)
        probs = gather_rows(batch.probs.unsqueeze(1), totals, group).squeeze(1)
        return tokens, probs

    def _split_ir_by_rank_and_expert(self, rows: torch.Tensor) -> list[list[torch.Tensor]]:
        """Gathered IR rows ([tp rank][local expert] layout) -> nested list of chunks."""
        per_rank = rows.split([sum(c) for c in self._ir_counts_per_tp_rank])
        return [
            list(part.split(counts))
            for part, counts in zip(per_rank, self._ir_counts_per_tp_rank, strict=True)
        ]
