"""What ``tools/checkpoint/inspect.py`` reports: a checkpoint described from its own files.

Everything comes from the checkpoint's saved args and its tensor metadata, so it works for a
checkpoint of any size on any machine, and shows what a resumed run would rebuild - including
the rectify settings (restored by ``pretrain_gpt_rectify.py --use-checkpoint-args``, not by
megatron's own). The shard files' tensor data is read only by :func:`verify_checkpoint`
(``inspect.py --verify``).
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from megatron.rectify.checkpoint.errors import CheckpointToolError
from megatron.rectify.checkpoint.layout import (
    TensorEntry,
    checkpoint_iteration_dir,
    read_common_state,
    read_tensor_entries,
)

LAYOUT_ARGS = {
    "tensor_model_parallel_size": "TP",
    "pipeline_model_parallel_size": "PP",
    "expert_model_parallel_size": "EP",
    "expert_tensor_parallel_size": "ETP",
    "context_parallel_size": "CP",
    "virtual_pipeline_model_parallel_size": "VPP",
    "sequence_parallel": "sequence parallel",
    "world_size": "world size",
}
MODEL_ARGS = (
    "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
    "kv_channels", "padded_vocab_size", "max_position_embeddings", "seq_length",
    "position_embedding_type", "rotary_base", "normalization", "layernorm_epsilon", "swiglu",
    "untie_embeddings_and_output_weights", "transformer_impl", "params_dtype",
)  # fmt: skip
MOE_ARGS = (
    "num_experts", "moe_router_topk", "moe_ffn_hidden_size", "moe_layer_freq",
    "moe_router_pre_softmax", "moe_router_score_function", "moe_expert_capacity_factor",
    "moe_pad_expert_input_to_capacity", "moe_token_drop_policy", "moe_token_dispatcher_type",
    "moe_aux_loss_coeff", "moe_router_load_balancing_type", "moe_grouped_gemm",
)  # fmt: skip
RECTIFY_ARGS = (
    "moe_rectify", "moe_rectify_ir_trigger", "moe_rectify_fill_in_candidates",
    "moe_rectify_straight_through", "moe_rectify_eval", "moe_rectify_ir_capacity_factor",
)  # fmt: skip


def _plain(value: Any) -> Any:
    """JSON-friendly: dtypes and other objects as strings."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    return str(value)


def _pick(args: argparse.Namespace, names: Any) -> dict[str, Any]:
    return {name: _plain(getattr(args, name, None)) for name in names}


def _read_index_and_common_state(save_dir: str | os.PathLike) -> tuple[dict, list[TensorEntry]]:
    """The common state and the tensor index; an unreadable file becomes one line naming it."""
    from torch.distributed.checkpoint.api import CheckpointException

    from megatron.rectify.checkpoint.integrity import quick_check

    folder = checkpoint_iteration_dir(save_dir)
    try:
        return read_common_state(save_dir), read_tensor_entries(save_dir)
    except CheckpointToolError:
        raise
    except (Exception, CheckpointException) as error:  # DCP's exception is a BaseException
        problem = quick_check(folder)
        if problem is None:
            first = (str(error).strip().splitlines() or [""])[0][:200]
            problem = f"{folder} cannot be read ({type(error).__name__}: {first})"
        raise CheckpointToolError(f"{problem}; run with --verify on an earlier iteration's "
                                  "copy, or restore the file") from None  # fmt: skip


def checkpoint_summary(
    save_dir: str | os.PathLike, with_tensors: bool = True, verify: bool = False
) -> dict[str, Any]:
    """What ``inspect.py`` prints; ``verify``: read every tensor of the shard files too
    (otherwise only their sizes are checked against the index)."""
    state, entries = _read_index_and_common_state(save_dir)
    args = state.get("args", argparse.Namespace())
    weights = [
        e for e in entries if not e.key.startswith("optimizer") and "_extra_state" not in e.key
    ]
    parameters = 0
    for entry in weights:
        count = 1
        for size in entry.shape:
            count *= size
        parameters += count
    summary: dict[str, Any] = {
        "path": str(checkpoint_iteration_dir(save_dir)),
        "iteration": _plain(state.get("iteration")),
        "checkpoint_version": _plain(state.get("checkpoint_version")),
        "trained_layout": {
            label: _plain(getattr(args, name, None)) for name, label in LAYOUT_ARGS.items()
        },
        "model": _pick(args, MODEL_ARGS),
        "moe": _pick(args, MOE_ARGS),
        "rectify": _pick(args, RECTIFY_ARGS),
        "converted_from": _plain(getattr(args, "converted_from", None)),
        "parameters": parameters,
        "has_optimizer_state": any(e.key.startswith("optimizer") for e in entries),
        "shards": check_shards(checkpoint_iteration_dir(save_dir), read_tensors=verify),
    }
    if with_tensors:
        summary["tensors"] = [
            {"key": e.key, "shape": list(e.shape), "dtype": e.dtype} for e in weights
        ]
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    lines = [
        f"checkpoint: {summary['path']}",
        f"iteration: {summary['iteration']}   checkpoint version: {summary['checkpoint_version']}",
        f"parameters: {summary['parameters']:,}   optimizer state: "
        f"{'yes' if summary['has_optimizer_state'] else 'no'}",
        "saved by a run with: "
        + ", ".join(f"{label} {value}" for label, value in summary["trained_layout"].items()),
        "(distributed checkpoint: loads under any TP/PP/EP layout)",
    ]
    shards = summary["shards"]
    if shards["problem"]:
        lines.append(f"shard files: BAD: {shards['problem']}")
    elif not shards["tensor_data_read"]:
        lines.append("shard files: sizes match the index; tensor data NOT read (--verify reads it)")
    else:
        lines.append(
            f"shard files: verified, every tensor read ({shards['tensors']} tensors, "
            f"{shards['bytes']:,} bytes)"
            + ("; SHA-256 manifest matches" if shards["manifest_checked"] else "")
        )
    if summary["converted_from"]:
        lines.append(f"converted from: {summary['converted_from']}")
    for section in ("model", "moe", "rectify"):
        lines.append(f"{section}:")
        lines += [f"  {name} = {value}" for name, value in summary[section].items()]
    if "tensors" in summary:
        lines.append(f"tensors ({len(summary['tensors'])}, global shapes):")
        width = max((len(t["key"]) for t in summary["tensors"]), default=0)
        lines += [
            f"  {t['key']:<{width}}  {str(tuple(t['shape'])):<20} {t['dtype']}"
            for t in summary["tensors"]
        ]
    return "\n".join(lines)


def check_shards(folder: str | os.PathLike, read_tensors: bool = False) -> dict[str, Any]:
    """The shard files of an iteration folder: their sizes against the index (cheap, always),
    and with ``read_tensors`` every tensor read (see ``integrity.verify_tensors``)."""
    import warnings

    from megatron.rectify.checkpoint.integrity import quick_check, verify_tensors

    if not read_tensors:
        problem = quick_check(folder)
        return {"tensor_data_read": False, "problem": str(problem) if problem else None}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.distributed.checkpoint's deprecation notices
        result = verify_tensors(folder)
    return {
        "tensor_data_read": True,
        "problem": str(result.problem) if result.problem else None,
        "tensors": result.tensors,
        "bytes": result.bytes,
        "manifest_checked": result.manifest_checked,
    }
