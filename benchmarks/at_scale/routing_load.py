"""How unevenly tokens land: per-expert popularity plus sampling noise, and the slowest rank.

Why a distribution and not a single number: an MoE step waits for its slowest EP rank, so the
*maximum* over ranks of the expert rows (dropless) or of the IR rows (rectified) sets the pace,
and a maximum depends on the spread, the number of ranks and the tokens per rank. One parameter
describes the router: ``cv``, the coefficient of variation of the experts' popularity
(log-normal, mean 1, the same popularity on every rank: hot experts are hot everywhere). Each
rank then routes its ``k * T`` requests multinomially. ``cv`` is fitted to a *measured* dropped
fraction (:func:`fit_cv`), so everything else (padding, the slowest rank's IR load, the hottest
rank's dropless load) follows from one measurement.

Limits (stated in the report): top-k requests of one token are drawn independently (a token may
pick the same expert twice; negligible for k << E); ranks differ only by sampling noise, not by
their data (different documents on different ranks would spread the IR load more).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

DRAWS = 256  # independent popularity draws (routers / layers / iterations)
SEED = 1234


def capacity(tokens: int, topk: int, capacity_factor: float, experts: int) -> int:
    """Slots per expert per source rank: megatron's ``get_capacity(tokens * topk, E, cf)``."""
    return math.ceil(tokens * topk / experts * capacity_factor)


@dataclass(frozen=True)
class LoadStats:
    """Routing of ``k * T`` requests per rank over ``E`` experts on ``ep`` ranks.

    ``dropped_frac``: dropped requests / requests; ``padded_frac``: empty slots / slots (0
    dropless); ``dropped_max_over_mean``: E[max over ranks of a rank's dropped requests] /
    E[mean] (IR computes a rank's own dropped tokens on that rank); ``rank_load_max_over_mean``:
    the same for the expert rows a rank *receives* without capacity (dropless).
    """

    dropped_frac: float
    padded_frac: float
    dropped_max_over_mean: float
    rank_load_max_over_mean: float


def _popularity(cv: float, experts: int, draws: int, rng: np.random.Generator) -> np.ndarray:
    """[draws, E] routing probabilities: log-normal popularity with mean 1 and CV ``cv``.

    The normal draws are made before ``cv`` is applied, so every ``cv`` sees the same random
    numbers (the fit below is then a smooth function of ``cv``)."""
    z = rng.standard_normal((draws, experts))
    sigma = math.sqrt(math.log1p(cv * cv))
    weights = np.exp(sigma * z - sigma * sigma / 2)
    return weights / weights.sum(axis=1, keepdims=True)


@functools.lru_cache(maxsize=4096)  # pure and seeded: the report asks for the same cases often
def simulate(
    cv: float,
    experts: int,
    ep: int,
    tokens: int,
    topk: int,
    capacity_factor: float | None,
    draws: int = DRAWS,
    seed: int = SEED,
) -> LoadStats:
    """Monte-Carlo :class:`LoadStats` (seeded: the same call gives the same numbers)."""
    rng = np.random.default_rng(seed)
    probs = _popularity(cv, experts, draws, rng)
    counts = rng.multinomial(topk * tokens, probs[:, None, :], size=(draws, ep))
    received = counts.sum(axis=1).reshape(draws, ep, experts // ep).sum(axis=2)  # [draws, ep]
    load_ratio = float(received.max(axis=1).mean() / received.mean())
    if capacity_factor is None:
        return LoadStats(0.0, 0.0, 1.0, load_ratio)
    slots = capacity(tokens, topk, capacity_factor, experts)
    dropped = np.clip(counts - slots, 0, None).sum(axis=2)  # [draws, ep] per source rank
    padded = np.clip(slots - counts, 0, None).sum(axis=2)
    mean_dropped = float(dropped.mean())
    spread = float(dropped.max(axis=1).mean() / mean_dropped) if mean_dropped > 0 else 1.0
    return LoadStats(
        dropped_frac=mean_dropped / (topk * tokens),
        padded_frac=float(padded.mean()) / (slots * experts),
        dropped_max_over_mean=spread,
        rank_load_max_over_mean=load_ratio,
    )


@functools.lru_cache(maxsize=256)
def fit_cv(
    dropped_frac: float,
    experts: int,
    ep: int,
    tokens: int,
    topk: int,
    capacity_factor: float,
    iterations: int = 30,
    high: float = 4.0,
) -> float:
    """The popularity CV at which :func:`simulate` drops ``dropped_frac`` of the requests.

    0 when sampling noise alone already drops that much (a perfectly balanced router); bisection
    otherwise (the dropped fraction grows with ``cv``)."""

    def dropped(cv: float) -> float:
        return simulate(cv, experts, ep, tokens, topk, capacity_factor).dropped_frac

    low = 0.0
    if dropped(low) >= dropped_frac:
        return 0.0
    if dropped(high) < dropped_frac:
        raise ValueError(f"no CV <= {high} drops {dropped_frac:.1%} at capacity {capacity_factor}")
    for _ in range(iterations):
        mid = (low + high) / 2
        low, high = (mid, high) if dropped(mid) < dropped_frac else (low, mid)
    return (low + high) / 2
