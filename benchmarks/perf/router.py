"""Router forward+backward: ``RectifyRouter`` (IR+FR) / megatron's ``TopKRouter``.

Both routers hold the same weights and route the same tokens with the same capacity. The loss is
a weighted sum of the gate weights plus the IR weights, so the backward covers the gating GEMM
and every differentiable routing op. The router has no EP dependence (IR only needs to know which
experts are local), so this part runs in one process per device.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from benchmarks.perf.common import device, interleaved, launch, reseed, summarize
from benchmarks.perf.sweeps import RouterCase


def router_config(case: RouterCase, rectify: str, bf16: bool = False):
    """megatron's settings for one router; aux loss off so only routing is timed."""
    from megatron.rectify.config import RectifyTransformerConfig

    return RectifyTransformerConfig(
        num_layers=1,
        hidden_size=case.hidden,
        num_attention_heads=8,
        num_moe_experts=case.experts,
        moe_router_topk=case.topk,
        moe_expert_capacity_factor=case.capacity_factor,
        moe_router_load_balancing_type="aux_loss",
        moe_aux_loss_coeff=0.0,
        moe_router_pre_softmax=case.topk == 1,  # megatron requires it for top-1
        moe_rectify=rectify,
        moe_rectify_ir_trigger="ignore_kth",
        use_cpu_initialization=True,
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
    )


def build_routers(case: RouterCase, bf16: bool = False) -> dict[str, torch.nn.Module]:
    """``TopKRouter`` and ``RectifyRouter`` with identical weights."""
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
    from megatron.core.transformer.moe.router import TopKRouter

    from megatron.rectify.router import RectifyRouter

    pg = get_default_pg_collection()
    vanilla = TopKRouter(router_config(case, "none", bf16), pg_collection=pg)
    rectified = RectifyRouter(router_config(case, "ir+fr", bf16), pg_collection=pg)
    rectified.load_state_dict(vanilla.state_dict())
    return {"vanilla": vanilla.to(device()), "rectified": rectified.to(device())}


def _forward_backward(
    router: torch.nn.Module, x: torch.Tensor, upstream: torch.Tensor, rectified: bool
) -> None:
    x = x.detach().requires_grad_()
    if rectified:  # the rectified router returns its decision (IR weights) as a value
        output = router(x, with_decision=True)
        probs, decision = output.probs, output.decision
    else:
        (probs, _), decision = router(x), None
    loss = (probs * upstream).sum()
    if decision is not None:
        loss = loss + decision.ir_probs.sum()
    loss.backward()


def measure(
    case: RouterCase, repeats: int, warmup: int, bf16: bool = False, budget_s: float = 0.0
) -> dict[str, Any]:
    """Interleaved timings of both routers on one case, plus the rectified routing rates."""
    reseed()
    routers = build_routers(case, bf16)
    dtype = torch.bfloat16 if bf16 else torch.float32
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(case.tokens, 1, case.hidden, generator=gen).to(device(), dtype)
    upstream = torch.randn(case.tokens, case.experts, generator=gen).to(device())
    calls = {name: _bound(router, x, upstream) for name, router in routers.items()}
    samples = interleaved(calls, repeats, warmup, budget_s)
    row: dict[str, Any] = {**dataclasses.asdict(case), **summarize(samples)}
    row["vanilla_tokens_per_s"] = case.tokens / (row["vanilla_ms"] / 1e3)
    row["rectified_tokens_per_s"] = case.tokens / (row["rectified_ms"] / 1e3)
    row.update(routers["rectified"].statistics().as_percentages())
    return row


def _bound(router: torch.nn.Module, x: torch.Tensor, upstream: torch.Tensor):
    from megatron.rectify.router import RectifyRouter

    rectified = isinstance(router, RectifyRouter)
    return lambda: _forward_backward(router, x, upstream, rectified)


def bench_rank(
    rank: int,
    world_size: int,
    cases: list[RouterCase],
    repeats: int,
    warmup: int,
    threads: int | None = None,
    bf16: bool = False,
    budget_s: float = 0.0,
) -> list[dict[str, Any]]:
    """Rank body: every case in turn (each rank routes on its own device)."""
    if threads:
        torch.set_num_threads(threads)
    return [measure(case, repeats, warmup, bf16, budget_s) for case in cases]


def run(
    cases: list[RouterCase],
    repeats: int,
    warmup: int,
    threads: int | None,
    bf16: bool = False,
    budget_s: float = 0.0,
) -> list[dict[str, Any]]:
    """All cases in one process (CPU) or on every GPU (torchrun); rank 0's rows."""
    results = launch(
        bench_rank,
        1,
        cases=cases,
        repeats=repeats,
        warmup=warmup,
        threads=threads,
        bf16=bf16,
        budget_s=budget_s,
    )
    return results[0]
