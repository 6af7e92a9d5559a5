"""A plain, loop-by-loop reading of the Rectify-Router spec, kept next to the vectorised code.

Owns nothing the product runs: it exists so tests can compare ``routing.rectified_routing``
against the spec written as directly as possible (one Python loop per rule, lists instead of
masks). It is slow on purpose; use it on small inputs only.
"""

from __future__ import annotations

import math

import torch

from megatron.rectify.config import RectifyOptions, check_choice
from megatron.rectify.routing import RectifiedRouting, intra_gpu_capacity


def _f32(value: torch.Tensor) -> float:
    """Rankings compare probabilities at float32 precision, like the vectorised key."""
    return float(value.detach().float())


def _best_first(value: torch.Tensor) -> tuple[bool, float]:
    """Sort key, ascending = best first: higher float32 score first, NaN after every number."""
    score = _f32(value)
    if math.isnan(score):
        return (True, 0.0)
    return (False, -score)


def reference_rectified_routing(
    probs: torch.Tensor,
    topk_indices: torch.Tensor,
    capacity: int,
    options: RectifyOptions,
    local_experts: range,
    selection_scores: torch.Tensor | None = None,
    scaling_factor: float | None = None,
    pad_to_capacity: bool = False,
) -> RectifiedRouting:
    """Same contract as ``routing.rectified_routing``; see the spec for every rule used here."""
    num_tokens, num_experts = probs.shape
    topk = topk_indices.shape[1]
    choices = [[int(e) for e in topk_indices[t]] for t in range(num_tokens)]
    scores = probs if selection_scores is None else selection_scores

    # (1) capacity truncation: per expert, requests ordered by choice rank, then drop policy.
    kept: set[tuple[int, int]] = set()
    for expert in range(num_experts):
        requests = [
            (rank, t) for t in range(num_tokens) for rank, e in enumerate(choices[t]) if e == expert
        ]
        if options.drop_policy == "probs":
            requests.sort(key=lambda r: (r[0], _best_first(probs[r[1], expert]), r[1]))
        else:
            requests.sort(key=lambda r: (r[0], r[1]))
        kept.update((t, expert) for _, t in requests[:capacity])

    # (2) fill-in: vacant slots go to the best not-yet-routed candidates for that expert.
    filled: set[tuple[int, int]] = set()
    if options.fill_in:
        for expert in range(num_experts):
            vacancies = capacity - sum(1 for (_, e) in kept if e == expert)
            candidates = []
            for t in range(num_tokens):
                if expert in choices[t]:
                    continue
                if options.fill_in_candidates == "next":
                    others = [e for e in range(num_experts) if e not in choices[t]]
                    if not others:
                        continue
                    best = max(others, key=lambda e: (float(scores[t, e].detach()), -e))
                    if best != expert:
                        continue
                candidates.append(t)
            candidates.sort(key=lambda t: (_best_first(probs[t, expert]), t))
            filled.update((t, expert) for t in candidates[: max(vacancies, 0)])

    # (3) intra-GPU rectification.
    ir_expert = [-1] * num_tokens
    multiplicity = [0] * num_tokens
    if options.intra_gpu:
        check_choice("--moe-rectify-ir-trigger", options.ir_trigger)
    if options.intra_gpu:
        for t in range(num_tokens):
            lost = sum(1 for e in choices[t] if (t, e) not in kept)
            won_fill_in = any((t, e) in filled for e in range(num_experts))
            if options.ir_trigger == "all":
                triggered = lost == topk and not won_fill_in
            else:  # "any" / "ignore_kth" (checked above)
                triggered = lost > 0
            if triggered:
                best = max(local_experts, key=lambda e: (float(probs[t, e].detach()), -e))
                ir_expert[t] = best
                multiplicity[t] = lost

    # (3b) static IR: each expert keeps B of its IR tokens, most lost choices first, then the
    # higher probability for the expert, then the lower token index; the others are not rescued.
    ir_capacity = ir_slot = over_budget = None
    if options.intra_gpu and options.ir_capacity_factor is not None:
        ir_capacity = intra_gpu_capacity(num_tokens, topk, num_experts, options.ir_capacity_factor)
        ir_slot = [-1] * num_tokens
        over_budget = [False] * num_tokens
        for expert in local_experts:
            queue = [t for t in range(num_tokens) if ir_expert[t] == expert]
            queue.sort(key=lambda t: (-multiplicity[t], _best_first(probs[t, expert]), t))
            for row, t in enumerate(queue):
                if row < ir_capacity:
                    ir_slot[t] = row
                else:
                    over_budget[t] = True
        for t in range(num_tokens):
            if over_budget[t]:
                ir_expert[t], multiplicity[t] = -1, 0

    # (4) gate weights, token by token.
    weights = torch.zeros_like(probs)
    ir_probs = torch.zeros(num_tokens, dtype=probs.dtype, device=probs.device)
    weight_rows = []
    ir_values = []
    for t in range(num_tokens):
        routed = [e for e in range(num_experts) if (t, e) in kept or (t, e) in filled]
        terms = [probs[t, e] for e in routed]
        if ir_expert[t] >= 0:
            terms.append(multiplicity[t] * probs[t, ir_expert[t]])
        row = [torch.zeros((), dtype=probs.dtype)] * num_experts
        ir_value = torch.zeros((), dtype=probs.dtype)
        if terms:
            total = torch.stack(terms).sum()
            if float(total.detach()) <= 0:
                total = torch.ones_like(total)
            denominator = total.detach() if options.straight_through else total
            normalised = [term / denominator for term in terms]
            if options.straight_through and topk == 1 and len(terms) == 1:
                normalised = [1.0 + (terms[0] - terms[0].detach())]
            if scaling_factor:
                normalised = [w * scaling_factor for w in normalised]
            for e, w in zip(routed, normalised, strict=False):
                row[e] = w
            if ir_expert[t] >= 0:
                ir_value = normalised[-1]
        weight_rows.append(torch.stack(row))
        ir_values.append(ir_value)
    if num_tokens:
        weights = torch.stack(weight_rows)
        ir_probs = torch.stack(ir_values)

    def to_map(pairs: set[tuple[int, int]]) -> torch.Tensor:
        result = torch.zeros(num_tokens, num_experts, dtype=torch.bool)
        for t, e in pairs:
            result[t, e] = True
        return result

    # (5) padding to capacity: each expert's buffer is topped up to exactly ``capacity`` rows
    # with the lowest-index tokens it does not already hold; weight 0, nothing else sees them.
    padding: set[tuple[int, int]] = set()
    if pad_to_capacity:
        if capacity > num_tokens:
            raise ValueError(f"cannot pad to capacity {capacity} with {num_tokens} tokens")
        for expert in range(num_experts):
            held = {t for (t, e) in kept | filled if e == expert}
            free = [t for t in range(num_tokens) if t not in held]
            padding.update((t, expert) for t in free[: capacity - len(held)])

    chosen = {(t, e) for t in range(num_tokens) for e in choices[t]}
    return RectifiedRouting(
        probs=weights,
        routing_map=to_map(kept | filled | padding),
        ir_expert=torch.tensor(ir_expert, dtype=torch.int64),
        ir_probs=ir_probs,
        kept_map=to_map(kept),
        fill_in_map=to_map(filled),
        dropped_map=to_map(chosen - kept),
        padding_map=to_map(padding),
        capacity=capacity,
        intra_gpu=options.intra_gpu,
        ir_capacity=ir_capacity,
        ir_slot=None if ir_slot is None else torch.tensor(ir_slot, dtype=torch.int64),
        ir_over_budget=None if over_budget is None else torch.tensor(over_budget),
    )
