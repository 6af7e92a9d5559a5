"""Biases (megatron's default, no ``--disable-bias-linear``) on the local spec's experts.

megatron-core 0.19.2 crashed every local-spec MoE run with biases at EP = expert-TP = 1
("Output 0 of _ReduceFromModelParallelRegion is a view and is being modified inplace"): its
``MLP.forward`` adds an expert's bias in place to ``RowParallelLinear``'s output, a view at that
size. Our spec's ``ExpertRowParallelLinear`` avoids it (megatron/rectify/mlp.py). In-process
checks of the expert and the layer; the training runs are in tests/distributed/test_bias_e2e.py.
"""

from __future__ import annotations

import dataclasses
import functools

import moe_layer_cases as cases
import pytest
import torch
from megatron.core.tensor_parallel.layers import RowParallelLinear
from megatron.core.transformer.mlp import MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron.rectify.layer_specs import experts_with_bias_fix
from megatron.rectify.mlp import ExpertRowParallelLinear


def _config_with_bias():
    config = cases.make_config({"experts": 4, "topk": 1, "capacity_factor": 1.0}, 1)
    return dataclasses.replace(config, add_bias_linear=True)


def _random_biases(layer, seed: int = 3) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for expert in layer.experts.local_experts:
            for linear in (expert.linear_fc1, expert.linear_fc2):
                bias = torch.randn(linear.bias.shape, generator=gen) * 0.5
                linear.bias.copy_(bias.to(linear.bias))


# ---- in one process (EP = 1) --------------------------------------------------------------------


@pytest.mark.usefixtures("single_rank")
def test_megatron_local_spec_still_crashes_with_expert_biases_at_ep1() -> None:
    """Canary: when this fails, megatron fixed ``MLP.forward`` and our workaround can go."""
    layer = cases.build_layer(_config_with_bias(), "megatron")
    x, upstream = cases.rank_tokens(1)
    with pytest.raises(RuntimeError, match="is a view and is being modified inplace"):
        cases.run_layer(layer, x[0], upstream[0])


@pytest.mark.usefixtures("single_rank")
def test_expert_adds_its_bias_weighted_by_the_gate_and_back_propagates() -> None:
    layer = cases.build_layer(_config_with_bias())
    _random_biases(layer)
    expert = layer.experts.local_experts[0]
    assert type(expert.linear_fc2) is ExpertRowParallelLinear
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(10, cases.HIDDEN, generator=gen).to(cases.device())
    scale = torch.rand(10, generator=gen).to(cases.device())
    upstream = torch.randn(10, cases.HIDDEN, generator=gen).to(cases.device())

    x_layer = x.clone().requires_grad_()
    output, output_bias = expert(x_layer, scale)
    assert output_bias is None  # added to the output, scaled per token
    (output * upstream).sum().backward()

    params = {
        name: p.detach().clone().requires_grad_()
        for name, p in (
            ("w1", expert.linear_fc1.weight),
            ("b1", expert.linear_fc1.bias),
            ("w2", expert.linear_fc2.weight),
            ("b2", expert.linear_fc2.bias),
        )
    }
    x_ref = x.clone().requires_grad_()
    hidden = torch.nn.functional.gelu(x_ref @ params["w1"].t() + params["b1"]) * scale[:, None]
    reference = hidden @ params["w2"].t() + params["b2"] * scale[:, None]
    (reference * upstream).sum().backward()

    torch.testing.assert_close(output.detach(), reference.detach())
    torch.testing.assert_close(x_layer.grad, x_ref.grad)
    for name, linear, attr in (
        ("w1", expert.linear_fc1, "weight"),
        ("b1", expert.linear_fc1, "bias"),
        ("w2", expert.linear_fc2, "weight"),
        ("b2", expert.linear_fc2, "bias"),
    ):
        torch.testing.assert_close(cases._grad(getattr(linear, attr)), params[name].grad)


@pytest.mark.usefixtures("single_rank")
def test_rectified_layer_with_biases_runs_forward_and_backward_at_ep1() -> None:
    layer = cases.build_layer(_config_with_bias())
    _random_biases(layer)
    x, upstream = cases.rank_tokens(1)
    output, x_grad = cases.run_layer(layer, x[0], upstream[0])
    assert torch.isfinite(output).all() and torch.isfinite(x_grad).all()
    bias_grads = [cases._grad(e.linear_fc2.bias) for e in layer.experts.local_experts]
    assert all(torch.isfinite(g).all() for g in bias_grads)
    assert sum(g.abs().sum() for g in bias_grads) > 0


def test_only_the_local_row_parallel_linear_of_experts_is_replaced() -> None:
    class OtherLinear:  # stands in for Transformer Engine's linears
        pass

    local = MLPSubmodules(linear_fc1=object, linear_fc2=RowParallelLinear)
    for builder in (
        functools.partial(dict, submodules=local),
        ModuleSpec(module=dict, submodules=local),
    ):
        fixed = experts_with_bias_fix(builder)
        if isinstance(fixed, functools.partial):
            fixed_submodules = fixed.keywords["submodules"]
        else:
            fixed_submodules = fixed.submodules
        assert fixed_submodules.linear_fc2 is ExpertRowParallelLinear
        assert fixed_submodules.linear_fc1 is object
        assert local.linear_fc2 is RowParallelLinear  # the input spec is not modified
    other = functools.partial(dict, submodules=dataclasses.replace(local, linear_fc2=OtherLinear))
    assert experts_with_bias_fix(other) is other
    te_grouped = functools.partial(dict, submodules=object())
    assert experts_with_bias_fix(te_grouped) is te_grouped
