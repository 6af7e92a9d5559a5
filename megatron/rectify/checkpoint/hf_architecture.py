"""Hugging Face Llama / Mixtral ``config.json`` <-> the megatron flags of the same model.

Pure functions, no torch: which HF architectures we convert, what megatron flags build the
identical network, and the HF config that describes a megatron model on export. Anything we
cannot represent exactly is refused with the reason, because a silently different network
(another RoPE scaling, a bias, a sliding window) converts "fine" and then generates garbage.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

from megatron.rectify.checkpoint.errors import CheckpointToolError
from megatron.rectify.choices import mode_rectifies

DENSE_MODEL_TYPES = ("llama", "mistral")
MOE_MODEL_TYPES = ("mixtral",)


@dataclass(frozen=True)
class Architecture:
    """The shape of a Llama-family decoder (dense or Mixtral MoE), in neutral names."""

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    rope_theta: float
    norm_epsilon: float
    tie_word_embeddings: bool
    num_experts: int | None = None  # None: dense
    topk: int | None = None

    @property
    def is_moe(self) -> bool:
        return self.num_experts is not None


def _rope_theta(config: dict[str, Any]) -> float:
    """transformers 5 nests RoPE settings in ``rope_parameters``; 4.x and the Hub use top-level
    ``rope_theta`` / ``rope_scaling``."""
    parameters = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or {}
    for key, value in (("rope_parameters", parameters), ("rope_scaling", scaling)):
        if not isinstance(value, dict):
            raise CheckpointToolError(f"config.json has {key}={value!r}: it must be an object")
    for rope_type in (
        parameters.get("rope_type"),
        scaling.get("rope_type"),
        scaling.get("type"),
    ):
        if rope_type not in (None, "default"):
            raise CheckpointToolError(
                f"RoPE scaling '{rope_type}' is not supported (only plain RoPE converts "
                "exactly); convert a model without rope_scaling."
            )
    theta = parameters.get("rope_theta", config.get("rope_theta"))
    if theta is None:
        return 10000.0
    if isinstance(theta, bool) or not isinstance(theta, int | float) or theta <= 0:
        raise CheckpointToolError(f"config.json has rope_theta={theta!r}: it must be a number")
    return float(theta)


def architecture_from_hf_config(config: dict[str, Any]) -> Architecture:
    """Read a Llama / Mistral / Mixtral ``config.json``; refuse what would convert inexactly."""
    model_type = config.get("model_type")
    if model_type not in DENSE_MODEL_TYPES + MOE_MODEL_TYPES:
        raise CheckpointToolError(
            f"unsupported Hugging Face architecture model_type={model_type!r} "
            f"(architectures={config.get('architectures')}): supported are "
            f"{', '.join(DENSE_MODEL_TYPES + MOE_MODEL_TYPES)}."
        )
    unsupported = {
        "hidden_act": (config.get("hidden_act", "silu") != "silu", "must be silu (SwiGLU)"),
        "attention_bias": (bool(config.get("attention_bias")), "biases are not converted"),
        "mlp_bias": (bool(config.get("mlp_bias")), "biases are not converted"),
        "sliding_window": (
            config.get("sliding_window") is not None and config.get("use_sliding_window", True),
            "sliding-window attention is not supported",
        ),
    }
    for name, (bad, why) in unsupported.items():
        if bad:
            raise CheckpointToolError(
                f"{model_type} config has {name}={config.get(name)!r}: {why}."
            )
    heads = _count(config, "num_attention_heads")
    hidden = _count(config, "hidden_size")
    is_moe = model_type in MOE_MODEL_TYPES
    return Architecture(
        num_layers=_count(config, "num_hidden_layers"),
        hidden_size=hidden,
        ffn_hidden_size=_count(config, "intermediate_size"),
        num_attention_heads=heads,
        num_query_groups=_count(config, "num_key_value_heads", heads),
        head_dim=_count(config, "head_dim", hidden // heads),
        vocab_size=_count(config, "vocab_size"),
        max_position_embeddings=_count(config, "max_position_embeddings", 4096),
        rope_theta=_rope_theta(config),
        norm_epsilon=_number(config, "rms_norm_eps", 1e-6),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        num_experts=_count(config, "num_local_experts") if is_moe else None,
        topk=_count(config, "num_experts_per_tok") if is_moe else None,
    )


def _count(config: dict[str, Any], key: str, default: int | None = None) -> int:
    """A positive whole number of ``config.json`` (``default`` when absent or null)."""
    value = config.get(key)
    if value is None and default is not None:
        return default
    if value is None:
        raise CheckpointToolError(
            f"config.json has no {key!r}: a {config.get('model_type')} config needs it"
        )
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise CheckpointToolError(
            f"config.json has {key}={value!r}: it must be a positive whole number"
        )
    return value


def _number(config: dict[str, Any], key: str, default: float) -> float:
    value = config.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise CheckpointToolError(f"config.json has {key}={value!r}: it must be a number")
    return float(value)


def megatron_model_flags(arch: Architecture) -> list[str]:
    """The ``pretrain_gpt_rectify.py`` flags that build exactly this network (the decoder; the
    MoE flags for Mixtral; the user adds routing/rectify/capacity and training flags)."""
    flags = [
        "--num-layers", str(arch.num_layers),
        "--hidden-size", str(arch.hidden_size),
        "--ffn-hidden-size", str(arch.ffn_hidden_size),
        "--num-attention-heads", str(arch.num_attention_heads),
        "--kv-channels", str(arch.head_dim),
        "--max-position-embeddings", str(arch.max_position_embeddings),
        "--position-embedding-type", "rope",
        "--rotary-base", _format_number(arch.rope_theta),
        "--normalization", "RMSNorm",
        "--norm-epsilon", repr(arch.norm_epsilon),
        "--swiglu",
        "--disable-bias-linear",
        "--attention-dropout", "0.0",
        "--hidden-dropout", "0.0",
    ]  # fmt: skip
    if arch.num_query_groups != arch.num_attention_heads:
        flags += ["--group-query-attention", "--num-query-groups", str(arch.num_query_groups)]
    if not arch.tie_word_embeddings:
        flags.append("--untie-embeddings-and-output-weights")
    if arch.is_moe:
        flags += [
            "--num-experts", str(arch.num_experts),
            "--moe-router-topk", str(arch.topk),
            "--moe-ffn-hidden-size", str(arch.ffn_hidden_size),
        ]  # fmt: skip
    return flags


def _format_number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(value)


def architecture_from_megatron_args(args: argparse.Namespace, vocab_size: int) -> Architecture:
    """The architecture a megatron checkpoint's saved args describe; refuse what HF's Llama /
    Mixtral classes cannot express."""
    checks = {
        "--swiglu": getattr(args, "swiglu", False),
        "--normalization RMSNorm": getattr(args, "normalization", None) == "RMSNorm",
        "--position-embedding-type rope": getattr(args, "position_embedding_type", None) == "rope",
        "--disable-bias-linear": not getattr(args, "add_bias_linear", True),
        "no --add-qkv-bias": not getattr(args, "add_qkv_bias", False),
        "no --qk-layernorm": not getattr(args, "qk_layernorm", False),
        "--rotary-percent 1.0": float(getattr(args, "rotary_percent", 1.0)) == 1.0,
        "no --rotary-interleaved": not getattr(args, "rotary_interleaved", False),
        "no --moe-shared-expert-intermediate-size": not getattr(
            args, "moe_shared_expert_intermediate_size", None
        ),
        "--moe-router-score-function softmax": getattr(args, "moe_router_score_function", "softmax")
        == "softmax",
        # rectified gate weights are renormalised over the chosen experts, as Mixtral's are;
        # megatron's plain pre-softmax weights are raw probabilities
        "--moe-rectify (or no --moe-router-pre-softmax)": not getattr(
            args, "moe_router_pre_softmax", False
        )
        or mode_rectifies(getattr(args, "moe_rectify", "none")),
        "no --apply-layernorm-1p": not getattr(args, "apply_layernorm_1p", False),
        "no --moe-router-topk-scaling-factor": getattr(args, "moe_router_topk_scaling_factor", None)
        in (None, 1.0),
        "no --moe-router-enable-expert-bias": not getattr(
            args, "moe_router_enable_expert_bias", False
        ),
    }
    missing = [flag for flag, ok in checks.items() if not ok]
    if missing:
        raise CheckpointToolError(
            "this megatron model has no Hugging Face Llama/Mixtral equivalent; it would need "
            f"{', '.join(missing)}."
        )
    num_experts = getattr(args, "num_experts", None)
    if num_experts:
        frequency = getattr(args, "moe_layer_freq", 1)
        if frequency not in (1, [1] * args.num_layers):
            raise CheckpointToolError(
                f"--moe-layer-freq {frequency}: Mixtral has an MoE block in every layer; export "
                "needs a model trained with --moe-layer-freq 1."
            )
        moe_ffn = args.moe_ffn_hidden_size or args.ffn_hidden_size
    heads = args.num_attention_heads
    return Architecture(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        ffn_hidden_size=moe_ffn if num_experts else args.ffn_hidden_size,
        num_attention_heads=heads,
        num_query_groups=args.num_query_groups if args.group_query_attention else heads,
        head_dim=args.kv_channels or args.hidden_size // heads,
        vocab_size=vocab_size,
        max_position_embeddings=args.max_position_embeddings,
        rope_theta=float(args.rotary_base),
        norm_epsilon=float(args.layernorm_epsilon),
        tie_word_embeddings=not args.untie_embeddings_and_output_weights,
        num_experts=num_experts or None,
        topk=args.moe_router_topk if num_experts else None,
    )


def hf_config_from_architecture(arch: Architecture, dtype: str) -> dict[str, Any]:
    """A ``config.json`` for ``MixtralForCausalLM`` (MoE) or ``LlamaForCausalLM`` (dense), in
    the Hub's format (top-level ``rope_theta``), readable by transformers 4.x and 5.x."""
    config: dict[str, Any] = {
        "architectures": ["MixtralForCausalLM" if arch.is_moe else "LlamaForCausalLM"],
        "model_type": "mixtral" if arch.is_moe else "llama",
        "hidden_act": "silu",
        "hidden_size": arch.hidden_size,
        "intermediate_size": arch.ffn_hidden_size,
        "num_hidden_layers": arch.num_layers,
        "num_attention_heads": arch.num_attention_heads,
        "num_key_value_heads": arch.num_query_groups,
        "head_dim": arch.head_dim,
        "vocab_size": arch.vocab_size,
        "max_position_embeddings": arch.max_position_embeddings,
        "rope_theta": arch.rope_theta,
        "rms_norm_eps": arch.norm_epsilon,
        "tie_word_embeddings": arch.tie_word_embeddings,
        "attention_dropout": 0.0,
        "torch_dtype": dtype,
        "use_cache": True,
    }
    if arch.is_moe:
        config.update(
            num_local_experts=arch.num_experts,
            num_experts_per_tok=arch.topk,
            sliding_window=None,
            output_router_logits=False,
        )
    else:
        config.update(attention_bias=False, mlp_bias=False)
    return config
