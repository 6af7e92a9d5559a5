"""The intra-GPU-rectification (IR) side batch: IR tokens meet their local expert off the wire.

Owns: one MoE call's IR tokens on their way from this rank's input to a local expert and back,
as five steps that a token dispatcher calls from its own hooks (the alltoall dispatcher today;
an allgather dispatcher would call the same five):

    (1) ``split``       rows of this rank's input whose IR destination (``ir_expert``) is a local
                        expert, grouped by local expert, with their IR gate weights (``ir_probs``).
    (2) ``gather``      AG(expert-TP): every rank of the expert-TP group computes all of them,
                        as it does for the tokens it received.
    (3) ``interleave``  per local expert, [received tokens | IR tokens of TP rank 0 | ... of
                        TP rank n-1], so the experts run ONE pass (one grouped GEMM / one
                        ``SequentialMLP`` loop) over received + IR tokens.
    (4) ``separate``    the expert output back into the received part (for the dispatcher's
                        own combine) and the IR part; RS(expert-TP) of the IR part.
    (5) ``add_home``    the IR outputs (already weighted by the experts with ``ir_probs``)
                        added to the combined output, at the tokens' own rows.

Shapes: ``T`` tokens of this rank, ``H`` hidden size, ``L`` local experts, ``n`` expert-TP ranks,
``N`` IR tokens of this rank, ``N_g`` IR tokens of the whole expert-TP group.
Must not touch: routing decisions (it receives ``ir_expert`` / ``ir_probs``), the EP
all-to-all, the experts. IR tokens add zero inter-rank bytes on the EP all-to-all.
NOTE: the IR batch is variable-sized, so its per-expert counts reach the host: measured with
``python -m benchmarks.perf --parts syncs``, IR adds 4 host syncs per layer call (``split``:
nonzero, bincount, tolist; ``interleave``: tolist), 6 with expert-TP (the counts' all-gather).
FR alone builds no IR batch and adds none. It is therefore not part of
megatron's ``cudagraph_attrs``: capturing the MoE preprocess in a CUDA graph is only valid with
IR off.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron.rectify.comm import gather_rows, reduce_scatter_rows


@dataclass
class IntraGpuBatch:
    """This rank's IR tokens, grouped by local expert.

    Attributes:
        token_indices: [N] rows of the flattened layer input, grouped by local expert.
        counts: [L] tokens per local expert on this rank (host list).
        probs: [N] IR gate weights of those rows.
    """

    token_indices: torch.Tensor
    counts: list[int]
    probs: torch.Tensor


def intra_gpu_batch(
    ir_expert: torch.Tensor, ir_probs: torch.Tensor, local_expert_start: int, num_local: int
) -> IntraGpuBatch:
    """Group the IR tokens (``ir_expert`` [T] >= 0) by local expert; ties keep token order."""
    rectified = (ir_expert >= 0).nonzero().squeeze(1)
    local = ir_expert[rectified] - local_expert_start
    order = local.argsort(stable=True)
    token_indices = rectified[order]
    # host syncs on CUDA: nonzero above, bincount and tolist here (see `--parts syncs`)
    counts = torch.bincount(local, minlength=num_local).tolist()
    return IntraGpuBatch(token_indices, counts, ir_probs[token_indices])


def _concat(chunks: list[torch.Tensor] | tuple[torch.Tensor, ...]) -> torch.Tensor:
    """``torch.cat`` that returns a lone chunk as the view it is (one local expert, no TP)."""
    return chunks[0] if len(chunks) == 1 else torch.cat(list(chunks))


class IntraGpuSideBatch:
    """The IR side batch of one dispatcher, one call at a time (``split`` starts a call,
    ``add_home`` ends it). Between calls, and in a call without a side batch, ``active`` is
    False and every step is a no-op the dispatcher need not call.

    Args:
        local_expert_start: global index of this rank's first local expert.
        num_local_experts: ``L``.
        expert_tp_group: the expert-TP group, or ``None`` when its size is 1.
    """

    def __init__(
        self,
        local_expert_start: int,
        num_local_experts: int,
        expert_tp_group: dist.ProcessGroup | None,
    ) -> None:
        self.local_expert_start = local_expert_start
        self.num_local_experts = num_local_experts
        self.expert_tp_group = expert_tp_group
        self.tp_size = 1 if expert_tp_group is None else expert_tp_group.size()
        self._end_call()

    @property
    def active(self) -> bool:
        """Whether the current call has a side batch (set by ``split``)."""
        return self._batch is not None

    # ---- (1) ------------------------------------------------------------------------------

    def split(
        self,
        hidden_states: torch.Tensor,
        ir_expert: torch.Tensor | None,
        ir_probs: torch.Tensor | None,
    ) -> None:
        """Start a call: take this rank's IR rows of ``hidden_states`` [..., H].

        ``ir_expert`` [T] (global expert index or -1) and ``ir_probs`` [T] come from the
        router's decision; ``None`` means the call was not rectified. With expert-TP > 1 the
        batch is active even when this rank has no IR token: the group's collectives need
        every rank.
        """
        self._end_call()
        if ir_expert is None:
            return
        batch = intra_gpu_batch(
            ir_expert, ir_probs, self.local_expert_start, self.num_local_experts
        )
        if self.tp_size == 1 and sum(batch.counts) == 0:
            return
        self._batch = batch
        flat = hidden_states.reshape(-1, hidden_states.shape[-1])
        self._input = flat.index_select(0, batch.token_indices)  # [N, H]

    # ---- (2) ------------------------------------------------------------------------------

    def gather(self) -> tuple[torch.Tensor, torch.Tensor]:
        """AG(expert-TP) of the IR tokens [N_g, H] and weights [N_g], in [TP rank][local
        expert] order; records every TP rank's per-expert counts for ``separate``."""
        batch = self._batch
        if self.expert_tp_group is None:
            self._counts_per_tp_rank = [batch.counts]
            return self._input, batch.probs
        group = self.expert_tp_group
        counts = torch.tensor(batch.counts, dtype=torch.int64, device=self._input.device)
        gathered_counts = [torch.zeros_like(counts) for _ in range(self.tp_size)]
        dist.all_gather(gathered_counts, counts, group=group)
        self._counts_per_tp_rank = [c.tolist() for c in gathered_counts]
        totals = [sum(c) for c in self._counts_per_tp_rank]
        tokens = gather_rows(self._input, totals, group)
        probs = gather_rows(batch.probs.unsqueeze(1), totals, group).squeeze(1)
        return tokens, probs

    # ---- (3) ------------------------------------------------------------------------------

    def interleave(
        self,
        received_tokens: torch.Tensor,
        received_probs: torch.Tensor,
        tokens_per_expert: torch.Tensor,
        ir_tokens: torch.Tensor,
        ir_probs: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Merge the received tokens (sorted by local expert, ``tokens_per_expert`` [L]) with
        the gathered IR batch: ``(tokens [R + N_g, H], tokens_per_expert [L], probs [R + N_g])``
        for ONE expert pass, per local expert the received rows first, then the IR rows of
        TP rank 0, 1, ..."""
        received = [int(n) for n in tokens_per_expert.tolist()]
        self._received_per_expert = received
        ir_chunks = self._by_rank_and_expert(ir_tokens)
        ir_prob_chunks = self._by_rank_and_expert(ir_probs)
        token_chunks, prob_chunks = [], []
        for expert, (token_part, prob_part) in enumerate(
            zip(received_tokens.split(received), received_probs.split(received), strict=True)
        ):
            token_chunks.append(token_part)
            prob_chunks.append(prob_part)
            for tp_rank in range(self.tp_size):
                token_chunks.append(ir_chunks[tp_rank][expert])
                prob_chunks.append(ir_prob_chunks[tp_rank][expert])
        ir_per_expert = [
            sum(c[e] for c in self._counts_per_tp_rank) for e in range(self.num_local_experts)
        ]
        merged_counts = torch.tensor(
            [r + i for r, i in zip(received, ir_per_expert, strict=True)],
            dtype=tokens_per_expert.dtype,
            device=tokens_per_expert.device,
        )
        return torch.cat(token_chunks), merged_counts, torch.cat(prob_chunks)

    # ---- (4) ------------------------------------------------------------------------------

    def separate(self, expert_output: torch.Tensor) -> torch.Tensor:
        """Split ``expert_output`` [R + N_g, H] (the ``interleave`` layout) and return the
        received part [R, H]; the IR part is reduce-scattered over expert-TP and kept, [N, H],
        for ``add_home``."""
        counts = self._counts_per_tp_rank
        sizes = []
        for expert, received in enumerate(self._received_per_expert):
            sizes.append(received)
            sizes.extend(counts[tp_rank][expert] for tp_rank in range(self.tp_size))
        chunks = expert_output.split(sizes)
        stride = 1 + self.tp_size
        received_part = _concat(chunks[0::stride])
        # IR part back into [TP rank][local expert] order, the layout the gather produced.
        ir_part = _concat(
            [
                chunks[expert * stride + 1 + tp_rank]
                for tp_rank in range(self.tp_size)
                for expert in range(self.num_local_experts)
            ]
        )
        per_rank_totals = [sum(c) for c in counts]
        self._output = reduce_scatter_rows(ir_part, per_rank_totals, self.expert_tp_group)
        return received_part

    # ---- (5) ------------------------------------------------------------------------------

    def add_home(self, output: torch.Tensor) -> torch.Tensor:
        """End the call: ``output`` [..., H] with the IR outputs added at their tokens' rows
        (``output`` itself when the call had no side batch)."""
        if not self.active:
            return output
        flat = output.reshape(-1, output.shape[-1])
        flat = flat.index_add(0, self._batch.token_indices, self._output.to(flat.dtype))
        self._end_call()
        return flat.view(output.shape)

    # ---- helpers --------------------------------------------------------------------------

    def _end_call(self) -> None:
        self._batch: IntraGpuBatch | None = None
        self._input: torch.Tensor | None = None
        self._counts_per_tp_rank: list[list[int]] | None = None  # [TP rank][local expert]
        self._received_per_expert: list[int] | None = None
        self._output: torch.Tensor | None = None

    def _by_rank_and_expert(self, rows: torch.Tensor) -> list[list[torch.Tensor]]:
        """Gathered IR rows ([TP rank][local expert] layout) -> nested list of chunks."""
        per_rank = rows.split([sum(c) for c in self._counts_per_tp_rank])
        return [
            list(part.split(counts))
            for part, counts in zip(per_rank, self._counts_per_tp_rank, strict=True)
        ]
