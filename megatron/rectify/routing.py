"""The Rectify-Router's routing decision as pure tensor functions.

Owns: capacity truncation (both drop policies, deterministic tie-breaking), Fill-in
Rectification (FR), the Intra-GPU Rectification (IR) assignment and the gate weights with the
straight-through option, exactly as ``docs/routing.md`` (the authority) states them.
Must not touch: process groups, collectives, CUDA calls, module state. Everything here works on
whatever device its inputs live on and is the same code on one rank or many.

The steps, in the order a token travels (``rectified_routing`` runs them all):

(1) ``slot_winners``: every expert keeps at most ``capacity`` requests of this
    rank's tokens. Top-k requests of a higher choice rank are placed before lower ranks; within a
    rank the drop policy orders them (``probs``: higher probability first, ``position``: earlier
    token first). With FR, fill-in candidates queue behind every top-k request, ordered by their
    probability for that expert, so they only take slots that would otherwise be padding.
(2) ``intra_gpu_rectification``: tokens that lost top-k choices (per the trigger) are assigned to
    the expert, among this rank's local experts, with the highest *global* probability.
(3) ``rectified_gate_weights``: ``w_j = p_j / sg(S)`` over the token's surviving choices (fill-in
    included) plus ``m * p_h`` for its IR expert, ``S`` being the sum of those terms.
(2b) ``intra_gpu_budget`` (static IR only, ``--moe-rectify-ir-capacity-factor``): each local
    expert rescues at most ``B = intra_gpu_capacity(...)`` of the tokens IR sent it, the rest
    stay unrescued (counted as ``ir_over_budget``); the winners get their row in the expert's
    fixed-size IR batch (``ir_slot``).
(4) ``capacity_padding`` (only with ``--moe-pad-expert-input-to-capacity``): zero-weight padding
    pairs so that every expert column of the dispatched map holds exactly ``capacity`` tokens,
    the contract megatron's padded alltoall dispatcher relies on.

Naming (megatron's words, plus ours):
    logits        router output before the score function, [num_tokens, num_experts].
    probs         full score distribution ``p`` over all experts (softmax, or sigmoid scores),
                  [num_tokens, num_experts]; differentiable.
    topk_indices  the experts each token chose, in choice order, [num_tokens, topk].
    routing_map   (token, expert) pairs that travel through the expert-parallel all-to-all
                  (the dispatch map): routed pairs plus, when padding to capacity, padding
                  pairs, [num_tokens, num_experts] bool.
    routed_map    pairs an expert really computes for the token: kept top-k + fill-in.
    kept_map      top-k requests that won a capacity slot.
    fill_in_map   vacant slots given to fill-in candidates by FR.
    padding_map   zero-weight pairs that only fill a padded expert buffer up to ``capacity``.
    dropped_map   top-k requests that lost (capacity full).
    ir_expert     IR destination per token (global expert index) or -1, [num_tokens].
    ir_multiplicity  ``m``: the number of top-k choices the token lost, [num_tokens].
    ir_slot       static IR: the token's row among its IR expert's ``B`` rows, or -1, [num_tokens].
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from megatron.rectify.config import RectifyOptions, check_choice

# Width of ``ordered_score_key``: every float32 maps to a distinct-ordered 32-bit integer.
_SCORE_BITS = 32
_SIGN_BIT = 1 << 31
_LOW_32 = (1 << 32) - 1


@dataclass
class RectifiedRouting:
    """One router call's full decision. All tensors are on the probs' device.

    The dispatch contract (why ``routing_map`` and ``routed_map`` differ): megatron's alltoall
    dispatcher with ``--moe-pad-expert-input-to-capacity`` sizes every (rank, expert) buffer as
    exactly ``C`` rows and assumes every ``routing_map`` column holds exactly ``C`` entries. Its
    unfused permute happens to tolerate fewer (it takes the first ``C`` rows of a sorted
    column), but TE's fused permute (``--moe-permute-fusion``) packs the entries of all columns
    back to back, so a short column shifts every later expert's tokens into the wrong expert's
    buffer. Rectification leaves columns short (a vacancy FR cannot fill), so when padding is on
    ``routing_map`` = ``routed_map`` | ``padding_map`` holds exactly ``C`` per column, and at
    most ``C`` otherwise (``padding_map`` empty). Padding pairs carry gate weight exactly 0 and
    no gradient; they are dispatch-only: statistics, expert-bias token counts and the IR
    triggers see ``routed_map`` / ``kept_map`` only.

    Attributes:
        probs: gate weights of the pairs in ``routing_map`` (zero elsewhere, and zero on
            padding pairs), [T, E].
        routing_map: pairs sent through the all-to-all (routed + padding), [T, E] bool.
        ir_expert: IR destination (global expert index) or -1, [T] long.
        ir_probs: gate weight of the IR destination (zero where ``ir_expert`` is -1), [T].
        kept_map: top-k requests that won a slot, [T, E] bool.
        fill_in_map: slots filled by FR, [T, E] bool.
        dropped_map: top-k requests that lost their slot, [T, E] bool.
        padding_map: zero-weight pairs that pad each column to ``C`` (empty without padding to
            capacity), [T, E] bool; disjoint from ``routed_map``.
        capacity: slots per expert for this rank's tokens (``C``).
        intra_gpu: whether IR ran for this call. When it did not, the dispatcher skips the IR
            side batch altogether (building an empty one would still cost host syncs).
        ir_capacity: static IR (``--moe-rectify-ir-capacity-factor``): ``B``, the fixed number
            of IR rows per local expert; ``None`` for dynamic IR (a variable-sized batch).
        ir_slot: static IR: each rescued token's row among its expert's ``B`` rows (unique per
            expert, in ``intra_gpu_budget``'s order), -1 elsewhere, [T] long; ``None`` otherwise.
        ir_over_budget: static IR: tokens IR would have rescued but that got no row (their
            expert's ``B`` rows went to better candidates), [T] bool; ``None`` otherwise. They
            are not rescued (``ir_expert`` -1, no IR weight): their dropped requests stay in
            ``dropped_map`` and a token left with no routed pair counts as lost.
    """

    probs: torch.Tensor
    routing_map: torch.Tensor
    ir_expert: torch.Tensor
    ir_probs: torch.Tensor
    kept_map: torch.Tensor
    fill_in_map: torch.Tensor
    dropped_map: torch.Tensor
    padding_map: torch.Tensor
    capacity: int
    intra_gpu: bool = False
    ir_capacity: int | None = None
    ir_slot: torch.Tensor | None = None
    ir_over_budget: torch.Tensor | None = None

    @property
    def routed_map(self) -> torch.Tensor:
        """Pairs an expert computes for the token (kept top-k + fill-in), padding excluded."""
        return self.kept_map | self.fill_in_map


def topk_indices_to_map(topk_indices: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[T, k] expert indices -> [T, E] bool map."""
    selected = torch.ones_like(topk_indices, dtype=torch.bool)
    return requests_to_map(topk_indices, selected, num_experts)


def fill_in_candidates(
    selection_scores: torch.Tensor, topk_indices: torch.Tensor, candidates: str
) -> torch.Tensor:
    """Experts each token may fill a vacant slot of, [T, depth] long, best first.

    ``next``: only the token's (k+1)-th choice by ``selection_scores`` (depth 1). ``any``: every
    expert outside the token's top-k (depth E - k). Never a top-k expert, so a fill-in can never
    duplicate a request. Ties go to the lower expert index.
    """
    check_choice("--moe-rectify-fill-in-candidates", candidates)
    num_experts = selection_scores.shape[1]
    topk = topk_indices.shape[1]
    depth = min(1, num_experts - topk) if candidates == "next" else num_experts - topk
    masked = selection_scores.detach().scatter(1, topk_indices, float("-inf"))
    if depth == 1:
        return masked.argmax(dim=1, keepdim=True)  # argmax returns the first maximum
    # A stable descending sort keeps equal scores in expert order.
    return masked.sort(dim=1, descending=True, stable=True).indices[:, :depth]


def ordered_score_key(scores: torch.Tensor) -> torch.Tensor:
    """float scores -> int64 keys in [0, 2**32) that sort exactly like the float32 values.

    Why not the raw bit pattern: read as an integer it only sorts like the value for
    non-negative floats below 2.0 that fit the old 30-bit field, and score functions such as
    ``sqrtsoftplus`` (or sigmoid scores plus a scaling) exceed that. The standard total-order
    transform works for every finite value, either sign, subnormals and +-inf: flip every bit of
    a negative number (larger magnitude -> smaller key), set the sign bit of a non-negative one
    (so it lands above all negatives). ``-0.0`` is folded into ``+0.0`` first, since they are
    equal scores.

    NaN: a NaN score says nothing about preference, so it ranks BELOW every number, ``-inf``
    included (key 0). Within its choice tier a NaN request can then only take a slot that no
    numeric request wants, and it never pushes one out. This rule needs no host sync (an error
    would).
    """
    values = scores.detach().float() + 0.0  # -0.0 + 0.0 == +0.0
    bits = values.view(torch.int32).to(torch.int64) & _LOW_32
    negative = bits >= _SIGN_BIT
    key = torch.where(negative, bits ^ _LOW_32, bits | _SIGN_BIT)
    return torch.where(torch.isnan(values), torch.zeros_like(key), key)


def slot_winners(
    probs: torch.Tensor,
    request_experts: torch.Tensor,
    topk: int,
    capacity: int,
    drop_policy: str = "probs",
) -> torch.Tensor:
    """Which of each token's requests win one of the expert's ``capacity`` slots, [T, R] bool.

    ``request_experts`` [T, R] lists each token's top-k choices in choice order (columns ``:k``)
    followed by its fill-in candidates (columns ``k:``); a token never lists an expert twice.

    One ranking per expert decides both truncation and fill-in: a request's key is
    (tier, score, -token) compared lexicographically, where the tier is the choice rank (first
    choices highest) and fill-in candidates sit one tier below the last top-k choice, so they
    only take slots no top-k request wanted. Score is the probability for the expert, any finite
    value of either sign (under the ``position`` policy, top-k requests score 0 so that earlier
    tokens win; NaN scores rank last, see ``ordered_score_key``). The key is packed into one
    int64 and is unique per expert (the token index is part of it), so the result never depends
    on how a sort breaks ties; equal probabilities go to the lower token index.

    The work is on the T*R request list, not on a dense [T, E] matrix: with the default ``next``
    candidates that is T*(k+1) entries instead of T*E.
    """
    check_choice("--moe-token-drop-policy", drop_policy)
    num_tokens, num_requests = request_experts.shape
    num_experts = probs.shape[1]
    device = probs.device
    if num_tokens == 0 or capacity <= 0:
        return torch.zeros(num_tokens, num_requests, dtype=torch.bool, device=device)

    # tier: k+1 for first choices ... 2 for k-th choices, 1 for fill-in candidates.
    tiers = torch.ones(num_requests, dtype=torch.int64, device=device)
    tiers[:topk] = torch.arange(topk + 1, 1, -1, device=device)
    tiers = tiers.expand(num_tokens, num_requests)
    score_key = ordered_score_key(probs.gather(1, request_experts))
    if drop_policy == "position":
        score_key[:, :topk] = 0  # fill-in candidates are still ranked by probability
    token_bits = max(1, math.ceil(math.log2(num_tokens)))
    tier_bits = (topk + 1).bit_length()
    if tier_bits + _SCORE_BITS + token_bits > 63:
        raise ValueError(
            f"{num_tokens} tokens with top-{topk} do not fit the 63-bit slot ranking key; "
            "route fewer tokens per call (smaller micro-batch or sequence length)."
        )
    later_token = torch.arange(num_tokens - 1, -1, -1, device=device).unsqueeze(1)
    key = (tiers << (_SCORE_BITS + token_bits)) | (score_key << token_bits) | later_token

    # Best request first, then grouped by expert (stable, so each group stays best-first); a
    # request wins if it is among the first ``capacity`` of its expert's group.
    flat_experts = request_experts.reshape(-1)
    order = key.reshape(-1).argsort(descending=True)
    order = order[flat_experts[order].argsort(stable=True)]
    sorted_experts = flat_experts[order]
    # scatter_add, not bincount: CUDA's bincount reads the input's range on the host (a sync)
    per_expert = torch.zeros(num_experts, dtype=torch.int64, device=device)
    per_expert = per_expert.scatter_add(0, flat_experts, torch.ones_like(flat_experts))
    group_start = per_expert.cumsum(0) - per_expert
    slot = torch.arange(order.numel(), device=device) - group_start[sorted_experts]
    won = torch.empty(order.numel(), dtype=torch.bool, device=device)
    won[order] = slot < capacity
    return won.view(num_tokens, num_requests)


def requests_to_map(
    request_experts: torch.Tensor, selected: torch.Tensor, num_experts: int
) -> torch.Tensor:
    """[T, R] request list + [T, R] bool selection -> [T, E] bool map."""
    routing_map = torch.zeros(
        request_experts.shape[0], num_experts, dtype=torch.bool, device=request_experts.device
    )
    return routing_map.scatter_(1, request_experts, selected)


def capacity_slot_assignment(
    probs: torch.Tensor,
    topk_indices: torch.Tensor,
    capacity: int,
    drop_policy: str = "probs",
    candidate_indices: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``slot_winners`` as two [T, E] maps: (kept top-k requests, fill-in slots)."""
    topk = topk_indices.shape[1]
    request_experts = _request_list(topk_indices, candidate_indices)
    won = slot_winners(probs, request_experts, topk, capacity, drop_policy)
    num_experts = probs.shape[1]
    is_topk = torch.zeros_like(won)
    is_topk[:, :topk] = True
    return (
        requests_to_map(request_experts, won & is_topk, num_experts),
        requests_to_map(request_experts, won & ~is_topk, num_experts),
    )


def _request_list(
    topk_indices: torch.Tensor, candidate_indices: torch.Tensor | None
) -> torch.Tensor:
    if candidate_indices is None or candidate_indices.shape[1] == 0:
        return topk_indices
    return torch.cat([topk_indices, candidate_indices], dim=1)


def intra_gpu_rectification(
    probs: torch.Tensor,
    kept_count: torch.Tensor,
    won_fill_in: torch.Tensor,
    topk: int,
    local_experts: range,
    trigger: str = "all",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Assign tokens that lost top-k choices to their best expert on their own rank.

    ``kept_count`` [T] is how many of the token's top-k requests won a slot and ``won_fill_in``
    [T] whether it won a fill-in slot. ``local_experts`` is the global index range of the
    experts on this token's EP rank. The destination is the argmax of the *global*
    probabilities restricted to that range (no renormalisation among local experts; ties go to
    the lower index). There is no capacity limit for rectified tokens: they never enter the
    all-to-all.

    Returns ``ir_expert`` [T] long (global index, -1 when the token is not rectified) and
    ``ir_multiplicity`` [T] long (``m``: the number of top-k choices the token lost).
    """
    if len(local_experts) == 0 or local_experts.step != 1:
        raise ValueError(f"local_experts must be a non-empty contiguous range, got {local_experts}")
    check_choice("--moe-rectify-ir-trigger", trigger)
    lost_choices = topk - kept_count  # [T]
    if trigger == "all":
        triggered = (lost_choices == topk) & ~won_fill_in
    else:  # any / ignore_kth: at least one top-k choice lost
        triggered = lost_choices > 0
    local_probs = probs.detach()[:, local_experts.start : local_experts.stop]
    best_local = local_probs.argmax(dim=1) + local_experts.start  # [T]
    ir_expert = torch.where(triggered, best_local, -1)
    ir_multiplicity = torch.where(triggered, lost_choices, 0)
    return ir_expert, ir_multiplicity


def intra_gpu_capacity(num_tokens: int, topk: int, num_experts: int, factor: float) -> int:
    """``B``: IR rows per local expert in static IR, ``min(T, ceil(T * k / E * F))``.

    megatron's ``get_capacity`` formula (the same float arithmetic, ``ceil((T * k / E) * F)``)
    with the IR capacity factor ``F`` in place of ``--moe-expert-capacity-factor``: ``B`` is
    to the IR batch what ``C`` is to an expert's all-to-all buffer, a fixed size known on the
    host before any routing. Capped at ``T`` (an expert cannot rescue more distinct tokens than
    the rank has), so a large ``F`` never builds rows that can only be padding.
    """
    if num_tokens == 0:
        return 0
    return min(num_tokens, math.ceil((num_tokens * topk / num_experts) * factor))


def intra_gpu_budget(
    probs: torch.Tensor,
    ir_expert: torch.Tensor,
    ir_multiplicity: torch.Tensor,
    capacity: int,
    topk: int,
) -> torch.Tensor:
    """Static IR: which rescued tokens win one of their IR expert's ``capacity`` rows, and
    which row: ``ir_slot`` [T] long, the row (0 .. capacity-1) or -1 (not rescued, or beyond
    the budget).

    One ranking per IR expert ``h``, the key compared lexicographically being
    ``(m, p[t, h], -t)``: first the tokens that lost the most top-k choices (``m``; a token
    with ``m = k`` is computed by nobody else, one with ``m < k`` still has a kept choice), then
    the higher probability for ``h`` at float32 precision (``ordered_score_key``: NaN last),
    then the lower token index. The row is the token's rank in that order. The key is packed
    into one int64 and is unique (the token index is part of it), so the result never depends
    on how a sort breaks ties. No host sync: argsort, gather and ``scatter_add`` only.
    """
    num_tokens, num_experts = probs.shape
    device = probs.device
    rectified = ir_expert >= 0
    if num_tokens == 0 or capacity <= 0:
        return torch.full_like(ir_expert, -1)
    token_bits = max(1, math.ceil(math.log2(num_tokens)))
    tier_bits = topk.bit_length()
    if tier_bits + _SCORE_BITS + token_bits > 63:
        raise ValueError(
            f"{num_tokens} tokens with top-{topk} do not fit the 63-bit IR ranking key; "
            "route fewer tokens per call (smaller micro-batch or sequence length)."
        )
    destination = ir_expert.clamp_min(0)
    score_key = ordered_score_key(probs.gather(1, destination.unsqueeze(1)).squeeze(1))
    later_token = torch.arange(num_tokens - 1, -1, -1, device=device)
    tier = ir_multiplicity.to(torch.int64) << (_SCORE_BITS + token_bits)
    key = tier | (score_key << token_bits) | later_token
    # Tokens IR does not rescue form one extra group (index E), which never gets a row.
    group = torch.where(rectified, destination, num_experts)
    order = key.argsort(descending=True)
    order = order[group[order].argsort(stable=True)]
    sorted_group = group[order]
    # scatter_add, not bincount: CUDA's bincount reads the input's range on the host (a sync)
    per_group = torch.zeros(num_experts + 1, dtype=torch.int64, device=device)
    per_group = per_group.scatter_add(0, group, torch.ones_like(group))
    group_start = per_group.cumsum(0) - per_group
    rank = torch.arange(num_tokens, device=device) - group_start[sorted_group]
    slot = torch.empty_like(rank).scatter_(0, order, rank)
    return torch.where(rectified & (slot < capacity), slot, -1)


def rectified_gate_weights(
    probs: torch.Tensor,
    request_experts: torch.Tensor,
    won: torch.Tensor,
    ir_expert: torch.Tensor,
    ir_multiplicity: torch.Tensor,
    topk: int,
    straight_through: bool = True,
    scaling_factor: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gate weights ``(probs [T, E], ir_probs [T])`` as the spec defines them.

    ``y = (sum_{j in R} p_j E_j(x) + m p_h E_h(x)) / D`` with ``S = sum_{j in R} p_j + m p_h`` and
    ``D = sg(S)`` under the straight-through trick (``D = S`` without it). ``R`` is the set of
    requests in ``request_experts`` [T, R] that ``won`` [T, R]. Under top-1 a token whose output
    has a single term uses the spec's ``w = 1 + p - sg(p)`` instead: forward weight exactly 1,
    gradient as if the weight were ``p``. Weights outside ``R`` and ``h`` are exactly zero, and
    so is the gradient through them.

    The arithmetic runs on the [T, R] request list and is scattered into [T, E] once.
    """
    won_probs = probs.gather(1, request_experts) * won.to(probs.dtype)  # [T, R]
    rectified = ir_expert >= 0
    ir_terms = probs.gather(1, ir_expert.clamp_min(0).unsqueeze(1)).squeeze(1)
    ir_terms = ir_terms * ir_multiplicity.to(probs.dtype)  # [T]
    total = won_probs.sum(dim=1) + ir_terms  # S, [T]
    total = torch.where(total > 0, total, torch.ones_like(total))
    denominator = (total.detach() if straight_through else total).unsqueeze(1)
    weights = won_probs / denominator
    ir_weights = ir_terms / denominator.squeeze(1)

    if straight_through and topk == 1:
        single_term = (won.sum(dim=1) + rectified.to(torch.int64)) == 1  # [T]
        unit = 1.0 + (total - total.detach())  # forward exactly 1.0; d/dp = 1
        weights = torch.where(single_term.unsqueeze(1) & won, unit.unsqueeze(1), weights)
        ir_weights = torch.where(single_term & rectified, unit, ir_weights)
    if scaling_factor:
        weights = weights * scaling_factor
        ir_weights = ir_weights * scaling_factor
    dense = torch.zeros_like(probs).scatter(1, request_experts, weights)
    return dense, ir_weights


def capacity_padding(routed_map: torch.Tensor, capacity: int) -> torch.Tensor:
    """Padding pairs that top every column of ``routed_map`` [T, E] up to exactly ``capacity``.

    Column ``e`` with ``n_e <= capacity`` routed tokens gets the ``capacity - n_e`` LOWEST token
    indices not already in it. Why this rule: a padding pair has gate weight 0, so which token
    fills it never changes any output or gradient; what matters is that the choice is
    deterministic, sync-free (one cumsum), and that it takes exactly the tokens megatron's
    unfused drop-and-pad permute already took for a short column (a stable descending argsort
    of the column: routed tokens in token order, then the first unrouted ones). So on the
    unfused path every expert buffer holds the same tokens as before (now in token order), and
    the fused path now holds them too.

    Raises ``ValueError`` when ``capacity`` exceeds the number of tokens: a column cannot hold
    ``capacity`` distinct tokens then (megatron's own padded dispatcher fails on that too).
    """
    num_tokens = routed_map.shape[0]
    if capacity > num_tokens:
        raise ValueError(
            f"cannot pad expert buffers to capacity {capacity} with only {num_tokens} tokens"
        )
    free = ~routed_map
    vacancies = (capacity - routed_map.sum(dim=0)).clamp_min(0)  # [E]
    free_rank = free.cumsum(dim=0)  # 1-based rank of each free token within its column
    return free & (free_rank <= vacancies.unsqueeze(0))


def rectified_routing(
    probs: torch.Tensor,
    topk_indices: torch.Tensor,
    capacity: int,
    options: RectifyOptions,
    local_experts: range,
    selection_scores: torch.Tensor | None = None,
    scaling_factor: float | None = None,
    candidate_indices: torch.Tensor | None = None,
    pad_to_capacity: bool = False,
) -> RectifiedRouting:
    """Run capacity truncation, FR, IR and the gate weights for one rank's tokens.

    Args:
        probs: [T, E] full score distribution ``p`` (differentiable).
        topk_indices: [T, k] chosen experts in choice order (as megatron's top-k selected them).
        capacity: slots per expert for these tokens (megatron's ``get_capacity`` convention).
        options: validated rectification settings.
        local_experts: global index range of the experts on this rank (for IR).
        selection_scores: scores the (k+1)-th choice is picked by (defaults to ``probs``; the
            router passes ``probs + expert_bias`` when expert bias steers selection).
        scaling_factor: megatron's ``moe_router_topk_scaling_factor``.
        candidate_indices: [T, depth] fill-in candidates when the caller already has them (the
            router gets the (k+1)-th choice from the same ``topk`` call as the top-k).
        pad_to_capacity: megatron's ``moe_pad_expert_input_to_capacity``: add zero-weight
            padding pairs so every ``routing_map`` column holds exactly ``capacity`` (see
            :class:`RectifiedRouting`). Padding is decided last, so nothing before it (slots,
            IR, weights) can see it.
    """
    num_tokens, num_experts = probs.shape
    topk = topk_indices.shape[1]
    if options.fill_in and candidate_indices is None:
        scores = probs if selection_scores is None else selection_scores
        candidate_indices = fill_in_candidates(scores, topk_indices, options.fill_in_candidates)
    if not options.fill_in:
        candidate_indices = None
    request_experts = _request_list(topk_indices, candidate_indices)  # [T, R]
    won = slot_winners(probs, request_experts, topk, capacity, options.drop_policy)
    kept_won, fill_in_won = won[:, :topk], won[:, topk:]
    if options.intra_gpu:
        ir_expert, ir_multiplicity = intra_gpu_rectification(
            probs,
            kept_won.sum(dim=1),
            fill_in_won.any(dim=1),
            topk,
            local_experts,
            options.ir_trigger,
        )
    else:
        ir_expert = torch.full((num_tokens,), -1, dtype=torch.int64, device=probs.device)
        ir_multiplicity = torch.zeros_like(ir_expert)
    ir_capacity = ir_slot = ir_over_budget = None
    if options.intra_gpu and options.ir_capacity_factor is not None:
        # Static IR: the budget is decided before the gate weights, so a token beyond it is
        # weighted exactly as if IR had not triggered for it (no IR term, no IR weight).
        ir_capacity = intra_gpu_capacity(num_tokens, topk, num_experts, options.ir_capacity_factor)
        ir_slot = intra_gpu_budget(probs, ir_expert, ir_multiplicity, ir_capacity, topk)
        ir_over_budget = (ir_expert >= 0) & (ir_slot < 0)
        ir_expert = torch.where(ir_over_budget, -1, ir_expert)
        ir_multiplicity = torch.where(ir_over_budget, 0, ir_multiplicity)
    weights, ir_weights = rectified_gate_weights(
        probs,
        request_experts,
        won,
        ir_expert,
        ir_multiplicity,
        topk,
        options.straight_through,
        scaling_factor,
    )
    kept_map = requests_to_map(topk_indices, kept_won, num_experts)
    fill_in_map = requests_to_map(request_experts[:, topk:], fill_in_won, num_experts)
    routed_map = kept_map | fill_in_map
    if pad_to_capacity:
        padding_map = capacity_padding(routed_map, capacity)
    else:
        padding_map = torch.zeros_like(routed_map)
    # ``weights`` is a scatter into zeros over the request list: padding pairs (never requests
    # that won) keep weight exactly 0 and pass no gradient to ``probs``.
    return RectifiedRouting(
        probs=weights,
        routing_map=routed_map | padding_map,
        ir_expert=ir_expert,
        ir_probs=ir_weights,
        kept_map=kept_map,
        fill_in_map=fill_in_map,
        dropped_map=requests_to_map(topk_indices, ~kept_won, num_experts),
        padding_map=padding_map,
        capacity=capacity,
        intra_gpu=options.intra_gpu,
        ir_capacity=ir_capacity,
        ir_slot=ir_slot,
        ir_over_budget=ir_over_budget,
    )
