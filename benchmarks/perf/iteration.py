"""A full training iteration: MoE GPT with IR+FR / the same GPT with megatron's routing.

One iteration is what ``megatron.training`` does per step, built from megatron-core's own
pieces: ``GPTModel`` (every layer an MoE layer, alltoall dispatcher, padded capacity), megatron's
``DistributedDataParallel`` (gradient all-reduce over the data-parallel ranks), its optimizer
(Adam, expert and dense parameter groups) and its pipeline schedule (forward, backward, aux-loss
scaling, ``finalize_model_grads``). Both models are built in the same processes from the same
initial weights and step through the same batches, alternately, so the ratio is measured under
the same conditions. Running ``pretrain_gpt_rectify.py`` twice would time the two variants
minutes apart; this keeps them interleaved.

Data: the bytes of Python's own standard library (byte-level tokens, vocabulary 256): real text,
so routing is as uneven as a small model's routing is, with nothing to download.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks.perf.common import (
    device,
    interleaved,
    peak_memory_gib,
    reseed,
    run_per_ep,
    summarize,
)
from benchmarks.perf.layer import ir_trigger, layer_spec
from benchmarks.perf.sweeps import IterationCase

#: Most timed iterations per setting (each steps through its own batch of text).
MAX_REPEATS = 60


def model_config(case: IterationCase, mode: str, bf16: bool = False, te: bool = False):
    """GPT settings; fusions that need CUDA kernels are off on every device (the same for both
    variants, so they do not move the ratio)."""
    from megatron.rectify.config import RectifyTransformerConfig

    return RectifyTransformerConfig(
        num_layers=case.layers,
        hidden_size=case.hidden,
        ffn_hidden_size=case.ffn,
        moe_ffn_hidden_size=case.ffn,
        num_attention_heads=case.heads,
        num_moe_experts=case.experts,
        moe_router_topk=case.topk,
        moe_router_pre_softmax=case.topk == 1,
        moe_token_dispatcher_type="alltoall",
        moe_expert_capacity_factor=case.capacity_factor,
        moe_pad_expert_input_to_capacity=case.pad,
        moe_grouped_gemm=te,
        moe_aux_loss_coeff=0.01,
        moe_rectify="none" if mode in ("none", "redispatch") else mode,
        moe_rectify_ir_trigger=ir_trigger(mode),
        expert_model_parallel_size=case.ep,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_cpu_initialization=True,
        gradient_accumulation_fusion=False,
        masked_softmax_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
    )


@dataclass
class Trainer:
    """One model's training state: the DDP-wrapped model and its megatron optimizer."""

    model: torch.nn.Module
    optimizer: Any
    module: torch.nn.Module  # the unwrapped GPTModel (state dicts, statistics)


def build_trainer(
    case: IterationCase,
    mode: str,
    bf16: bool = False,
    te: bool = False,
    state: dict[str, torch.Tensor] | None = None,
) -> Trainer:
    """``GPTModel`` in ``mode`` -> (bf16 wrapper) -> DDP -> optimizer, as ``pretrain`` does.

    ``state`` (another trainer's ``module.state_dict()``) gives every mode the same weights.
    """
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.models.gpt import GPTModel
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.transformer.module import Float16Module

    config = model_config(case, mode, bf16, te)
    module = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(mode, case.experts, te),
        vocab_size=case.vocab,
        max_sequence_length=case.seq_length,
    ).to(device())
    if state is not None:
        module.load_state_dict(state)
    wrapped = Float16Module(config, module) if bf16 else module
    ddp = DistributedDataParallel(
        config=config,
        ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=bf16),
        module=wrapped,
    )
    config.no_sync_func = ddp.no_sync
    config.finalize_model_grads_func = finalize_model_grads
    optimizer_config = OptimizerConfig(
        optimizer="adam",
        lr=1e-3,
        bf16=bf16,
        params_dtype=config.params_dtype,
        clip_grad=1.0,
    )
    optimizer = get_megatron_optimizer(optimizer_config, [ddp])
    return Trainer(model=ddp, optimizer=optimizer, module=module)


def _text_bytes(count: int) -> torch.Tensor:
    """The first ``count`` bytes of the standard library's ``.py`` files (sorted, repeatable)."""
    out = bytearray()
    for path in sorted(Path(os.__file__).parent.glob("*.py")):
        out += path.read_bytes()
        if len(out) >= count:
            break
    return torch.frombuffer(out[:count], dtype=torch.uint8).long()


def text_batches(case: IterationCase, steps: int) -> list[dict[str, torch.Tensor]]:
    """``steps`` consecutive micro-batches of this data-parallel rank (every rank its own)."""
    from megatron.core import parallel_state

    tokens = case.micro_batch * case.seq_length
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    data = _text_bytes(tokens * steps * dp_size + 1)
    positions = torch.arange(case.seq_length).expand(case.micro_batch, -1)
    batches = []
    for step in range(steps):
        start = (step * dp_size + dp_rank) * tokens
        window = data[start : start + tokens + 1]
        batches.append(
            {
                "tokens": window[:-1].view(case.micro_batch, -1).to(device()),
                "labels": window[1:].view(case.micro_batch, -1).to(device()),
                "position_ids": positions.to(device()),
            }
        )
    return batches


def _forward_step(batch_iterator: Iterator[dict[str, torch.Tensor]], model: torch.nn.Module):
    """megatron's forward-step contract: the output and a loss function of it."""
    batch = next(batch_iterator)
    losses = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])

    def loss_func(output: torch.Tensor):
        loss = output.float().mean()
        return loss, {"lm loss": loss.detach()}

    return losses, loss_func


def train_step(trainer: Trainer, batch: dict[str, torch.Tensor]) -> None:
    """One iteration: zero grads, forward+backward (one micro-batch), DP all-reduce, step."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    trainer.model.zero_grad_buffer()
    trainer.optimizer.zero_grad()
    get_forward_backward_func()(
        forward_step_func=_forward_step,
        data_iterator=iter([batch]),
        model=[trainer.model],
        num_microbatches=1,
        seq_length=batch["tokens"].shape[1],
        micro_batch_size=batch["tokens"].shape[0],
        forward_only=False,
    )
    trainer.optimizer.step()


def model_flops_per_token(case: IterationCase) -> float:
    """Forward+backward model FLOPs per token (megatron's convention: 3x the forward; the
    forward is 2 FLOPs per weight used by the token - attention projections, the router, k
    experts, the output layer - plus the attention scores and context, causal mask ignored)."""
    h, s = case.hidden, case.seq_length
    per_layer = 8 * h * h + 4 * s * h + 2 * h * case.experts + case.topk * 4 * h * case.ffn
    return 3.0 * (case.layers * per_layer + 2 * h * case.vocab)


def _stepper(trainer: Trainer, batches: list[dict[str, torch.Tensor]]):
    position = iter(range(10**9))
    return lambda: train_step(trainer, batches[next(position) % len(batches)])


def measure(
    case: IterationCase,
    repeats: int,
    warmup: int,
    bf16: bool = False,
    te: bool = False,
    budget_s: float = 0.0,
) -> dict[str, Any]:
    """Interleaved iterations of both models (this rank's view of the timings)."""
    reseed()
    vanilla = build_trainer(case, "none", bf16, te)
    rectified = build_trainer(case, "ir+fr", bf16, te, state=vanilla.module.state_dict())
    batches = text_batches(case, warmup + max(repeats, MAX_REPEATS) + 1)
    trainers = {"vanilla": vanilla, "rectified": rectified}
    steps = {name: _stepper(trainer, batches) for name, trainer in trainers.items()}
    samples = interleaved(
        steps,
        repeats,
        warmup,  # the warm-up also lets the aux loss even out the initial routing a little
        budget_s,
        max_repeats=MAX_REPEATS,
        before_timing=lambda: rectified.module.apply(_reset_statistics),  # rates: timed only
    )
    row: dict[str, Any] = {**dataclasses.asdict(case), **summarize(samples)}
    tokens = case.micro_batch * case.seq_length
    for name, step in steps.items():
        seconds = row[f"{name}_ms"] / 1e3
        row[f"{name}_tokens_per_s"] = tokens / seconds
        row[f"{name}_tflops"] = tokens * model_flops_per_token(case) / seconds / 1e12
        row[f"{name}_peak_gib"] = peak_memory_gib(step)
    row.update(rectified_rates(rectified.module))
    return row


def _reset_statistics(module: torch.nn.Module) -> None:
    from megatron.rectify.moe_layer import RectifyMoELayer

    if isinstance(module, RectifyMoELayer):
        module.cumulative_statistics.clear()


def rectified_rates(module: torch.nn.Module) -> dict[str, float]:
    """Routing rates over every training call so far, averaged over the MoE layers."""
    from megatron.rectify.moe_layer import RectifyMoELayer

    summaries = [m.statistics_summary() for m in module.modules() if isinstance(m, RectifyMoELayer)]
    summaries = [s for s in summaries if s]
    if not summaries:
        return {}
    return {key: sum(s[key] for s in summaries) / len(summaries) for key in summaries[0]}


def run(
    cases: list[IterationCase],
    repeats: int,
    warmup: int,
    bf16: bool = False,
    te: bool = False,
    budget_s: float = 0.0,
) -> list[dict[str, Any]]:
    """Every case, one launch per EP size; rank 0's rows (rates averaged over ranks)."""
    return run_per_ep(
        measure,
        "iteration",
        cases,
        repeats=repeats,
        warmup=warmup,
        bf16=bf16,
        te=te,
        budget_s=budget_s,
    )
