"""Bytes the EP all-to-all sends to OTHER ranks, per layer call and per training iteration.

Counted, not estimated: :class:`AllToAllCounter` wraps ``torch.distributed.all_to_all_single``
(which megatron's autograd ``all_to_all`` calls in the forward *and*, mirrored, in the backward)
and adds, for every call on the EP group, the bytes of the rows this rank sends to ranks other
than itself. Floating-point payload (tokens, gate weights, outputs, their gradients) is kept apart
from integer metadata (the baseline's per-expert row counts).

Modes, each built from the same weights and fed the same tokens: ``none`` (megatron's top-k with
capacity), ``ir``, ``fr``, ``ir+fr`` and ``redispatch`` (:mod:`.redispatch`, comparison only).
The benchmark asserts what the method promises: with padding to capacity IR, FR and IR+FR send
exactly the vanilla bytes, IR sends the vanilla bytes without padding too, and the baseline never
sends less than vanilla.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from benchmarks.perf.common import launch, reseed
from benchmarks.perf.layer import MODES, build_layer, forward_backward, rank_inputs
from benchmarks.perf.sweeps import IterationCase, LayerCase


class AllToAllCounter:
    """Context manager: bytes this rank sends to other ranks of ``group`` via all-to-all."""

    def __init__(self, group: torch.distributed.ProcessGroup) -> None:
        self.group = group
        self.payload_bytes = 0
        self.metadata_bytes = 0
        self.calls = 0
        self._original = None

    def __enter__(self) -> AllToAllCounter:
        self._original = torch.distributed.all_to_all_single
        torch.distributed.all_to_all_single = self._counting
        return self

    def __exit__(self, *exc: object) -> None:
        torch.distributed.all_to_all_single = self._original

    def _counting(self, output, input, output_split_sizes=None, input_split_sizes=None, **kwargs):
        if kwargs.get("group") is self.group:
            self._count(input, input_split_sizes)
        return self._original(output, input, output_split_sizes, input_split_sizes, **kwargs)

    def _count(self, tensor: torch.Tensor, splits: Any) -> None:
        world, me = self.group.size(), torch.distributed.get_rank(self.group)
        rows = tensor.shape[0] if tensor.dim() else 1
        if splits is None:
            splits = [rows // world] * world
        splits = [int(s) for s in (splits.tolist() if hasattr(splits, "tolist") else splits)]
        row_bytes = (tensor.numel() // rows if rows else 0) * tensor.element_size()
        sent = row_bytes * sum(s for rank, s in enumerate(splits) if rank != me)
        if tensor.is_floating_point():
            self.payload_bytes += sent
        else:
            self.metadata_bytes += sent
        self.calls += 1

    def as_dict(self) -> dict[str, int]:
        return {"payload": self.payload_bytes, "metadata": self.metadata_bytes}


def routing_counts(module: torch.nn.Module) -> dict[str, int]:
    """What each MoE layer of ``module`` did in its last call, summed over layers."""
    from benchmarks.perf.redispatch import RedispatchMoELayer
    from megatron.rectify.moe_layer import RectifyMoELayer

    totals: dict[str, int] = {}
    for layer in module.modules():
        counts: dict[str, int] = {}
        if isinstance(layer, RectifyMoELayer) and layer.router.last_routing is not None:
            stats = layer.router.statistics()
            counts = {k: int(getattr(stats, k)) for k in ("dropped", "filled_in", "rectified")}
        elif isinstance(layer, RedispatchMoELayer):
            counts = {f"redispatched_{k}": v for k, v in layer.last_redispatched.items()}
        for key, value in counts.items():
            totals[key] = totals.get(key, 0) + value
    return totals


def _ep_group() -> torch.distributed.ProcessGroup:
    from megatron.core import parallel_state

    return parallel_state.get_expert_model_parallel_group()


def layer_bytes_rank(
    rank: int,
    world_size: int,
    cases: list[LayerCase],
    modes: tuple[str, ...] = MODES,
    bf16: bool = False,
    te: bool = False,
) -> list[dict[str, Any]]:
    """Rank body: one forward+backward of one MoE layer per mode, bytes counted."""
    results = []
    for case in cases:
        reseed()
        x, upstream = rank_inputs(case, bf16)
        state, sent, counts = None, {}, {}
        for mode in modes:
            layer = build_layer(case, mode, bf16, te, state=state)
            state = state or layer.state_dict()
            with AllToAllCounter(_ep_group()) as counter:
                forward_backward(layer, x, upstream)
            sent[mode], counts[mode] = counter.as_dict(), routing_counts(layer)
        results.append({"case": dataclasses.asdict(case), "sent": sent, "counts": counts})
    return results


def iteration_bytes_rank(
    rank: int,
    world_size: int,
    case: IterationCase,
    trained: int = 0,
    modes: tuple[str, ...] = MODES,
    bf16: bool = False,
    te: bool = False,
) -> list[dict[str, Any]]:
    """Rank body: one training iteration of the GPT of :mod:`.iteration` per mode.

    The IR+FR model is first trained for ``trained`` iterations (as in the timed iterations of
    :mod:`.iteration`), and every mode starts from those weights: a freshly initialised router
    routes far more unevenly, and the re-dispatch baseline's bytes grow with the dropped tokens.
    (A vanilla-trained router was seen to drop about twice as many tokens after 10 iterations;
    the rectified one is the conservative choice for the baseline's extra bytes.)
    """
    from benchmarks.perf.iteration import build_trainer, text_batches, train_step

    reseed()
    batches = text_batches(case, trained + 1)
    warm = build_trainer(case, "ir+fr", bf16, te)
    for batch in batches[:trained]:
        train_step(warm, batch)
    state, sent, counts = warm.module.state_dict(), {}, {}
    for mode in modes:
        trainer = build_trainer(case, mode, bf16, te, state=state)
        with AllToAllCounter(_ep_group()) as counter:
            train_step(trainer, batches[-1])
        sent[mode], counts[mode] = counter.as_dict(), routing_counts(trainer.module)
    return [
        {"case": dataclasses.asdict(case) | {"trained": trained}, "sent": sent, "counts": counts}
    ]


def combine_ranks(per_rank: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per case: bytes and counts summed over ranks, and each rank's payload (for the checks)."""
    rows = []
    for index, first in enumerate(per_rank[0]):
        ranks = [results[index] for results in per_rank]
        row: dict[str, Any] = {**first["case"], "ranks": len(ranks), "modes": {}}
        for mode in first["sent"]:
            totals = {
                "payload_bytes": sum(r["sent"][mode]["payload"] for r in ranks),
                "metadata_bytes": sum(r["sent"][mode]["metadata"] for r in ranks),
                "payload_per_rank": [r["sent"][mode]["payload"] for r in ranks],
            }
            for key in first["counts"][mode]:
                totals[key] = sum(r["counts"][mode][key] for r in ranks)
            row["modes"][mode] = totals
        rows.append(row)
    return rows


class ByteAccountingError(AssertionError):
    """A rectified mode sent bytes that the method says it never sends."""


def check(row: dict[str, Any]) -> None:
    """The promises, rank by rank: IR never adds bytes; with padding FR and IR+FR do not
    either (fill-ins ride in padding slots); the re-dispatch baseline never sends less."""
    modes = row["modes"]
    vanilla = modes["none"]["payload_per_rank"]
    same = ["ir", "fr", "ir+fr"] if row.get("pad", True) else ["ir"]
    for mode in (m for m in same if m in modes):
        if modes[mode]["payload_per_rank"] != vanilla:
            raise ByteAccountingError(
                f"{mode} sent {modes[mode]['payload_per_rank']} bytes per rank, vanilla "
                f"{vanilla}, in {row}"
            )
    if "redispatch" in modes:
        baseline = modes["redispatch"]["payload_per_rank"]
        if any(b < v for b, v in zip(baseline, vanilla, strict=True)):
            raise ByteAccountingError(f"re-dispatch sent less than vanilla in {row}")


def run_layer(cases: list[LayerCase], bf16: bool = False, te: bool = False) -> list[dict[str, Any]]:
    """Layer-level bytes for every case (one launch per EP size), checked."""
    rows = []
    for ep in sorted({case.ep for case in cases}):
        group = [case for case in cases if case.ep == ep]
        per_rank = launch(layer_bytes_rank, ep, cases=group, bf16=bf16, te=te)
        rows.extend(combine_ranks(per_rank))
    for row in rows:
        check(row)
    return rows


def run_iteration(
    case: IterationCase, trained: int = 0, bf16: bool = False, te: bool = False
) -> dict[str, Any]:
    """Bytes of one training iteration (all MoE layers, forward+backward) after ``trained``
    iterations, checked."""
    per_rank = launch(iteration_bytes_rank, case.ep, case=case, trained=trained, bf16=bf16, te=te)
    (row,) = combine_ranks(per_rank)
    check(row)
    return row
