"""Tensor-by-tensor mapping between Hugging Face Llama / Mixtral weights and the megatron GPT.

Pure tensor code (no megatron, no files). The megatron side is the *unsharded* state dict of
the local layer spec (one rank, TP = PP = EP = 1): distributed checkpointing turns it into any
parallel layout on save and load, so the mapping never deals with shards.

The two layout differences that matter:
* megatron fuses Q, K, V into one ``linear_qkv`` whose rows are grouped per key/value head:
  ``[q heads of group 0, k_0, v_0, q heads of group 1, k_1, v_1, ...]``;
* megatron's SwiGLU ``linear_fc1`` is ``[gate; up]`` (HF ``gate_proj``/``w1`` then
  ``up_proj``/``w3``) and ``linear_fc2`` is ``down_proj``/``w2``.
RoPE needs no permutation: HF's Llama layout (rotate-half) is megatron's non-interleaved RoPE.
The vocabulary is padded with zero rows on import (megatron pads it to a multiple of
``--make-vocab-size-divisible-by`` x TP) and cropped back on export.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator

import torch

from megatron.rectify.checkpoint.errors import CheckpointToolError
from megatron.rectify.checkpoint.hf_architecture import Architecture

ReadHF = Callable[[str], torch.Tensor]

_LAYER = re.compile(r"decoder\.layers\.(\d+)\.(.+)")
_EXPERT = re.compile(r"mlp\.experts\.local_experts\.(\d+)\.(linear_fc[12])\.weight")


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, arch: Architecture) -> torch.Tensor:
    """HF ``q_proj``/``k_proj``/``v_proj`` -> megatron's grouped ``linear_qkv``."""
    groups, head_dim, hidden = arch.num_query_groups, arch.head_dim, q.shape[1]
    per_group = arch.num_attention_heads // groups
    q = q.reshape(groups, per_group * head_dim, hidden)
    k = k.reshape(groups, head_dim, hidden)
    v = v.reshape(groups, head_dim, hidden)
    return torch.cat([q, k, v], dim=1).reshape(-1, hidden)


def split_qkv(
    qkv: torch.Tensor, arch: Architecture
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """megatron's ``linear_qkv`` -> HF ``q_proj``, ``k_proj``, ``v_proj`` (inverse of fuse)."""
    groups, head_dim, hidden = arch.num_query_groups, arch.head_dim, qkv.shape[1]
    per_group = arch.num_attention_heads // groups
    grouped = qkv.reshape(groups, (per_group + 2) * head_dim, hidden)
    q, k, v = grouped.split([per_group * head_dim, head_dim, head_dim], dim=1)
    return q.reshape(-1, hidden), k.reshape(-1, hidden), v.reshape(-1, hidden)


def pad_vocab(weight: torch.Tensor, rows: int) -> torch.Tensor:
    if weight.shape[0] > rows:
        raise CheckpointToolError(
            f"the vocabulary ({weight.shape[0]}) is larger than the megatron embedding ({rows})"
        )
    padding = weight.new_zeros(rows - weight.shape[0], weight.shape[1])
    return torch.cat([weight, padding])


def megatron_tensor_from_hf(
    name: str, arch: Architecture, read: ReadHF, padded_vocab_size: int, upcycle: bool = False
) -> torch.Tensor | None:
    """The value of megatron parameter ``name`` built from the HF tensors ``read`` returns.

    ``upcycle``: the HF model is dense and the megatron model MoE: every expert is a copy of the
    layer's dense FFN, and routers return None (the caller keeps megatron's initialisation).
    Raises on a name this mapping does not know, so no parameter is ever left unconverted.
    """
    if name == "embedding.word_embeddings.weight":
        return pad_vocab(read("model.embed_tokens.weight"), padded_vocab_size)
    if name == "output_layer.weight":
        head = "model.embed_tokens.weight" if arch.tie_word_embeddings else "lm_head.weight"
        return pad_vocab(read(head), padded_vocab_size)
    if name == "decoder.final_layernorm.weight":
        return read("model.norm.weight")
    match = _LAYER.fullmatch(name)
    if match is None:
        raise CheckpointToolError(f"no Hugging Face source for megatron parameter {name}")
    layer, rest = int(match.group(1)), match.group(2)
    hf = f"model.layers.{layer}"
    if rest == "input_layernorm.weight":
        return read(f"{hf}.input_layernorm.weight")
    if rest == "pre_mlp_layernorm.weight":
        return read(f"{hf}.post_attention_layernorm.weight")
    if rest == "self_attention.linear_qkv.weight":
        q, k, v = (read(f"{hf}.self_attn.{p}_proj.weight") for p in "qkv")
        return fuse_qkv(q, k, v, arch)
    if rest == "self_attention.linear_proj.weight":
        return read(f"{hf}.self_attn.o_proj.weight")
    if rest == "mlp.linear_fc1.weight":
        return torch.cat([read(f"{hf}.mlp.gate_proj.weight"), read(f"{hf}.mlp.up_proj.weight")])
    if rest == "mlp.linear_fc2.weight":
        return read(f"{hf}.mlp.down_proj.weight")
    if rest == "mlp.router.weight":
        return None if upcycle else read(f"{hf}.block_sparse_moe.gate.weight")
    expert = _EXPERT.fullmatch(rest)
    if expert is not None:
        index, which = int(expert.group(1)), expert.group(2)
        if upcycle:
            dense_rest = f"mlp.{which}.weight"
            return megatron_tensor_from_hf(
                f"decoder.layers.{layer}.{dense_rest}", arch, read, padded_vocab_size
            )
        source = f"{hf}.block_sparse_moe.experts.{index}"
        if which == "linear_fc1":
            return torch.cat([read(f"{source}.w1.weight"), read(f"{source}.w3.weight")])
        return read(f"{source}.w2.weight")
    raise CheckpointToolError(f"no Hugging Face source for megatron parameter {name}")


def hf_tensors_from_megatron(
    state: dict[str, torch.Tensor], arch: Architecture
) -> Iterator[tuple[str, torch.Tensor]]:
    """HF (Hub-format) tensors of the megatron state dict ``state``, layer by layer. Every
    megatron tensor must be consumed: one left over means a parameter HF cannot hold."""
    used: set[str] = set()

    def take(name: str) -> torch.Tensor:
        if name not in state:
            raise CheckpointToolError(f"the megatron checkpoint has no {name}")
        used.add(name)
        return state[name]

    vocab = arch.vocab_size
    yield "model.embed_tokens.weight", take("embedding.word_embeddings.weight")[:vocab]
    if not arch.tie_word_embeddings:
        yield "lm_head.weight", take("output_layer.weight")[:vocab]
    yield "model.norm.weight", take("decoder.final_layernorm.weight")
    for layer in range(arch.num_layers):
        mg, hf = f"decoder.layers.{layer}", f"model.layers.{layer}"
        yield f"{hf}.input_layernorm.weight", take(f"{mg}.input_layernorm.weight")
        q, k, v = split_qkv(take(f"{mg}.self_attention.linear_qkv.weight"), arch)
        yield f"{hf}.self_attn.q_proj.weight", q
        yield f"{hf}.self_attn.k_proj.weight", k
        yield f"{hf}.self_attn.v_proj.weight", v
        yield f"{hf}.self_attn.o_proj.weight", take(f"{mg}.self_attention.linear_proj.weight")
        yield f"{hf}.post_attention_layernorm.weight", take(f"{mg}.pre_mlp_layernorm.weight")
        if arch.is_moe:
            moe = f"{hf}.block_sparse_moe"
            yield f"{moe}.gate.weight", take(f"{mg}.mlp.router.weight")
            for e in range(arch.num_experts or 0):
                experts = f"{mg}.mlp.experts.local_experts.{e}"
                gate, up = take(f"{experts}.linear_fc1.weight").chunk(2)
                yield f"{moe}.experts.{e}.w1.weight", gate
                yield f"{moe}.experts.{e}.w3.weight", up
                yield f"{moe}.experts.{e}.w2.weight", take(f"{experts}.linear_fc2.weight")
        else:
            gate, up = take(f"{mg}.mlp.linear_fc1.weight").chunk(2)
            yield f"{hf}.mlp.gate_proj.weight", gate
            yield f"{hf}.mlp.up_proj.weight", up
            yield f"{hf}.mlp.down_proj.weight", take(f"{mg}.mlp.linear_fc2.weight")
    left_over = sorted(set(state) - used)
    if left_over:
        raise CheckpointToolError(
            f"megatron parameters with no Hugging Face counterpart: {left_over[:5]}"
        )
