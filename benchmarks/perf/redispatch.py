"""COMPARISON-ONLY baseline: re-dispatch dropped tokens to their next choice across GPUs.

The obvious alternative to Intra-GPU Rectification is to give a dropped token to its next-best
expert wherever that expert lives. That needs a second EP all-to-all round (tokens out, outputs
back, and the mirror of both in the backward): extra inter-GPU bytes, which IR avoids by choosing
among the token's *own* GPU's experts. This module implements that baseline for real, so that
:mod:`.a2a_bytes` counts the bytes it actually sends; the project does not offer it for training.

Rule (the same tokens as IR's ``any`` / ``ignore_kth`` trigger): after megatron's capacity
truncation, every token that lost at least one top-k choice is sent once more, to its (k+1)-th
choice (its second choice for top-1), with no capacity limit, weighted by that expert's
probability. Round 2 moves only real tokens (no padding), so its byte count is a lower bound.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from megatron.core.tensor_parallel import all_to_all
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron.rectify.layer_specs import replace_moe_classes
from megatron.rectify.router import full_score_distribution


class RedispatchRouter(TopKRouter):
    """megatron's ``TopKRouter``; keeps the call's logits for planning the second round."""

    last_logits: torch.Tensor | None = None

    def routing(self, logits: torch.Tensor, padding_mask: torch.Tensor | None = None):
        self.last_logits = logits.reshape(-1, self.config.num_moe_experts)
        return super().routing(logits, padding_mask=padding_mask)


@dataclass
class SecondRound:
    """Tokens re-dispatched by this rank, sorted by destination (global) expert.

    Attributes:
        token_indices: [N] rows of the flattened layer input.
        experts: [N] destination expert of each row (ascending: grouped by EP rank, then by
            local expert, which is the layout the all-to-all needs).
        weights: [N] gate weight (the destination's probability; differentiable).
    """

    token_indices: torch.Tensor
    experts: torch.Tensor
    weights: torch.Tensor


def plan_second_round(
    logits: torch.Tensor, routing_map: torch.Tensor, topk: int, score_function: str
) -> SecondRound:
    """Which tokens lost a top-k choice to capacity, and their (k+1)-th choice.

    With ``--moe-pad-expert-input-to-capacity`` megatron's ``routing_map`` also marks padding
    pairs (weight 0) outside a token's top-k, so "kept" is read on the token's top-k experts only.
    """
    probs = full_score_distribution(logits, score_function)
    ranked = probs.detach().topk(topk + 1, dim=1).indices
    lost = ~routing_map.gather(1, ranked[:, :topk]).all(dim=1)
    tokens = lost.nonzero().squeeze(1)
    experts = ranked[tokens, topk]
    order = experts.argsort(stable=True)
    tokens, experts = tokens[order], experts[order]
    return SecondRound(tokens, experts, probs[tokens, experts])


def _reorder_chunks(rows: torch.Tensor, sizes: list[int], order: list[int]) -> torch.Tensor:
    chunks = rows.split(sizes)
    return torch.cat([chunks[i] for i in order]) if order else rows


def _transpose_order(rows: int, cols: int) -> list[int]:
    """Chunk order that turns a row-major [rows][cols] chunk layout into [cols][rows]."""
    return [r * cols + c for c in range(cols) for r in range(rows)]


class RedispatchMoELayer(MoELayer):
    """megatron's ``MoELayer`` plus a second all-to-all round for the dropped tokens."""

    def route(self, hidden_states: torch.Tensor, padding_mask: torch.Tensor | None = None):
        probs, routing_map = super().route(hidden_states, padding_mask)
        self._plan = plan_second_round(
            self.router.last_logits, routing_map, self.router.topk, self.router.score_function
        )
        return probs, routing_map

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any):
        output, bias = super().forward(hidden_states, *args, **kwargs)
        flat_input = hidden_states.reshape(-1, hidden_states.shape[-1])
        extra = self._second_round(flat_input, self._plan)
        flat = output.reshape(-1, output.shape[-1])
        flat = flat.index_add(0, self._plan.token_indices, extra.to(flat.dtype))
        self._plan = None
        return flat.view(output.shape), bias

    def _second_round(self, flat_input: torch.Tensor, plan: SecondRound) -> torch.Tensor:
        """Send, compute on the destination's experts, send back (rows of ``plan`` order)."""
        ep, local = self.ep_group.size(), self.num_local_experts
        send = torch.bincount(plan.experts, minlength=self.config.num_moe_experts)
        recv = self._exchange_counts(send).view(ep, local)  # [source rank][local expert]
        send_splits = send.view(ep, local).sum(1).tolist()
        own = send_splits[self.ep_group.rank()]
        self.last_redispatched = {"tokens": len(plan.experts), "remote": len(plan.experts) - own}
        recv_splits = recv.sum(1).tolist()
        tokens = flat_input.index_select(0, plan.token_indices)
        tokens = all_to_all(self.ep_group, tokens, recv_splits, send_splits)
        weights = plan.weights.to(flat_input.dtype)  # as megatron's dispatch sends its probs
        weights = all_to_all(self.ep_group, weights, recv_splits, send_splits)
        chunk_sizes = recv.flatten().tolist()
        by_expert = _transpose_order(ep, local)
        tokens = _reorder_chunks(tokens, chunk_sizes, by_expert)
        weights = _reorder_chunks(weights, chunk_sizes, by_expert)
        output, _ = self.experts(tokens, recv.sum(0).cpu(), weights)
        by_rank = _transpose_order(local, ep)
        output = _reorder_chunks(output, recv.t().flatten().tolist(), by_rank)
        return all_to_all(self.ep_group, output, send_splits, recv_splits)

    def _exchange_counts(self, send: torch.Tensor) -> torch.Tensor:
        """Per-expert row counts: this rank's for rank r's experts go to rank r (metadata)."""
        if self.ep_group.size() == 1:
            return send
        recv = torch.empty_like(send)
        torch.distributed.all_to_all_single(recv, send, group=self.ep_group)
        return recv


def redispatch_layer_spec(layer_spec: ModuleSpec) -> ModuleSpec:
    """A transformer-layer spec whose MoE MLP is the re-dispatch baseline."""
    spec = copy.copy(layer_spec)
    spec.submodules = dataclasses.replace(
        layer_spec.submodules,
        mlp=replace_moe_classes(layer_spec.submodules.mlp, RedispatchMoELayer, RedispatchRouter),
    )
    return spec
