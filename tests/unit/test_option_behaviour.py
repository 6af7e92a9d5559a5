"""What the decisions of ``megatron/rectify/training/option_checks.py`` rest on, run on the CPU
(``tests/unit/test_option_checks.py`` holds the flag checks themselves).

* ``--moe-permute-fusion``: megatron's dispatcher on Transformer Engine's fused permute /
  unpermute / chunk sort, here CPU stand-ins of TE's packing, gives the experts the same inputs
  as its unfused path for rectified maps (FR, IR+FR; padded and unpadded). The IR side batch
  never goes through megatron's permute.
* ``--moe-router-fusion``: with the fused kernels replaced by unfused stand-ins that record
  their calls, the flag reaches the aux-loss kernels, the rectified decision never calls TE's
  fused top-k, and decisions and gradients equal those without the flag.
* CUDA graphs: a replay of the router (megatron's own ``transformer_engine`` path: the router's
  outputs come from ``cudagraph_tensor_store`` and ``route`` is skipped) routes FR correctly
  even when the layer holds a stale decision from another call. IR refuses to guess. FR adds
  no host sync in its own code, padded (``test_bench_syncs.py``) or not (here). The end-of-run
  totals are device tensors added in place, so a replay updates them.
* ``--overlap-moe-expert-parallel-comm``: megatron's fine-grained schedule plan for one
  transformer layer (its real nodes and detach points) runs FR bit-identically to the plain
  layer; IR breaks its node split.
* ``--moe-router-padding-for-quantization``: megatron's map padding keeps an unpadded FR map
  correct (zero-weight pairs), and corrupts a map padded to capacity.
"""

from __future__ import annotations

import dataclasses
import sys
import types
from pathlib import Path

import pytest
import torch
from megatron.core.transformer.moe import moe_utils
from megatron.core.transformer.moe.moe_utils import (
    get_capacity,
    pad_routing_map,
    permute,
    unpermute,
)
from test_pad_contract import fused_permute_emulation

from megatron.rectify.config import RectifyOptions, RectifyTransformerConfig
from megatron.rectify.routing import rectified_routing

REPO = Path(__file__).resolve().parents[2]


def _case(mode: str, pad: bool, topk: int = 2) -> dict:
    return {"experts": 4, "topk": topk, "mode": mode, "pad": pad}


def _layer(case: dict, **config_overrides):
    """The rectified MoE layer (local spec, EP = 1) with the cases' global weights."""
    import moe_layer_cases as cases

    config = cases.make_config(case, 1)
    if config_overrides:
        config = dataclasses.replace(config, **config_overrides)
    layer = cases.build_layer(config)
    cases.load_global_weights(layer, cases.global_weights(case["experts"]))
    return layer


def _grads(layer) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in layer.named_parameters() if p.grad is not None}


# ---- permute fusion ----------------------------------------------------------------------------


def _te_permute_with_probs(tokens, probs, routing_map, num_out_tokens=None):
    """``fused_permute_with_probs`` on the CPU: TE's mask-map packing (columns back to back,
    token order within a column; ``test_pad_contract.fused_permute_emulation``)."""
    num_out = int(routing_map.sum()) if num_out_tokens is None else int(num_out_tokens)
    return fused_permute_emulation(tokens, routing_map, probs, num_out)


def _te_unpermute(permuted_tokens, row_id_map, merging_probs=None, restore_shape=None, **_):
    """``fused_unpermute`` on the CPU: every pair's row summed back into its token."""
    kept = (row_id_map >= 0) & (row_id_map < permuted_tokens.shape[0])
    token, expert = kept.nonzero(as_tuple=True)
    rows = permuted_tokens.index_select(0, row_id_map[token, expert])
    if merging_probs is not None:
        rows = rows * merging_probs[token, expert].unsqueeze(1).to(rows.dtype)
    output = torch.zeros(restore_shape, dtype=permuted_tokens.dtype)
    return output.index_add(0, token, rows)


def _te_sort_chunks(input, split_sizes, sorted_idxs):
    chunks = input.split([int(n) for n in split_sizes.tolist()])
    return torch.cat([chunks[i] for i in sorted_idxs.tolist()])


def _te_sort_chunks_with_probs(input, probs, split_sizes, sorted_idxs):
    return (
        _te_sort_chunks(input, split_sizes, sorted_idxs),
        _te_sort_chunks(probs, split_sizes, sorted_idxs),
    )


@pytest.fixture
def te_permute_stand_ins(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """TE's fused permutation kernels as CPU stand-ins in megatron's ``moe_utils``; returns
    the number of calls of each."""
    calls = {"permute": 0, "unpermute": 0, "sort": 0}

    def counted(name, function):
        def run(*args, **kwargs):
            calls[name] += 1
            return function(*args, **kwargs)

        return run

    def unused(*args, **kwargs):
        raise AssertionError("megatron's dispatcher always permutes with probs")

    monkeypatch.setattr(moe_utils, "HAVE_TE", True)
    monkeypatch.setattr(moe_utils, "fused_permute", unused)
    monkeypatch.setattr(moe_utils, "fused_permute_and_pad_with_probs", None)
    monkeypatch.setattr(
        moe_utils, "fused_permute_with_probs", counted("permute", _te_permute_with_probs)
    )
    monkeypatch.setattr(moe_utils, "fused_unpermute", counted("unpermute", _te_unpermute))
    monkeypatch.setattr(moe_utils, "fused_sort_chunks_by_index", counted("sort", _te_sort_chunks))
    monkeypatch.setattr(
        moe_utils,
        "fused_sort_chunks_by_index_with_probs",
        counted("sort", _te_sort_chunks_with_probs),
    )
    return calls


def _run_recording_expert_inputs(layer):
    import moe_layer_cases as cases

    seen = []
    forward = layer.experts.forward

    def recording(tokens, tokens_per_expert, probs, *args, **kwargs):
        seen.append((tokens.detach().clone(), tokens_per_expert.clone(), probs.detach().clone()))
        return forward(tokens, tokens_per_expert, probs, *args, **kwargs)

    layer.experts.forward = recording
    x, upstream = cases.rank_tokens(1)
    output, x_grad = cases.run_layer(layer, x[0], upstream[0])
    ((tokens, tokens_per_expert, probs),) = seen
    return {
        "expert tokens": tokens,
        "tokens per expert": tokens_per_expert,
        "expert probs": probs,
        "output": output,
        "x grad": x_grad,
        **_grads(layer),
    }


@pytest.mark.usefixtures("single_rank")
@pytest.mark.parametrize("pad", [True, False], ids=["padded", "unpadded"])
@pytest.mark.parametrize("mode", ["fr", "ir", "ir+fr"])
def test_fused_permutation_gives_the_experts_the_same_inputs(
    te_permute_stand_ins: dict[str, int], mode: str, pad: bool
) -> None:
    """megatron's dispatcher with ``--moe-permute-fusion`` (TE's packing, on the CPU) and
    without it: the same expert inputs (IR rows included), outputs and gradients."""
    unfused = _run_recording_expert_inputs(_layer(_case(mode, pad)))
    assert te_permute_stand_ins == {"permute": 0, "unpermute": 0, "sort": 0}
    layer = _layer(_case(mode, pad), moe_permute_fusion=True)
    fused = _run_recording_expert_inputs(layer)
    assert te_permute_stand_ins["permute"] == 1 and te_permute_stand_ins["unpermute"] == 1
    assert te_permute_stand_ins["sort"] == (0 if pad else 2)  # padded: a reshape, no sort
    decision = layer.router.last_routing
    assert bool(decision.fill_in_map.any()) == ("fr" in mode)
    assert bool((decision.ir_expert >= 0).any()) == ("ir" in mode)  # IR rows among them
    if pad and mode == "ir":  # a short column the router pads, with full columns after it
        assert decision.padding_map[:, :-1].any()
    assert fused.keys() == unfused.keys()
    for name in ("expert tokens", "tokens per expert", "expert probs"):
        assert torch.equal(fused[name], unfused[name]), name
    for name in fused.keys() - {"expert tokens", "tokens per expert", "expert probs"}:
        torch.testing.assert_close(fused[name], unfused[name], rtol=1e-6, atol=1e-6, msg=name)


# ---- router fusion -----------------------------------------------------------------------------


@pytest.fixture
def te_router_stand_ins(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """TE's fused router kernels as their unfused megatron counterparts, counting calls."""
    calls = {"topk": 0, "aux scores": 0, "aux loss": 0}
    unfused_topk = moe_utils.topk_routing_with_score_function
    unfused_scores = moe_utils.compute_routing_scores_for_aux_loss
    unfused_aux_loss = moe_utils.switch_load_balancing_loss_func

    def fused_topk(logits, topk, **kwargs):
        calls["topk"] += 1
        return unfused_topk(logits, topk, fused=False, **kwargs)

    def fused_scores(logits, topk, score_function):
        calls["aux scores"] += 1
        return unfused_scores(logits, topk, score_function, fused=False)

    def fused_aux_loss(probs, tokens_per_expert, total_num_tokens, topk, num_experts, coeff):
        calls["aux loss"] += 1
        return unfused_aux_loss(
            probs, tokens_per_expert, total_num_tokens, topk, num_experts, coeff
        )

    monkeypatch.setattr(moe_utils, "HAVE_TE", True)
    monkeypatch.setattr(moe_utils, "fused_topk_with_score_function", fused_topk)
    monkeypatch.setattr(moe_utils, "fused_compute_score_for_moe_aux_loss", fused_scores)
    monkeypatch.setattr(moe_utils, "fused_moe_aux_loss", fused_aux_loss)
    return calls


ROUTER_BASE = dict(
    num_layers=1,
    hidden_size=32,
    num_attention_heads=4,
    num_moe_experts=8,
    moe_router_topk=2,
    moe_expert_capacity_factor=0.5,
    moe_aux_loss_coeff=0.01,
    moe_router_load_balancing_type="aux_loss",
    use_cpu_initialization=True,
)


def _route(overrides: dict) -> dict[str, torch.Tensor | None]:
    from megatron.rectify.router import RectifyRouter

    torch.manual_seed(1234)
    router = RectifyRouter(RectifyTransformerConfig(**{**ROUTER_BASE, **overrides}))
    x = torch.randn(16, 2, 32, generator=torch.Generator().manual_seed(2)).requires_grad_()
    probs, routing_map = router(x)
    upstream = torch.randn(probs.shape, generator=torch.Generator().manual_seed(3))
    (probs * upstream).sum().backward()  # the aux loss's gradient rides on probs
    decision = router.last_routing
    return {
        "probs": probs.detach(),
        "routing_map": routing_map,
        "ir_expert": None if decision is None else decision.ir_expert,
        "ir_probs": None if decision is None else decision.ir_probs.detach(),
        "router grad": router.weight.grad.clone(),
        "x grad": x.grad.clone(),
    }


ROUTER_CASES = {
    "none": dict(moe_rectify="none"),
    "fr": dict(moe_rectify="fr"),
    "ir": dict(moe_rectify="ir", moe_rectify_ir_trigger="any"),
    "ir+fr": dict(moe_rectify="ir+fr", moe_rectify_ir_trigger="ignore_kth"),
    "ir+fr-grouped": dict(
        moe_rectify="ir+fr",
        moe_rectify_ir_trigger="ignore_kth",
        moe_router_num_groups=4,
        moe_router_group_topk=2,
    ),
    "fr-sigmoid-seq-aux": dict(
        moe_rectify="fr",
        moe_router_score_function="sigmoid",
        moe_router_load_balancing_type="seq_aux_loss",
    ),
}


@pytest.mark.usefixtures("single_rank")
@pytest.mark.parametrize("case", ROUTER_CASES)
def test_router_fusion_reaches_the_aux_loss_and_leaves_the_rectified_decision(
    te_router_stand_ins: dict[str, int], case: str
) -> None:
    overrides = ROUTER_CASES[case]
    plain = _route(overrides)
    assert te_router_stand_ins == {"topk": 0, "aux scores": 0, "aux loss": 0}
    fused = _route({**overrides, "moe_router_fusion": True})
    # the flag reaches megatron's aux-loss kernels in every mode ...
    assert te_router_stand_ins["aux scores"] == 1 and te_router_stand_ins["aux loss"] == 1
    # ... and TE's fused top-k only where megatron routes: the rectified decision needs every
    # expert's score and the (k+1)-th choice, which TE's top-k does not return
    assert te_router_stand_ins["topk"] == (1 if case == "none" else 0)
    for name, value in plain.items():
        if value is None:
            assert fused[name] is None, name
        else:
            assert torch.equal(fused[name], value), name


# ---- CUDA graphs -------------------------------------------------------------------------------


def _layer_input() -> tuple[torch.Tensor, torch.Tensor]:
    import moe_layer_cases as cases

    x, upstream = cases.rank_tokens(1)
    return x[0].unsqueeze(1), upstream[0].unsqueeze(1)  # [T, 1, H]


def _eager(layer, x: torch.Tensor, upstream: torch.Tensor) -> dict[str, torch.Tensor]:
    x = x.clone().requires_grad_()
    output, _ = layer(x)
    (output * upstream).sum().backward()
    return {"output": output.detach(), "x grad": x.grad, **_grads(layer)}


def _router_replay(layer, x: torch.Tensor, upstream: torch.Tensor) -> dict[str, torch.Tensor]:
    """megatron's ``transformer_engine`` replay of a ``moe_router`` graph, without the GPU: the
    graph's outputs (probs, routing_map: new tensor objects) go into the layer's
    ``cudagraph_tensor_store``, and ``MoELayer.forward`` resumes with ``route`` skipped by
    megatron's decorator. Before it, a router call on other tokens (a capture, a warm-up)
    leaves the layer holding a stale decision."""
    x = x.clone().requires_grad_()
    probs, routing_map = layer.route(x)  # what the graph computes ...
    probs, routing_map = probs.view_as(probs), routing_map.clone()  # ... and returns
    layer.route(torch.randn_like(x))  # the stale decision
    layer.config.cuda_graph_impl = "transformer_engine"
    layer.cudagraph_tensor_store.set(probs=probs, routing_map=routing_map)
    try:
        output, _ = layer(x)
    finally:
        layer.cudagraph_tensor_store.clear()
        layer.config.cuda_graph_impl = "none"
    (output * upstream).sum().backward()
    return {"output": output.detach(), "x grad": x.grad, **_grads(layer)}


@pytest.mark.usefixtures("single_rank")
@pytest.mark.parametrize("pad", [True, False], ids=["padded", "unpadded"])
def test_fr_routes_from_a_replayed_router_without_any_stored_decision(pad: bool) -> None:
    layer = _layer(_case("fr", pad))
    x, upstream = _layer_input()
    eager = _eager(layer, x, upstream)
    assert layer.router.last_routing.fill_in_map.any()
    layer.zero_grad(set_to_none=True)
    replayed = _router_replay(layer, x, upstream)
    assert replayed.keys() == eager.keys()
    for name, value in eager.items():
        assert torch.equal(replayed[name], value), name


@pytest.mark.usefixtures("single_rank")
@pytest.mark.parametrize("mode", ["ir", "ir+fr"])
def test_ir_refuses_a_replayed_router(mode: str) -> None:
    """IR needs the call's own decision; a replayed router has none (and the flag checks
    refuse IR where a graph holds the router)."""
    layer = _layer(_case(mode, pad=True))
    x, upstream = _layer_input()
    with pytest.raises(RuntimeError, match="routing_map its route\\(\\) did not return"):
        _router_replay(layer, x, upstream)


@pytest.mark.usefixtures("single_rank")
def test_fr_adds_no_host_sync_to_the_unpadded_path() -> None:
    """``test_bench_syncs.py`` checks the padded path (the one megatron captures whole); here
    without padding: megatron's dispatcher syncs as it does for its own routing, FR's code
    adds none (a replayed router graph must not need one)."""
    if str(REPO) not in sys.path:  # benchmarks/ is not installed
        sys.path.insert(0, str(REPO))
    from benchmarks.perf import syncs
    from benchmarks.perf.sweeps import SyncCase

    modes = syncs.count_case(SyncCase(tp=1, ep=1, pad=False, tokens=64))["modes"]
    assert modes["fr"]["rectify"] == 0, modes["fr"]["sites"]
    assert modes["fr"]["total"] == modes["none"]["total"], modes["fr"]["sites"]


@pytest.mark.usefixtures("single_rank")
def test_end_of_run_totals_are_updated_in_place() -> None:
    """A CUDA-graph replay re-runs the kernels captured in ``record_statistics``, not its
    Python: every running total must be a device tensor the captured add updates in place."""
    import moe_layer_cases as cases

    layer = _layer(_case("fr", pad=True))
    x, upstream = cases.rank_tokens(1)
    cases.run_layer(layer, x[0], upstream[0])
    first = dict(layer.cumulative_statistics)
    once = {name: value.clone() for name, value in first.items()}
    summary = layer.statistics_summary()
    cases.run_layer(layer, x[0], upstream[0])
    assert first.keys() == layer.cumulative_statistics.keys() and "num_tokens" in first
    for name, value in layer.cumulative_statistics.items():
        assert isinstance(value, torch.Tensor) and value is first[name], name
        assert torch.equal(value, 2 * once[name]), name
    assert layer.statistics_summary() == summary


# ---- EP communication overlap: megatron's fine-grained schedule plan ---------------------------


def _transformer_layer(mode: str, pad: bool):
    import moe_layer_cases as cases
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
    from megatron.core.transformer.spec_utils import build_module

    from megatron.rectify.layer_specs import get_gpt_layer_local_spec_rectify

    config = cases.make_config(_case(mode, pad), 1)
    config = dataclasses.replace(config, attention_dropout=0.0, hidden_dropout=0.0)
    torch.manual_seed(0)
    model_parallel_cuda_manual_seed(0)  # attention's RNG tracker
    spec = get_gpt_layer_local_spec_rectify(num_experts=4, moe_grouped_gemm=False)
    layer = build_module(spec, config=config, layer_number=1).to(cases.device())
    cases.load_global_weights(layer.mlp, cases.global_weights(4))
    layer.train()
    return layer


def _through_the_schedule_plan(layer, x, upstream):
    """One forward and one backward of ``layer`` through megatron's
    ``TransformerLayerSchedulePlan`` (the nodes of ``--overlap-moe-expert-parallel-comm``:
    attention + router + preprocess | dispatch | experts | combine, each node's inputs
    detached), driven by megatron's own ``TransformerLayerSchedulePlan.run``."""
    from megatron.core.models.common.model_chunk_schedule_plan import (
        TransformerLayerSchedulePlan,
    )

    decoder = types.SimpleNamespace(final_layernorm=None)
    chunk_state = types.SimpleNamespace(
        attention_mask=None,
        rotary_pos_emb=None,
        rotary_pos_cos=None,
        rotary_pos_sin=None,
        packed_seq_params=None,
        sequence_len_offset=None,
        model=types.SimpleNamespace(decoder=decoder),
    )
    stream = torch.cuda.current_stream  # the CPU emulation's stream: one stream, in order
    plan = TransformerLayerSchedulePlan(layer, torch.cuda.Event(), chunk_state, stream, stream)
    # At EP = 1 megatron's all-to-all hands back its input itself, so freeing a node's input
    # (a memory optimisation only) would free the next node's data.
    for node in (plan.pre_dispatch_computation, plan.moe_dispatch, plan.mlp, plan.moe_combine):
        node.free_input = False
    x = x.clone().requires_grad_()
    output, _ = TransformerLayerSchedulePlan.run(plan, None, f_input=x)
    _, x_grad = TransformerLayerSchedulePlan.run(
        None, plan, b_grad=upstream, is_last_layer_in_bwd=True
    )
    return {"output": output.detach(), "x grad": x_grad, **_grads(layer)}


def _plain_layer(layer, x, upstream):
    x = x.clone().requires_grad_()
    output, _ = layer(x, attention_mask=None)
    (output * upstream).sum().backward()
    return {"output": output.detach(), "x grad": x.grad, **_grads(layer)}


@pytest.mark.usefixtures("single_rank")
@pytest.mark.parametrize("pad", [True, False], ids=["padded", "unpadded"])
def test_fr_runs_through_the_overlap_schedule_nodes(pad: bool) -> None:
    layer = _transformer_layer("fr", pad)
    x, upstream = _layer_input()
    plain = _plain_layer(layer, x, upstream)
    assert layer.mlp.router.last_routing.fill_in_map.any()
    layer.zero_grad(set_to_none=True)
    split = _through_the_schedule_plan(layer, x, upstream)
    assert split.keys() == plain.keys() and "mlp.router.weight" in plain
    for name, value in plain.items():
        assert torch.equal(split[name], value), name


@pytest.mark.usefixtures("single_rank")
def test_ir_breaks_the_overlap_schedule_nodes() -> None:
    """IR's side batch crosses the nodes outside their detached tensors: the combine node's
    backward runs through the experts' graph, and the experts' node then cannot."""
    layer = _transformer_layer("ir+fr", pad=True)
    x, upstream = _layer_input()
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        _through_the_schedule_plan(layer, x, upstream)
    assert (layer.mlp.router.last_routing.ir_expert >= 0).any()


# ---- routing-map padding for FP8 / FP4 ---------------------------------------------------------

NUM_TOKENS, NUM_EXPERTS, ALIGN = 24, 6, 16


def _fr_decision(pad: bool, topk: int = 1):
    gen = torch.Generator().manual_seed(3)
    bias = torch.tensor([2.0, 1.5, 0.5, 0.0, -1.0, -1.5])
    probs = torch.softmax(torch.randn(NUM_TOKENS, NUM_EXPERTS, generator=gen) + bias, dim=-1)
    topk_indices = probs.topk(topk, dim=1).indices
    capacity = get_capacity(NUM_TOKENS * topk, NUM_EXPERTS, 0.75)
    options = RectifyOptions.from_mode("fr")
    return rectified_routing(
        probs, topk_indices, capacity, options, range(NUM_EXPERTS), pad_to_capacity=pad
    )


def _through_experts(x, routing_map, probs, num_out_tokens, drop_and_pad, weights):
    """megatron's unfused permute -> one toy linear expert per column -> unpermute."""
    permuted, permuted_probs, rows, _, _ = permute(
        x, routing_map, probs=probs, num_out_tokens=num_out_tokens, drop_and_pad=drop_and_pad
    )
    counts = routing_map.sum(dim=0)
    if drop_and_pad:
        counts = torch.full_like(counts, num_out_tokens // routing_map.shape[1])
    expert_of_row = torch.repeat_interleave(torch.arange(routing_map.shape[1]), counts)
    out = torch.einsum("rij,rj->ri", weights[expert_of_row], permuted) * permuted_probs[:, None]
    y = unpermute(out, rows, x.shape, routing_map=routing_map, drop_and_pad=drop_and_pad)
    return y, rows, expert_of_row


def test_quantization_padding_keeps_an_unpadded_fr_map() -> None:
    decision = _fr_decision(pad=False)
    assert decision.fill_in_map.any()
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(NUM_TOKENS, 5, generator=gen)
    weights = torch.randn(NUM_EXPERTS, 5, 5, generator=gen)
    probs = decision.probs.detach()
    padded = pad_routing_map(decision.routing_map.clone(), ALIGN)
    assert (padded.sum(dim=0) % ALIGN == 0).all()  # megatron's aligned splits
    assert torch.equal(padded & decision.routing_map, decision.routing_map)  # nothing lost
    assert not probs[padded & ~decision.routing_map].any()  # added pairs weigh 0
    direct = torch.einsum("te,eij,tj->ti", probs * decision.routing_map, weights, x)
    y, _, _ = _through_experts(x, padded, probs, int(padded.sum()), False, weights)
    torch.testing.assert_close(y, direct)


def test_quantization_padding_corrupts_a_map_padded_to_capacity() -> None:
    """Why the flag checks refuse it: megatron pads the exactly-C columns further, then its
    padded dispatcher keeps the first C entries per column by token index."""
    decision = _fr_decision(pad=True)
    capacity = decision.capacity
    assert capacity % ALIGN and decision.fill_in_map.any()
    padded = pad_routing_map(decision.routing_map.clone(), ALIGN)
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(NUM_TOKENS, 5, generator=gen)
    weights = torch.randn(NUM_EXPERTS, 5, 5, generator=gen)
    probs = decision.probs.detach()
    y, rows, expert_of_row = _through_experts(
        x, padded, probs, capacity * NUM_EXPERTS, True, weights
    )
    computed = torch.zeros_like(decision.routed_map)
    computed[rows, expert_of_row] = True
    assert (decision.routed_map & ~computed).any()  # routed tokens pushed out of their expert
    direct = torch.einsum("te,eij,tj->ti", probs * decision.routed_map, weights, x)
    assert not torch.allclose(y, direct, atol=1e-4)
    y_ok, _, _ = _through_experts(
        x, decision.routing_map, probs, capacity * NUM_EXPERTS, True, weights
    )
    torch.testing.assert_close(y_ok, direct)  # the same map without the quantization padding
