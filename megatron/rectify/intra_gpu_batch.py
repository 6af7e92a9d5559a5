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
Two layouts:

* dynamic IR (default): the batch holds exactly the rescued tokens, so it is variable-sized and
  its per-expert counts reach the host: measured with ``python -m benchmarks.perf --parts
  syncs``, it adds 4 host syncs per layer call (``split``: nonzero, bincount, tolist;
  ``interleave``: tolist), 6 with expert-TP (the counts' all-gather).
* static IR (``--moe-rectify-ir-capacity-factor``): the router already gave every rescued token
  a row ``ir_slot`` among its expert's ``B`` rows (``routing.intra_gpu_budget``), so the batch
  is ``[L * B]`` rows whatever the routing: unused rows hold token 0 with weight exactly 0 and
  their expert output is masked to 0 before it is added home, so they carry no weight and no
  gradient. Every step is then a scatter / gather with host-known sizes: 0 host syncs (the
  received tokens' per-expert counts are only combined on the device with ``B``), and every
  shape is fixed, which is what capturing the layer in a CUDA graph needs.

FR alone builds no IR batch and adds none. The side batch's per-call state (set in ``split``,
read up to ``add_home``) is not part of megatron's ``cudagraph_attrs``, so a CUDA graph of
megatron's ``moe_preprocess`` scope alone, replayed without ``split`` running, cannot carry it.
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
        valid: static IR only: [N = L * B] bool, False on the unused (zero-weight) rows;
            ``None`` for dynamic IR, whose rows are all rescued tokens.
    """

    token_indices: torch.Tensor
    counts: list[int]
    probs: torch.Tensor
    valid: torch.Tensor | None = None


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


def static_intra_gpu_batch(
    ir_expert: torch.Tensor,
    ir_probs: torch.Tensor,
    ir_slot: torch.Tensor,
    capacity: int,
    local_expert_start: int,
    num_local: int,
) -> IntraGpuBatch:
    """Static IR: exactly ``capacity`` (``B``) rows per local expert, ``L * B`` in all.

    The rescued token with ``ir_slot`` ``j`` for local expert ``l`` lands in row ``l * B + j``
    (the router's ``intra_gpu_budget`` made the slots unique per expert). Every other row
    holds token 0 with weight exactly 0 (``valid`` False). Scatters with host-known sizes
    only: no host sync. Tokens with no slot are scattered into one extra row that is cut off.
    """
    rows = num_local * capacity
    device = ir_expert.device
    rescued = ir_slot >= 0
    row = torch.where(rescued, (ir_expert - local_expert_start) * capacity + ir_slot, rows)
    tokens = torch.arange(ir_expert.numel(), device=device)
    token_indices = torch.zeros(rows + 1, dtype=torch.long, device=device)
    token_indices = token_indices.scatter(0, row, tokens)[:rows]
    valid = torch.zeros(rows + 1, dtype=torch.bool, device=device)
    valid = valid.scatter(0, row, rescued)[:rows]
    probs = torch.where(valid, ir_probs.index_select(0, token_indices), 0.0)
    return IntraGpuBatch(token_indices, [capacity] * num_local, probs, valid)


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

    @property
    def static(self) -> bool:
        """Whether the current call's batch is static IR's fixed ``L * B`` rows."""
        return self._batch is not None and self._batch.valid is not None

    def split(
        self,
        hidden_states: torch.Tensor,
        ir_expert: torch.Tensor | None,
        ir_probs: torch.Tensor | None,
        ir_slot: torch.Tensor | None = None,
        ir_capacity: int | None = None,
    ) -> None:
        """Start a call: take this rank's IR rows of ``hidden_states`` [..., H].

        ``ir_expert`` [T] (global expert index or -1) and ``ir_probs`` [T] come from the
        router's decision; ``None`` means the call was not rectified. With expert-TP > 1 the
        batch is active even when this rank has no IR token: the group's collectives need
        every rank. ``ir_capacity`` (``B``) and ``ir_slot`` [T] select static IR: the batch is
        then always active, ``L * B`` rows.
        """
        self._end_call()
        if ir_expert is None:
            return
        if ir_capacity is not None:
            batch = static_intra_gpu_batch(
                ir_expert,
                ir_probs,
                ir_slot,
                ir_capacity,
                self.local_expert_start,
                self.num_local_experts,
            )
        else:
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
        if self.static:  # every TP rank has B rows per local expert: nothing to exchange
            self._counts_per_tp_rank = [batch.counts] * self.tp_size
        else:
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
        if self.static:
            return self._interleave_static(
                received_tokens, received_probs, tokens_per_expert, ir_tokens, ir_probs
            )
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
        if self.static:
            received_part = expert_output.index_select(0, self._received_positions)
            ir_part = expert_output.index_select(0, self._ir_positions)
            per_rank_totals = [sum(c) for c in self._counts_per_tp_rank]
            self._output = reduce_scatter_rows(ir_part, per_rank_totals, self.expert_tp_group)
            return received_part
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
        ir_output = self._output
        if self._batch.valid is not None:  # static IR: unused rows add exactly nothing
            ir_output = torch.where(self._batch.valid.unsqueeze(1), ir_output, 0.0)
        flat = flat.index_add(0, self._batch.token_indices, ir_output.to(flat.dtype))
        self._end_call()
        return flat.view(output.shape)

    # ---- helpers --------------------------------------------------------------------------

    def _end_call(self) -> None:
        self._batch: IntraGpuBatch | None = None
        self._input: torch.Tensor | None = None
        self._counts_per_tp_rank: list[list[int]] | None = None  # [TP rank][local expert]
        self._received_per_expert: list[int] | None = None
        self._received_positions: torch.Tensor | None = None  # static: rows in the merged batch
        self._ir_positions: torch.Tensor | None = None  # static: [TP rank][expert][slot] rows
        self._output: torch.Tensor | None = None

    def _interleave_static(
        self,
        received_tokens: torch.Tensor,
        received_probs: torch.Tensor,
        tokens_per_expert: torch.Tensor,
        ir_tokens: torch.Tensor,
        ir_probs: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``interleave`` for static IR, without reading any count on the host.

        Each local expert's block is [its received rows | B IR rows of TP rank 0 | ...], so
        with ``S = n * B`` IR rows per expert, received row ``i`` (of expert ``e``) moves to
        ``i + e * S`` and IR row ``j`` of (TP rank ``r``, expert ``e``) to
        ``end_e + e * S + r * B + j``, ``end_e`` being the received rows up to and including
        ``e``. ``tokens_per_expert`` (megatron's, on the host on a GPU run) is only combined
        on the device; the merged counts are ``tokens_per_expert + S``, the same kind of tensor
        megatron's experts get.
        """
        device = received_tokens.device
        capacity = self._batch.counts[0] if self.num_local_experts else 0
        per_expert = capacity * self.tp_size  # S
        counts = tokens_per_expert
        if counts.device != device:
            counts = counts.to(device, non_blocking=True)
        ends = counts.to(torch.long).cumsum(0)  # [L]
        received_rows = torch.arange(received_tokens.shape[0], device=device)
        expert_of_row = torch.searchsorted(ends, received_rows, right=True)
        received_positions = received_rows + expert_of_row * per_expert
        ir_rows = torch.arange(ir_tokens.shape[0], device=device)
        rows_per_rank = max(1, self.num_local_experts * capacity)
        tp_rank, within = ir_rows // rows_per_rank, ir_rows % rows_per_rank
        expert, slot = within // max(1, capacity), within % max(1, capacity)
        ir_positions = ends[expert] + expert * per_expert + tp_rank * capacity + slot
        positions = torch.cat([received_positions, ir_positions])
        source_row = torch.empty_like(positions).scatter_(
            0, positions, torch.arange(positions.numel(), device=device)
        )
        self._received_positions, self._ir_positions = received_positions, ir_positions
        tokens = torch.cat([received_tokens, ir_tokens]).index_select(0, source_row)
        probs = torch.cat([received_probs, ir_probs.to(received_probs.dtype)])
        return tokens, tokens_per_expert + per_expert, probs.index_select(0, source_row)

    def _by_rank_and_expert(self, rows: torch.Tensor) -> list[list[torch.Tensor]]:
        """Gathered IR rows ([TP rank][local expert] layout) -> nested list of chunks."""
        per_rank = rows.split([sum(c) for c in self._counts_per_tp_rank])
        return [
            list(part.split(counts))
            for part, counts in zip(per_rank, self._counts_per_tp_rank, strict=True)
        ]
