"""``--recompute-granularity selective --recompute-modules moe`` on the rectified layer.

megatron checkpoints the whole ``MoELayer.forward`` (route -> preprocess -> dispatch -> experts ->
combine): the first pass runs without autograd and the backward pass runs it again. The
rectified layer keeps state between its steps (the router's decision handed from ``route`` to
``preprocess``, the dispatcher's intra-GPU side batch), so the recomputed pass must rebuild all
of it from its own input: reusing the decision of the last forward call would compute the wrong
tokens' IR rows. A pipeline schedule runs several forward calls before the first backward, which
is what these tests do.
"""

from __future__ import annotations

import dataclasses

import moe_layer_cases as cases
import pytest
import torch

pytestmark = pytest.mark.usefixtures("single_rank")

#: top-1, capacity 0.75: tokens are dropped (and filled in / rectified) on every call.
CASE = {"experts": 4, "topk": 1, "capacity_factor": 0.75}
MODES = ["ir+fr", "ir", "fr"]


def _layer(recompute: bool, mode: str = "ir+fr"):
    config = cases.make_config({**CASE, "mode": mode}, 1)
    if recompute:
        config = dataclasses.replace(
            config, recompute_granularity="selective", recompute_modules=["moe"]
        )
    layer = cases.build_layer(config)
    cases.load_global_weights(layer, cases.global_weights(CASE["experts"]))
    assert layer.moe_layer_recompute is recompute
    return layer


def _grads(layer) -> dict[str, torch.Tensor]:
    grads = cases.summed_expert_grads(layer, CASE["experts"])
    return {name: grad.clone() for name, grad in grads.items()}


@pytest.mark.parametrize("mode", MODES)
def test_recomputed_moe_layer_reroutes_each_call_and_matches_the_plain_layer(mode: str) -> None:
    """Two calls forwarded before either backward (recompute on) give the outputs, input grads,
    weight grads and routing statistics of the same two calls run one by one without
    recompute. The two calls route differently (asserted), so a recomputed pass that reused
    another call's decision could not match."""
    x, upstream = cases.rank_tokens(2)  # two calls' inputs and output gradients, [2, T, H]

    plain = _layer(recompute=False, mode=mode)
    expected_outputs, expected_x_grads, expected_grads, decisions = [], [], [], []
    for call in range(2):
        output, x_grad = cases.run_layer(plain, x[call], upstream[call])
        decisions.append(plain.router.last_output.decision)
        expected_outputs.append(output)
        expected_x_grads.append(x_grad)
        expected_grads.append(_grads(plain))  # accumulated: call 0, then calls 0 + 1
    assert not torch.equal(decisions[0].routing_map, decisions[1].routing_map)
    if "ir" in mode:
        assert decisions[0].ir_expert.ne(-1).any() and decisions[1].ir_expert.ne(-1).any()
        assert not torch.equal(decisions[0].ir_expert, decisions[1].ir_expert)
    if "fr" in mode:
        assert decisions[0].fill_in_map.any() and decisions[1].fill_in_map.any()

    recomputed = _layer(recompute=True, mode=mode)
    inputs = [x[call].clone().unsqueeze(1).requires_grad_() for call in range(2)]
    outputs = [recomputed(inputs[call])[0] for call in range(2)]  # both forwards first
    for call in (0, 1):
        torch.testing.assert_close(outputs[call].detach().squeeze(1), expected_outputs[call])
    for call in (0, 1):  # then the backwards, oldest first (1F1B order)
        (outputs[call].squeeze(1) * upstream[call]).sum().backward()
        torch.testing.assert_close(inputs[call].grad.squeeze(1), expected_x_grads[call])
        for name, grad in _grads(recomputed).items():
            torch.testing.assert_close(grad, expected_grads[call][name], msg=name)
    # Statistics count each training call once: in the recomputed pass (the first one runs
    # without autograd, which the layer does not count as training).
    assert recomputed.cumulative_statistics.keys() == plain.cumulative_statistics.keys()
    for name, total in plain.cumulative_statistics.items():
        assert torch.equal(
            torch.as_tensor(recomputed.cumulative_statistics[name]), torch.as_tensor(total)
        ), name


def test_recomputed_pass_runs_the_router_again() -> None:
    """The backward pass routes again (a fresh decision object for each recomputed call), so
    nothing from the first pass is carried over to it."""
    layer = _layer(recompute=True)
    x, upstream = cases.rank_tokens(1)
    seen = []
    forward = layer.router.forward

    def counting_forward(*args, **kwargs):
        output = forward(*args, **kwargs)
        seen.append(output.decision)
        return output

    layer.router.forward = counting_forward
    hidden = x[0].clone().unsqueeze(1).requires_grad_()
    output, _ = layer(hidden)
    assert len(seen) == 1
    (output.squeeze(1) * upstream[0]).sum().backward()
    assert len(seen) == 2 and seen[1] is not seen[0]
    assert torch.equal(seen[0].routing_map, seen[1].routing_map)
    assert layer._decision_for_preprocess is None
