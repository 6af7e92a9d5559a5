"""A torch LayerNorm / RMSNorm that works under sequence parallelism, for the local spec.

Owns: one class. megatron's local spec falls back to ``WrappedTorchNorm`` when Apex is missing,
and that wrapper refuses ``--sequence-parallel``; MoE with TP > 1 requires sequence
parallelism, so without Apex (CPU development, GPU machines without Apex) TP + MoE could not run
on the local spec at all. A norm is per token, so it is correct on a sequence shard as it is;
what sequence parallelism needs is that its weight gradients, computed from different shards on
each TP rank, are summed over TP, which megatron's gradient finalisation does for parameters
marked ``sequence_parallel`` (as Apex's and TE's norms are).
"""

from __future__ import annotations

import torch
from megatron.core.transformer.transformer_config import TransformerConfig


class SequenceParallelTorchNorm:
    """Build ``torch.nn.LayerNorm`` / ``RMSNorm`` with SP-marked parameters (factory, like
    megatron's ``WrappedTorchNorm``, whose other checks it keeps)."""

    def __new__(
        cls,
        config: TransformerConfig,
        hidden_size: int,
        eps: float = 1e-5,
        persist_layer_norm: bool = False,
        zero_centered_gamma: bool = False,
        normalization: str = "LayerNorm",
    ) -> torch.nn.Module:
        if config.layernorm_zero_centered_gamma or config.memory_efficient_layer_norm:
            raise ValueError(
                "--apply-layernorm-1p / --memory-efficient-layer-norm need Apex or Transformer "
                "Engine norms; the torch norm does not implement them."
            )
        if config.normalization == "LayerNorm":
            norm = torch.nn.LayerNorm(hidden_size, eps=eps)
        elif config.normalization == "RMSNorm":
            norm = torch.nn.RMSNorm(hidden_size, eps=eps)
        else:
            raise ValueError(f"--normalization {config.normalization} is not supported here")
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm


def use_sequence_parallel_torch_norm(spec: object) -> object:
    """Swap megatron's ``WrappedTorchNorm`` for ``SequenceParallelTorchNorm`` in a layer or block
    spec (in place; other norms are left alone)."""
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    submodules = getattr(spec, "submodules", spec)
    for name in (
        "input_layernorm",
        "pre_cross_attn_layernorm",
        "pre_mlp_layernorm",
        "layer_norm",
        "enorm",  # a multi-token-prediction layer's norms
        "hnorm",
    ):
        if getattr(submodules, name, None) is WrappedTorchNorm:
            setattr(submodules, name, SequenceParallelTorchNorm)
    for layer_spec in getattr(submodules, "layer_specs", []) or []:
        use_sequence_parallel_torch_norm(layer_spec)
    inner_layer = getattr(submodules, "mtp_model_layer", None)  # an MTP layer's transformer layer
    if inner_layer is not None:
        use_sequence_parallel_torch_norm(inner_layer)
    return spec
