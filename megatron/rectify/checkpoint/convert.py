"""The conversions behind ``tools/checkpoint``: HF -> megatron (import, upcycle), megatron -> HF
(export), and a logits comparison of the two (verify).

Each conversion runs one megatron session (see ``session``): the model is built by the training
run's own model provider, filled tensor by tensor through ``hf_weights``, and saved / loaded by
megatron's own checkpointing. A parameter without a source, a source tensor without a
destination and every shape mismatch are errors, so nothing is left uninitialised or dropped.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from megatron.rectify.checkpoint import session
from megatron.rectify.checkpoint.atomic import atomic_output_dir, check_destination
from megatron.rectify.checkpoint.errors import CheckpointToolError
from megatron.rectify.checkpoint.hf_architecture import (
    Architecture,
    architecture_from_hf_config,
    architecture_from_megatron_args,
    hf_config_from_architecture,
    megatron_model_flags,
)
from megatron.rectify.checkpoint.hf_files import (
    DTYPE_NAMES,
    DTYPES,
    HFCheckpointReader,
    write_hf_checkpoint,
)
from megatron.rectify.checkpoint.hf_weights import hf_tensors_from_megatron, megatron_tensor_from_hf
from megatron.rectify.progress import Progress

#: Flags the tools derive from the HF config: the user may not set them too.
ARCHITECTURE_FLAGS = frozenset(
    {
        "--num-layers", "--hidden-size", "--ffn-hidden-size", "--num-attention-heads",
        "--kv-channels", "--max-position-embeddings", "--position-embedding-type",
        "--rotary-base", "--normalization", "--norm-epsilon", "--swiglu",
        "--disable-bias-linear", "--group-query-attention", "--num-query-groups",
        "--untie-embeddings-and-output-weights",
    }
)  # fmt: skip


@dataclass(frozen=True)
class ParallelLayout:
    """The layout a converted checkpoint is meant for (recorded in its args; distributed
    checkpointing lets it load under any other layout too)."""

    tensor: int = 1
    pipeline: int = 1
    expert: int = 1

    def problems(self, arch: Architecture, num_experts: int | None) -> list[str]:
        checks = [
            (arch.num_attention_heads % self.tensor, "--num-attention-heads", self.tensor, "TP"),
            (arch.num_query_groups % self.tensor, "key/value heads", self.tensor, "TP"),
            (arch.ffn_hidden_size % self.tensor, "--ffn-hidden-size", self.tensor, "TP"),
            (arch.num_layers % self.pipeline, "--num-layers", self.pipeline, "PP"),
        ]
        if num_experts is not None:
            checks.append((num_experts % self.expert, "--num-experts", self.expert, "EP"))
        elif self.expert > 1:
            return ["--target-expert-parallel-size > 1 needs an MoE model (--num-experts)"]
        return [
            f"{what} is not divisible by the target {name} size {size}"
            for remainder, what, size, name in checks
            if remainder
        ]


def padded_vocab_size(vocab_size: int, divisible_by: int, tensor_parallel: int) -> int:
    """megatron's embedding rows for ``vocab_size`` tokens (``vocab_size_with_padding``)."""
    multiple = divisible_by * tensor_parallel
    return int(math.ceil(vocab_size / multiple) * multiple)


def _flag_value(flags: list[str], name: str, default: str | None = None) -> str | None:
    for index, flag in enumerate(flags):
        if flag == name and index + 1 < len(flags):
            return flags[index + 1]
        if flag.startswith(name + "="):
            return flag.split("=", 1)[1]
    return default


def import_hf(
    hf_dir: str,
    save_dir: str,
    user_flags: list[str],
    layout: ParallelLayout,
    dtype: str = "fp32",
    upcycle: bool = False,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """HF Llama/Mixtral folder -> megatron ``release`` checkpoint of the rectified MoE GPT.

    ``upcycle``: the HF model is dense (Llama) and ``user_flags`` make an MoE (``--num-experts``):
    every expert starts as a copy of its layer's FFN, routers as megatron initialises them.
    ``progress``: where phases and tensors / bytes done are reported (default: nowhere).
    """
    progress = progress or Progress("", quiet=True)
    check_destination(save_dir, overwrite)
    reader = HFCheckpointReader(hf_dir)
    try:
        arch = architecture_from_hf_config(reader.config)
    except CheckpointToolError as error:
        message = str(error)
        if message.startswith("config.json"):  # say which config.json
            where = Path(hf_dir) / "config.json"
            raise CheckpointToolError(f"{where}{message.removeprefix('config.json')}") from None
        raise
    clashes = sorted({flag.split("=")[0] for flag in user_flags} & ARCHITECTURE_FLAGS)
    if clashes:
        raise CheckpointToolError(
            f"{', '.join(clashes)} come from {hf_dir}/config.json; remove them from the command"
        )
    num_experts = _flag_value(user_flags, "--num-experts")
    if upcycle:
        if arch.is_moe:
            raise CheckpointToolError(f"{hf_dir} is already an MoE ({reader.config['model_type']})")
        if num_experts is None:
            raise CheckpointToolError("upcycling needs --num-experts N (experts per MoE layer)")
        moe_ffn = _flag_value(user_flags, "--moe-ffn-hidden-size", str(arch.ffn_hidden_size))
        if int(moe_ffn) != arch.ffn_hidden_size:
            raise CheckpointToolError(
                f"--moe-ffn-hidden-size {moe_ffn} differs from the dense FFN "
                f"({arch.ffn_hidden_size}): each expert is a full copy of the dense FFN"
            )
    elif num_experts is not None and not arch.is_moe:
        raise CheckpointToolError(
            "--num-experts on a dense model: use tools/checkpoint/upcycle_dense_to_moe.py"
        )
    reader.require_weights()  # a folder without weights fails here, before megatron starts
    experts = int(num_experts) if num_experts is not None else arch.num_experts
    problems = layout.problems(arch, experts)
    if problems:
        raise CheckpointToolError("; ".join(problems))
    divisible_by = int(_flag_value(user_flags, "--make-vocab-size-divisible-by", "128"))
    vocab_rows = padded_vocab_size(arch.vocab_size, divisible_by, layout.tensor)

    model_flags = megatron_model_flags(arch)
    if upcycle:
        model_flags += ["--moe-ffn-hidden-size", str(arch.ffn_hidden_size)]
        if _flag_value(user_flags, "--moe-router-topk") is None:
            model_flags += ["--moe-router-topk", "1"]
        topk = int(_flag_value(user_flags, "--moe-router-topk", "1"))
        if topk == 1 and "--moe-router-pre-softmax" not in user_flags:
            # megatron-core 0.19 refuses top-1 without pre-softmax (a softmax over one logit is
            # always 1 and trains no router)
            model_flags.append("--moe-router-pre-softmax")
    seq_length = ["--seq-length", str(min(arch.max_position_embeddings, 4096))]
    if _flag_value(user_flags, "--seq-length") is not None:
        seq_length = []
    dtype_flags = {"fp32": [], "bf16": ["--bf16"], "fp16": ["--fp16"]}[dtype]

    with atomic_output_dir(save_dir, overwrite) as staging:
        args = session.start_megatron(
            [
                *model_flags,
                *seq_length,
                *dtype_flags,
                "--no-initialization",
                *user_flags,
                "--save",
                str(staging),
            ],  # fmt: skip
            padded_vocab_size=vocab_rows,
            prog="convert" if not upcycle else "upcycle",
        )
        progress.note("building the megatron model")
        model = session.build_model()
        filled = _fill_from_hf(model, reader, arch, vocab_rows, upcycle, progress)
        unused = reader.unused()
        if unused:
            raise CheckpointToolError(
                f"{len(unused)} tensors of {hf_dir} have no megatron counterpart "
                f"(e.g. {unused[:3]}); refusing to drop them"
            )
        _record_provenance(args, layout, arch, hf_dir, upcycle)
        progress.note("saving the torch_dist checkpoint")
        started = time.monotonic()
        session.save_release_checkpoint(model, recorded_save_dir=Path(save_dir).absolute())
        progress.note(f"saved in {time.monotonic() - started:.1f} s")
    return {"tensors": filled, "padded_vocab_size": vocab_rows, "architecture": arch}


def _fill_from_hf(
    model: torch.nn.Module,
    reader: HFCheckpointReader,
    arch: Architecture,
    vocab_rows: int,
    upcycle: bool,
    progress: Progress,
) -> int:
    from megatron.rectify.router import RectifyRouter

    state = session.megatron_state_dict(model)
    progress.begin(len(state), sum(_nbytes(tensor) for tensor in state.values()))
    routers = {
        f"{name}.weight": module
        for name, module in model.named_modules()
        if isinstance(module, RectifyRouter)
    }
    with torch.no_grad():
        for name, destination in state.items():
            value = megatron_tensor_from_hf(name, arch, reader.read, vocab_rows, upcycle)
            if value is None:  # an upcycled router: megatron's own initialisation
                router = routers[name]
                router.config.perform_initialization = True
                router.reset_parameters()
                router.config.perform_initialization = False
                progress.advance(1, _nbytes(destination))
                continue
            if tuple(value.shape) != tuple(destination.shape):
                raise CheckpointToolError(
                    f"shape mismatch for {name}: megatron {tuple(destination.shape)}, from HF "
                    f"{tuple(value.shape)}"
                )
            destination.copy_(value.to(destination.dtype))
            progress.advance(1, _nbytes(destination))
    progress.finish("filled")
    return len(state)


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _record_provenance(
    args: argparse.Namespace, layout: ParallelLayout, arch: Architecture, hf_dir: str, upcycle: bool
) -> None:
    """The saved args say which layout the checkpoint is for (``--use-mp-args-from-checkpoint-
    args`` picks it up), where it came from, and the HF vocabulary size (export crops to it)."""
    args.tensor_model_parallel_size = layout.tensor
    args.pipeline_model_parallel_size = layout.pipeline
    args.expert_model_parallel_size = layout.expert
    args.hf_vocab_size = arch.vocab_size
    args.converted_from = {"hf_dir": str(Path(hf_dir).absolute()), "upcycled": upcycle}


def export_hf(
    load_dir: str,
    hf_dir: str,
    dtype: str = "bf16",
    max_shard_bytes: int = 5 * 1024**3,
    overwrite: bool = False,
    vocab_size: int | None = None,
    extra_flags: list[str] | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """megatron checkpoint (any layout it was saved in) -> HF Mixtral (or Llama when dense).

    ``progress``: where phases and tensors / bytes written are reported (default: nowhere).
    """
    from megatron.rectify.checkpoint.layout import read_checkpoint_args

    progress = progress or Progress("", quiet=True)
    check_destination(hf_dir, overwrite)
    saved = read_checkpoint_args(load_dir)
    vocab = vocab_size or getattr(saved, "hf_vocab_size", None) or saved.padded_vocab_size
    arch = architecture_from_megatron_args(saved, vocab)  # refuse before the slow part
    session.start_megatron(
        [
            "--load",
            str(load_dir),
            "--use-checkpoint-args",
            "--no-initialization",
            *(extra_flags or []),
        ],  # fmt: skip
        prog="convert export",
        routing_from_checkpoint=False,  # the weights do not depend on the routing
    )
    progress.note(f"building the megatron model and loading {load_dir}")
    started = time.monotonic()
    model = session.build_model()
    session.load_model_weights(model)
    progress.note(f"loaded in {time.monotonic() - started:.1f} s")
    state = session.megatron_state_dict(model)
    config = hf_config_from_architecture(arch, DTYPE_NAMES[dtype])
    progress.begin(total_bytes=_hf_nbytes(state, arch, DTYPES[dtype]))
    with atomic_output_dir(hf_dir, overwrite) as staging:
        count = write_hf_checkpoint(
            staging,
            config,
            hf_tensors_from_megatron(state, arch),
            dtype,
            max_shard_bytes,
            on_tensor=lambda nbytes: progress.advance(1, nbytes),
        )
    progress.finish("wrote")
    return {"tensors": count, "architecture": arch}


def _hf_nbytes(state: dict[str, torch.Tensor], arch: Architecture, dtype: torch.dtype) -> int:
    """Bytes of the exported tensors: the state in ``dtype``, vocabulary rows cropped."""
    vocab_tensors = ("embedding.word_embeddings.weight", "output_layer.weight")
    elements = sum(
        min(tensor.shape[0], arch.vocab_size) * tensor[0].numel()
        if name in vocab_tensors
        else tensor.numel()
        for name, tensor in state.items()
    )
    return elements * torch.empty((), dtype=dtype).element_size()


def megatron_logits(tokens: torch.Tensor, model: torch.nn.Module) -> torch.Tensor:
    """Full-vocabulary logits [batch, seq, vocab] of the megatron model on this rank's TP group
    (gathered over TP; meaningful on the last pipeline stage)."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    batch, seq = tokens.shape
    positions = torch.arange(seq).unsqueeze(0).expand(batch, seq)
    causal = torch.triu(torch.ones(seq, seq, dtype=torch.bool), diagonal=1).view(1, 1, seq, seq)
    with torch.no_grad():
        logits = model(tokens, positions, causal)
    return gather_from_tensor_model_parallel_region(logits)
