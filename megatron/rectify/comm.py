"""Collectives for the variable-sized intra-GPU-rectification batch over the expert-TP group.

Owns: all-gather / reduce-scatter along the first dimension where every rank holds a different
number of rows, with autograd. IR tokens are a variable-sized extra batch per rank; with expert
tensor parallelism (ETP > 1) every rank of the expert-TP group must see all of them, like
megatron's dispatcher does for the tokens received from the all-to-all.

Why not megatron's ``gather_from_sequence_parallel_region(output_split_sizes=...)``: gloo (our
CPU CI backend) only gathers equal sizes. We pad every rank's rows to the group maximum, run an
equal-sized collective and drop the padding: correct on NCCL and gloo alike, and the padding only
costs bytes inside the expert-TP group (usually one node's NVLink), never across EP ranks.
Must not touch: routing decisions, experts, the EP all-to-all.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _padded_all_gather(x: torch.Tensor, counts: list[int], group: dist.ProcessGroup):
    longest = max(counts)
    padded = x.new_zeros((longest, *x.shape[1:]))
    padded[: x.shape[0]] = x
    gathered = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(gathered, padded.contiguous(), group=group)
    return torch.cat([chunk[:n] for chunk, n in zip(gathered, counts, strict=True)], dim=0)


def _padded_reduce_scatter(x: torch.Tensor, counts: list[int], group: dist.ProcessGroup):
    """Sum over the group of each rank's slice of ``x`` (rows laid out rank after rank)."""
    longest = max(counts)
    rank = dist.get_rank(group)
    stacked = x.new_zeros((len(counts), longest, *x.shape[1:]))
    for r, chunk in enumerate(torch.split(x, counts, dim=0)):
        stacked[r, : chunk.shape[0]] = chunk
    if dist.get_backend(group) == "nccl":
        mine = torch.empty_like(stacked[0])
        dist.reduce_scatter_tensor(mine, stacked, group=group)
    else:  # gloo has no reduce-scatter: all-reduce and keep our slice
        dist.all_reduce(stacked, group=group)
        mine = stacked[rank]
    return mine[: counts[rank]].contiguous()


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, counts, group):  # type: ignore[override]
        ctx.counts, ctx.group = counts, group
        return _padded_all_gather(x, counts, group)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return _padded_reduce_scatter(grad.contiguous(), ctx.counts, ctx.group), None, None


class _ReduceScatterRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, counts, group):  # type: ignore[override]
        ctx.counts, ctx.group = counts, group
        return _padded_reduce_scatter(x.contiguous(), counts, group)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return _padded_all_gather(grad.contiguous(), ctx.counts, ctx.group), None, None


def gather_rows(
    x: torch.Tensor, counts: list[int], group: dist.ProcessGroup | None
) -> torch.Tensor:
    """Forward: all-gather rows (rank r contributes ``counts[r]``); backward: reduce-scatter."""
    if group is None or group.size() == 1:
        return x
    return _GatherRows.apply(x, counts, group)


def reduce_scatter_rows(
    x: torch.Tensor, counts: list[int], group: dist.ProcessGroup | None
) -> torch.Tensor:
    """Forward: sum over ranks, keep our ``counts[rank]`` rows; backward: all-gather."""
    if group is None or group.size() == 1:
        return x
    return _ReduceScatterRows.apply(x, counts, group)
