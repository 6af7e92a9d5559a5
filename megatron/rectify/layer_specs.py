"""Rectified GPT layer specs: megatron's specs with ``RectifyMoELayer`` + ``RectifyRouter``.

Owns: taking megatron's own local / Transformer-Engine layer and decoder-block specs and
swapping their MoE module for the rectified one. Everything else in the spec (attention, norms,
dense MLP layers, ``moe_layer_freq``) stays megatron's, except the local spec's expert
``linear_fc2``, replaced by ``ExpertRowParallelLinear`` so that biases work at EP = 1 (see
``megatron/rectify/mlp.py``). Importable for ``--spec``:
``--spec megatron.rectify.layer_specs get_gpt_layer_local_spec_rectify``.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from typing import Any

from megatron.core.models.gpt import gpt_layer_specs
from megatron.core.tensor_parallel.layers import RowParallelLinear
from megatron.core.transformer.mlp import MLPSubmodules
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron.rectify.mlp import ExpertRowParallelLinear
from megatron.rectify.moe_layer import RectifyMoELayer
from megatron.rectify.router import RectifyRouter


def replace_moe_classes(mlp: Any, layer_class: type, router_class: type) -> Any:
    """An MoE builder (``partial(MoELayer, submodules=...)`` or a ``ModuleSpec``) with its layer
    and router classes swapped and the local experts' ``linear_fc2`` fixed for biases
    (``experts_with_bias_fix``), everything else (shared experts, arguments) kept.

    Anything that is not an MoE builder (a dense MLP spec) is returned unchanged, so a whole
    decoder-block spec can be passed through layer by layer.
    """
    if isinstance(mlp, functools.partial) and isinstance(mlp.func, type):
        if issubclass(mlp.func, MoELayer) and "submodules" in mlp.keywords:
            submodules = _moe_submodules(mlp.keywords["submodules"], router_class)
            keywords = {**mlp.keywords, "submodules": submodules}
            return functools.partial(layer_class, *mlp.args, **keywords)
    if isinstance(mlp, ModuleSpec) and isinstance(mlp.module, type):
        if issubclass(mlp.module, MoELayer):
            spec = copy.copy(mlp)
            spec.module = layer_class
            spec.submodules = _moe_submodules(mlp.submodules, router_class)
            return spec
    return mlp


def _moe_submodules(submodules: Any, router_class: type) -> Any:
    return dataclasses.replace(
        submodules, router=router_class, experts=experts_with_bias_fix(submodules.experts)
    )


def experts_with_bias_fix(experts: Any) -> Any:
    """An experts builder whose ``linear_fc2``, if megatron's local ``RowParallelLinear``, is
    ``ExpertRowParallelLinear``: megatron-core 0.19.2's ``MLP.forward`` adds an expert's bias
    in place to that layer's output, which at expert-TP = EP = 1 is an autograd view and crashes
    (megatron/rectify/mlp.py). Other builders (Transformer Engine experts) are returned as they
    are."""
    if isinstance(experts, functools.partial):
        submodules = experts.keywords.get("submodules")
    elif isinstance(experts, ModuleSpec):
        submodules = experts.submodules
    else:
        return experts
    if not isinstance(submodules, MLPSubmodules) or submodules.linear_fc2 is not RowParallelLinear:
        return experts
    submodules = dataclasses.replace(submodules, linear_fc2=ExpertRowParallelLinear)
    if isinstance(experts, functools.partial):
        return functools.partial(
            experts.func, *experts.args, **{**experts.keywords, "submodules": submodules}
        )
    spec = copy.copy(experts)
    spec.submodules = submodules
    return spec


def rectify_mlp_builder(mlp: Any) -> Any:
    """An MoE builder -> the rectified one (dense MLP specs unchanged)."""
    return replace_moe_classes(mlp, RectifyMoELayer, RectifyRouter)


def rectify_layer_spec(layer_spec: ModuleSpec) -> ModuleSpec:
    """A transformer-layer spec with its MoE MLP rectified (dense layers untouched)."""
    spec = copy.copy(layer_spec)
    mlp = rectify_mlp_builder(layer_spec.submodules.mlp)
    keys_map = layer_spec.submodules.sharded_state_dict_keys_map
    if mlp is not layer_spec.submodules.mlp:
        keys_map = moe_layer_checkpoint_keys(keys_map)
    spec.submodules = dataclasses.replace(
        layer_spec.submodules, mlp=mlp, sharded_state_dict_keys_map=keys_map
    )
    return spec


def moe_layer_checkpoint_keys(keys_map: dict[str, str]) -> dict[str, str]:
    """Checkpoint names of an MoE layer of the local spec, made equal to the TE spec's.

    megatron's local spec saves ``pre_mlp_layernorm`` under the name of TE's fused
    ``mlp.linear_fc1.layer_norm_weight`` so that dense local and TE checkpoints are
    interchangeable; but in an MoE layer the TE spec keeps a separate ``pre_mlp_layernorm``, so
    megatron's rename makes local-spec MoE checkpoints unloadable by TE runs. Without the rename,
    a checkpoint written on the CPU (local spec: the conversion tools) loads in a TE training run.
    """
    return {old: new for old, new in keys_map.items() if old != "pre_mlp_layernorm."}


def get_gpt_layer_local_spec_rectify(*args: Any, **kwargs: Any) -> ModuleSpec:
    """megatron's ``get_gpt_layer_local_spec`` (plain torch / Apex), rectified."""
    return rectify_layer_spec(gpt_layer_specs.get_gpt_layer_local_spec(*args, **kwargs))


def get_gpt_layer_with_transformer_engine_spec_rectify(*args: Any, **kwargs: Any) -> ModuleSpec:
    """megatron's Transformer-Engine layer spec (grouped GEMM experts), rectified."""
    return rectify_layer_spec(
        gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(*args, **kwargs)
    )


def get_gpt_decoder_block_spec_rectify(
    config: TransformerConfig, use_transformer_engine: bool, **kwargs: Any
) -> TransformerBlockSubmodules:
    """megatron's decoder-block spec (which honours ``moe_layer_freq``), rectified."""
    block = gpt_layer_specs.get_gpt_decoder_block_spec(config, use_transformer_engine, **kwargs)
    return dataclasses.replace(
        block, layer_specs=[rectify_layer_spec(spec) for spec in block.layer_specs]
    )
