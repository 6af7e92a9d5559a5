"""One MoE layer forward+backward: ``RectifyMoELayer`` (IR+FR) / megatron's ``MoELayer``.

Both layers are built in the same EP ranks from the same weights (megatron's local spec with
``SequentialMLP`` experts, or the Transformer-Engine spec with grouped GEMM on GPUs), use the
alltoall dispatcher with the same capacity, and run on the same tokens. The rectified layer
computes more tokens (the IR batch) and copies the received tokens once more; this is what the
ratio prices.

Also used by :mod:`.a2a_bytes`, which builds the same layers in every routing mode.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from benchmarks.perf.common import (
    SEED,
    device,
    interleaved,
    on_gpu,
    peak_memory_gib,
    reseed,
    run_per_ep,
    summarize,
)
from benchmarks.perf.sweeps import LayerCase

#: Routing modes a layer can be built in: megatron's (``none``), the rectified ones, and the
#: comparison-only baseline that re-dispatches dropped tokens across GPUs.
MODES = ("none", "ir", "fr", "ir+fr", "redispatch")


def ir_trigger(mode: str) -> str:
    """ignore_kth for IR+FR (the authors' setting); ``any`` for IR alone, which then rescues
    the same tokens (at least one top-k choice dropped) as the re-dispatch baseline."""
    return "ignore_kth" if mode == "ir+fr" else "any"


def layer_config(case: LayerCase, mode: str, bf16: bool = False, te: bool = False):
    """The layer's ``TransformerConfig``; ``redispatch`` is megatron's routing (mode none).

    With ``case.vanilla_dropless`` megatron's layer (mode ``none``) has no capacity (dropless,
    no padding). Weights are initialised on the GPU when there is one (a Mixtral-sized layer
    has ~1 G parameters: seconds of CPU initialisation per case); every variant loads the
    first one's ``state_dict`` anyway."""
    from megatron.rectify.config import RectifyTransformerConfig

    dropless = case.vanilla_dropless and mode == "none"
    return RectifyTransformerConfig(
        num_layers=1,
        hidden_size=case.hidden,
        ffn_hidden_size=case.ffn,
        moe_ffn_hidden_size=case.ffn,
        num_attention_heads=8,
        num_moe_experts=case.experts,
        moe_router_topk=case.topk,
        moe_router_pre_softmax=case.topk == 1,
        moe_token_dispatcher_type="alltoall",
        moe_expert_capacity_factor=None if dropless else case.capacity_factor,
        moe_pad_expert_input_to_capacity=case.pad and not dropless,
        moe_grouped_gemm=te,
        moe_aux_loss_coeff=0.0,
        moe_rectify="none" if mode in ("none", "redispatch") else mode,
        moe_rectify_ir_trigger=ir_trigger(mode),
        expert_model_parallel_size=case.ep,
        add_bias_linear=False,
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_cpu_initialization=not on_gpu(),
        gradient_accumulation_fusion=False,
    )


def layer_spec(mode: str, experts: int, te: bool = False):
    """megatron's layer spec (local or TE) with its MoE module chosen by ``mode``."""
    from megatron.core.models.gpt import gpt_layer_specs

    from benchmarks.perf.redispatch import redispatch_layer_spec
    from megatron.rectify.layer_specs import rectify_layer_spec

    if te:
        spec = gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(
            num_experts=experts, moe_grouped_gemm=True
        )
    else:
        spec = gpt_layer_specs.get_gpt_layer_local_spec(num_experts=experts, moe_grouped_gemm=False)
    if mode == "none":
        return spec
    if mode == "redispatch":
        return redispatch_layer_spec(spec)
    return rectify_layer_spec(spec)


def build_layer(
    case: LayerCase,
    mode: str,
    bf16: bool = False,
    te: bool = False,
    state: dict[str, torch.Tensor] | None = None,
) -> torch.nn.Module:
    """One MoE layer in ``mode``; ``state`` (another layer's ``state_dict``) makes the weights
    identical across modes (every mode has the same parameters)."""
    config = layer_config(case, mode, bf16, te)
    spec = layer_spec(mode, case.experts, te)
    layer = spec.submodules.mlp(config=config, layer_number=1).to(device())
    if state is not None:
        layer.load_state_dict(state)
    layer.train()
    return layer


def rank_inputs(case: LayerCase, bf16: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """This EP rank's tokens [T, 1, H] and output gradient (different on every rank)."""
    from megatron.core import parallel_state

    rank = parallel_state.get_expert_model_parallel_rank()
    rank += 1000 * parallel_state.get_expert_data_parallel_rank()
    gen = torch.Generator().manual_seed(SEED + rank)
    dtype = torch.bfloat16 if bf16 else torch.float32
    x = torch.randn(case.tokens, 1, case.hidden, generator=gen).to(device(), dtype)
    upstream = torch.randn(case.tokens, 1, case.hidden, generator=gen).to(device(), dtype)
    return x, upstream


def forward_backward(layer: torch.nn.Module, x: torch.Tensor, upstream: torch.Tensor) -> None:
    """One training call of the layer: forward, then backward of ``<output, upstream>``."""
    x = x.detach().requires_grad_()
    output, _ = layer(x)
    (output * upstream).sum().backward()


def model_flops(case: LayerCase) -> float:
    """Model FLOPs of one forward+backward per rank (megatron's convention: every token's k
    expert MLPs and the gating GEMM, x3 for the backward; capacity, padding and IR ignored, so
    both variants are credited the same work)."""
    per_token = 2 * case.hidden * case.experts + case.topk * 4 * case.hidden * case.ffn
    return 3.0 * case.tokens * per_token


def measure(
    case: LayerCase,
    repeats: int,
    warmup: int,
    bf16: bool = False,
    te: bool = False,
    budget_s: float = 0.0,
) -> dict[str, Any]:
    """Interleaved timings of both layers on one case (this rank's view)."""
    reseed()
    vanilla = build_layer(case, "none", bf16, te)
    rectified = build_layer(case, "ir+fr", bf16, te, state=vanilla.state_dict())
    x, upstream = rank_inputs(case, bf16)
    layers = {"vanilla": vanilla, "rectified": rectified}
    calls = {name: _bound(layer, x, upstream) for name, layer in layers.items()}
    row: dict[str, Any] = {
        **dataclasses.asdict(case),
        **summarize(interleaved(calls, repeats, warmup, budget_s)),
    }
    for name, call in calls.items():
        seconds = row[f"{name}_ms"] / 1e3
        row[f"{name}_tokens_per_s"] = case.tokens / seconds
        row[f"{name}_tflops"] = model_flops(case) / seconds / 1e12
        row[f"{name}_peak_gib"] = peak_memory_gib(call)
    row.update(rectified.router.statistics().as_percentages())
    return row


def _bound(layer: torch.nn.Module, x: torch.Tensor, upstream: torch.Tensor):
    return lambda: forward_backward(layer, x, upstream)


def run(
    cases: list[LayerCase],
    repeats: int,
    warmup: int,
    bf16: bool = False,
    te: bool = False,
    budget_s: float = 0.0,
) -> list[dict[str, Any]]:
    """Every case, grouped by EP size (one launch per EP size); timings from rank 0 (already
    the slowest rank's), routing rates averaged over ranks."""
    return run_per_ep(
        measure,
        "layer",
        cases,
        repeats=repeats,
        warmup=warmup,
        bf16=bf16,
        te=te,
        budget_s=budget_s,
    )
