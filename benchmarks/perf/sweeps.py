"""Benchmark settings (one dataclass per part) and the sweeps of each preset.

A sweep varies one axis at a time around a base setting (hidden size, experts, top-k, capacity
factor, EP), instead of a full grid: a grid over five axes is hours on a CPU, and one-at-a-time
answers the question asked ("how does the cost ratio move with X?"). The report finds an axis's
rows by comparing every other field with the base.

Presets: ``quick`` (seconds; smoke tests), ``default`` (``make bench-perf``: 10-15 minutes on
2 CPU cores), ``full`` (bigger, longer CPU sweep), ``gpu`` (8-GPU sizes, EP over every GPU),
``h200`` (what ``scripts/gpu_check.sh`` runs on ONE lent H200 within its minutes: Mixtral-like layer
sizes - hidden 4096, FFN 14336, 8 experts - at EP = 1, top-1 / top-2, capacity 0.5 / 1.0 and a
dropless vanilla reference).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

PRESETS = ("quick", "default", "full", "gpu", "h200")


@dataclass(frozen=True)
class RouterCase:
    """One router call: ``tokens`` rows of width ``hidden`` routed over ``experts``."""

    tokens: int
    hidden: int
    experts: int
    topk: int
    capacity_factor: float


@dataclass(frozen=True)
class LayerCase:
    """One MoE layer (alltoall dispatcher) on ``ep`` EP ranks; ``tokens`` per rank.

    The FFN width is ``ffn_mult * hidden`` so that the hidden-size axis scales the whole layer,
    unless ``ffn_size`` fixes it (real model shapes, e.g. Mixtral's 14336 at hidden 4096).
    ``vanilla_dropless``: the vanilla layer routes without capacity (megatron's dropless MoE,
    which computes every top-k request), the rectified one with ``capacity_factor``: the price of
    IR+FR's fixed buffers against dropless routing, which loses no token either.
    """

    ep: int
    tokens: int
    hidden: int
    experts: int
    topk: int
    capacity_factor: float
    pad: bool = True
    ffn_mult: int = 4
    ffn_size: int | None = None
    vanilla_dropless: bool = False

    @property
    def ffn(self) -> int:
        return self.ffn_size or self.ffn_mult * self.hidden


@dataclass(frozen=True)
class IterationCase:
    """A small MoE GPT trained for one iteration per timing (every layer is an MoE layer)."""

    ep: int
    layers: int
    hidden: int
    experts: int
    topk: int
    capacity_factor: float
    seq_length: int = 256
    micro_batch: int = 4
    heads: int = 4
    vocab: int = 256
    pad: bool = True
    ffn_mult: int = 4

    @property
    def ffn(self) -> int:
        return self.ffn_mult * self.hidden


@dataclass(frozen=True)
class SyncCase:
    """Host synchronisations of one MoE layer call: ``tp`` is tensor = expert-tensor
    parallelism (sequence parallel when > 1), on ``tp * ep`` ranks; ``tokens`` per rank."""

    tp: int
    ep: int
    pad: bool
    tokens: int = 256
    hidden: int = 32
    experts: int = 8
    topk: int = 2
    capacity_factor: float = 0.75
    ffn_mult: int = 4


@dataclass
class Sweep:
    """A base case, the axes varied around it, and the distinct cases to measure."""

    base: Any
    axes: dict[str, list[Any]]
    cases: list[Any] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.cases:
            self.cases = one_at_a_time(self.base, self.axes)

    def as_json(self) -> dict[str, Any]:
        return {"base": dataclasses.asdict(self.base), "axes": self.axes}


def one_at_a_time(base: Any, axes: dict[str, list[Any]]) -> list[Any]:
    """The base case, then each axis's values with every other field at the base (no repeats)."""
    cases = [base]
    for field, values in axes.items():
        for value in values:
            case = dataclasses.replace(base, **{field: value})
            if case not in cases:
                cases.append(case)
    return cases


def fits(case: Any, world: int | None) -> bool:
    """Whether ``case`` can run: experts split evenly over EP, EP divides the torchrun world."""
    ep = getattr(case, "ep", 1)
    if case.experts % ep or case.topk >= case.experts:
        return False
    return world is None or world % ep == 0


def with_world_ep(base: Any, world: int | None) -> Any:
    """GPU preset: the base case uses every GPU of the launch for EP (when the experts split
    evenly), so that its headline row exists on 1, 2, 4 or 8 GPUs alike."""
    if world is None:
        return base
    ep = world if base.experts % world == 0 else 1
    return dataclasses.replace(base, ep=ep)


def router_sweep(preset: str, world: int | None = None) -> Sweep:
    """Router forward+backward: one call of T tokens (the router has no EP dependence)."""
    if preset == "quick":
        return Sweep(RouterCase(512, 64, 8, 1, 1.0), {"hidden": [32, 64]})
    base = RouterCase(tokens=16384, hidden=1024, experts=64, topk=2, capacity_factor=1.0)
    if preset == "gpu":
        base = dataclasses.replace(base, tokens=65536, hidden=4096)
        return Sweep(base, _router_axes([1024, 2048, 4096, 8192]))
    if preset == "h200":
        base = RouterCase(tokens=16384, hidden=4096, experts=8, topk=2, capacity_factor=1.0)
        return Sweep(base, {"tokens": [8192], "topk": [1], "capacity_factor": [0.5]})
    if preset == "full":
        base = dataclasses.replace(base, tokens=32768)
    return Sweep(base, _router_axes([256, 512, 1024, 2048, 4096]))


def _router_axes(hidden: list[int]) -> dict[str, list[Any]]:
    return {
        "hidden": hidden,
        "experts": [8, 16, 64, 128],
        "topk": [1, 2, 4],
        "capacity_factor": [0.5, 1.0, 1.5, 2.0],
    }


def layer_sweep(preset: str, world: int | None = None) -> Sweep:
    """One MoE layer forward+backward over EP ranks."""
    if preset == "quick":
        return Sweep(LayerCase(2, 256, 32, 4, 1, 1.0), {"hidden": [16, 32]})
    if preset == "gpu":
        base = LayerCase(ep=8, tokens=16384, hidden=2048, experts=64, topk=2, capacity_factor=1.0)
        axes = {
            "hidden": [1024, 2048, 4096],
            "experts": [8, 16, 64],
            "topk": [1, 2],
            "capacity_factor": [1.0, 1.25, 2.0],
            "ep": [1, 2, 4, 8],
        }
        return Sweep(with_world_ep(base, world), axes)
    if preset == "h200":
        # One H200: 8 experts of Mixtral-8x7B's width (GELU MLP, 2 GEMMs), 940 M parameters per
        # layer, two layers + grads ~ 7.5 GiB; a base call is ~23 model TFLOP (ms at 400 TFLOP/s).
        base = LayerCase(
            ep=8, tokens=16384, hidden=4096, experts=8, topk=2, capacity_factor=1.0,
            ffn_size=14336,
        )  # fmt: skip
        axes = {
            "tokens": [8192],
            "topk": [1],
            "capacity_factor": [0.5],
            "vanilla_dropless": [True],
        }
        return Sweep(with_world_ep(base, world), axes)
    tokens = 2048 if preset == "default" else 4096
    base = LayerCase(ep=2, tokens=tokens, hidden=256, experts=8, topk=1, capacity_factor=1.0)
    return Sweep(
        base,
        {
            "hidden": [128, 256, 512, 1024],
            "experts": [8, 16],
            "topk": [1, 2],
            "capacity_factor": [0.75, 1.0, 1.25, 1.5],
            "ep": [1, 2, 4],
        },
    )


def iteration_sweep(preset: str, world: int | None = None) -> Sweep:
    """A full training iteration of a small MoE GPT."""
    if preset == "quick":
        return Sweep(IterationCase(2, 1, 32, 4, 1, 1.0, seq_length=32, micro_batch=2), {})
    if preset == "gpu":
        # Two copies (vanilla + rectified) with Adam states must fit one GPU at EP = 1.
        base = IterationCase(
            ep=8, layers=4, hidden=1024, experts=16, topk=2, capacity_factor=1.0,
            seq_length=2048, micro_batch=4, heads=16, vocab=32768,
        )  # fmt: skip
        axes = {"hidden": [512, 1024, 2048], "ep": [1, 8], "topk": [1, 2]}
        return Sweep(with_world_ep(base, world), axes)
    if preset == "h200":
        # The ~0.57 B-parameter model of gpu_check.sh's training step, in process and
        # interleaved (not run by gpu_check.sh, whose minutes go to the real training runs).
        base = IterationCase(
            ep=8, layers=8, hidden=1024, experts=8, topk=1, capacity_factor=1.0,
            seq_length=2048, micro_batch=4, heads=16,
        )  # fmt: skip
        return Sweep(with_world_ep(base, world), {})
    base = IterationCase(ep=2, layers=2, hidden=256, experts=8, topk=1, capacity_factor=1.0)
    axes: dict[str, list[Any]] = {"hidden": [128, 256, 512], "topk": [1, 2], "ep": [1, 2]}
    if preset == "full":
        axes.update(capacity_factor=[1.0, 1.25, 2.0], ep=[1, 2, 4], experts=[8, 16])
    return Sweep(base, axes)


def bytes_sweep(preset: str, world: int | None = None) -> Sweep:
    """EP all-to-all bytes of one MoE layer: a grid over EP, top-k and capacity (cheap)."""
    if preset == "quick":
        base = LayerCase(ep=2, tokens=64, hidden=16, experts=4, topk=1, capacity_factor=1.0)
        return Sweep(base, {}, cases=[base, dataclasses.replace(base, pad=False)])
    base = LayerCase(ep=2, tokens=2048, hidden=256, experts=8, topk=1, capacity_factor=1.0)
    if preset in ("gpu", "h200"):
        base = LayerCase(ep=8, tokens=16384, hidden=2048, experts=64, topk=2, capacity_factor=1.0)
        base = with_world_ep(base, world)
    eps = [base.ep] if preset in ("gpu", "h200") else [2, 4]
    cases = [
        dataclasses.replace(base, ep=ep, topk=topk, capacity_factor=cf)
        for ep in eps
        for topk in (1, 2)
        for cf in (0.75, 1.0, 1.25)
    ]
    cases.append(dataclasses.replace(base, pad=False))
    return Sweep(base, {"ep": eps, "topk": [1, 2], "capacity_factor": [0.75, 1.0, 1.25]}, cases)


def syncs_sweep(preset: str, world: int | None = None) -> Sweep:
    """Host syncs per layer call: a grid over (TP, EP) and padding (counts, not timings, so
    small sizes say the same as big ones; the GPU preset uses the launch's GPUs for EP)."""
    layouts = [(1, 1), (1, 2), (2, 1)]
    base = SyncCase(tp=1, ep=1, pad=True)
    if preset in ("gpu", "h200"):
        base = SyncCase(tp=1, ep=1, pad=True, tokens=4096, hidden=1024, experts=16)
        layouts = sorted({(1, 1), (1, with_world_ep(base, world).ep)})
    cases = [
        dataclasses.replace(base, tp=tp, ep=ep, pad=pad)
        for tp, ep in layouts
        for pad in (True, False)
    ]
    return Sweep(
        base, {"tp, ep": [list(layout) for layout in layouts], "pad": [True, False]}, cases
    )
