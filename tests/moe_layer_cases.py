"""Rank bodies for the rectified-MoE-layer tests, and the plain-torch reference they compare to.

Every rank builds the same *global* weights from a seed (router [E, H], expert fc1 [E, F, H],
fc2 [E, H, F]), loads its slices (its EP rank's experts, its expert-TP shard) into megatron's
modules, and feeds its own tokens. The reference runs the spec directly on all ranks' tokens in
one process: per rank, ``reference_rectified_routing`` with that rank's capacity and local experts,
then ``y_t = sum_e w_te f_e(x_t) + w_ir f_h(x_t)`` with ``f_e(x) = fc2_e(gelu(fc1_e x))``.
Returned values are plain Python (floats, lists) so that the parent never unpickles tensors.
"""

from __future__ import annotations

import math

import torch

HIDDEN, FFN, TOKENS_PER_RANK = 16, 24, 24


def global_weights(num_experts: int, seed: int = 11) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "router": torch.randn(num_experts, HIDDEN, generator=gen) * 0.5,
        "fc1": torch.randn(num_experts, FFN, HIDDEN, generator=gen) * 0.3,
        "fc2": torch.randn(num_experts, HIDDEN, FFN, generator=gen) * 0.3,
    }


def rank_tokens(world_size: int, seed: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """All ranks' layer inputs and output gradients, [world, T, H] each."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(world_size, TOKENS_PER_RANK, HIDDEN, generator=gen)
    upstream = torch.randn(world_size, TOKENS_PER_RANK, HIDDEN, generator=gen)
    return x, upstream


def ir_trigger(case: dict) -> str:
    """ignore_kth with FR; otherwise all (top-1) or any (top-k, so that IR has work to do)."""
    if case.get("mode", "ir+fr") == "ir+fr":
        return "ignore_kth"
    return "all" if case["topk"] == 1 else "any"


def make_config(case: dict, world_size: int):
    from megatron.rectify.config import RectifyTransformerConfig

    tp = case.get("tp", 1)
    mode = case.get("mode", "ir+fr")
    return RectifyTransformerConfig(
        num_layers=1,
        hidden_size=HIDDEN,
        ffn_hidden_size=FFN,
        moe_ffn_hidden_size=FFN,
        num_attention_heads=4,
        num_moe_experts=case["experts"],
        moe_router_topk=case["topk"],
        moe_router_pre_softmax=case["topk"] == 1,
        moe_token_dispatcher_type=case.get("dispatcher", "alltoall"),
        moe_expert_capacity_factor=case.get("capacity_factor", 0.75),
        moe_pad_expert_input_to_capacity=case.get("pad", True),
        moe_aux_loss_coeff=0.0,
        moe_rectify=mode,
        moe_rectify_ir_trigger=ir_trigger(case),
        moe_rectify_ir_capacity_factor=case.get("ir_capacity_factor"),
        tensor_model_parallel_size=tp,
        expert_model_parallel_size=case.get("ep", 1),
        expert_tensor_parallel_size=case.get("etp", 1),
        sequence_parallel=tp > 1,
        add_bias_linear=False,
        use_cpu_initialization=True,
        bf16=case.get("bf16", False),
        params_dtype=torch.bfloat16 if case.get("bf16", False) else torch.float32,
        moe_grouped_gemm=case.get("te", False),
    )


def build_layer(config, layer_class=None):
    """The layer from our rectified local spec (or megatron's, for the vanilla comparison)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from megatron.rectify.layer_specs import get_gpt_layer_local_spec_rectify

    get_spec = (
        get_gpt_layer_local_spec
        if layer_class == "megatron"
        else (get_gpt_layer_local_spec_rectify)
    )
    spec = get_spec(num_experts=config.num_moe_experts, moe_grouped_gemm=False)
    layer = spec.submodules.mlp(config=config, layer_number=1).to(device())
    if config.bf16:
        layer = layer.bfloat16()
    layer.train()
    return layer


def load_global_weights(layer, weights: dict[str, torch.Tensor]) -> None:
    from megatron.core import parallel_state

    etp = parallel_state.get_expert_tensor_parallel_world_size()
    etp_rank = parallel_state.get_expert_tensor_parallel_rank()
    shard = FFN // etp
    rows = slice(etp_rank * shard, (etp_rank + 1) * shard)
    with torch.no_grad():
        layer.router.weight.copy_(weights["router"])
        for local, (fc1, fc2) in enumerate(_expert_weights(layer)):
            global_index = layer.local_expert_indices[local]
            fc1.copy_(weights["fc1"][global_index][rows])
            fc2.copy_(weights["fc2"][global_index][:, rows])


def _expert_weights(layer) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(fc1, fc2) weight per local expert: ``SequentialMLP`` or TE's ``TEGroupedMLP``."""
    experts = layer.experts
    if hasattr(experts, "local_experts"):
        return [(e.linear_fc1.weight, e.linear_fc2.weight) for e in experts.local_experts]
    return [
        (getattr(experts.linear_fc1, f"weight{i}"), getattr(experts.linear_fc2, f"weight{i}"))
        for i in range(layer.num_local_experts)
    ]


def device() -> torch.device:
    """GPU runs (scripts/gpu_check.sh) use these bodies in one NCCL process; CPU runs use gloo."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def run_layer(layer, x: torch.Tensor, upstream: torch.Tensor):
    """One forward+backward; inputs and results are CPU float32 tensors."""
    dtype = layer.router.weight.dtype if layer.config.bf16 else torch.float32
    x = x.detach().clone().unsqueeze(1).to(device(), dtype).requires_grad_()  # [T, 1, H]
    output, _ = layer(x)
    (output.squeeze(1) * upstream.to(output)).sum().backward()
    return output.detach().squeeze(1).float().cpu(), x.grad.squeeze(1).float().cpu()


def summed_expert_grads(layer, num_experts: int) -> dict[str, torch.Tensor]:
    """Each local expert's weight grads, summed over the expert-data-parallel group and placed
    into global [E, ...] tensors (zeros for experts and shards this rank does not hold),
    then summed over the whole world so every rank returns the full gradient."""
    from megatron.core import parallel_state

    etp = parallel_state.get_expert_tensor_parallel_world_size()
    etp_rank = parallel_state.get_expert_tensor_parallel_rank()
    shard = FFN // etp
    rows = slice(etp_rank * shard, (etp_rank + 1) * shard)
    fc1 = torch.zeros(num_experts, FFN, HIDDEN, device=device())
    fc2 = torch.zeros(num_experts, HIDDEN, FFN, device=device())
    for local, (fc1_weight, fc2_weight) in enumerate(_expert_weights(layer)):
        global_index = layer.local_expert_indices[local]
        fc1[global_index][rows] = _grad(fc1_weight)
        fc2[global_index][:, rows] = _grad(fc2_weight)
    router = layer.router.weight.grad.detach().float().clone()
    for tensor in (fc1, fc2, router):
        torch.distributed.all_reduce(tensor)
    # Each expert shard's grad is summed over the ranks holding it (they saw different tokens);
    # every other rank contributed zeros for it.
    return {"fc1": fc1.cpu(), "fc2": fc2.cpu(), "router": router.cpu()}


def _grad(weight: torch.Tensor) -> torch.Tensor:
    """megatron keeps fused-accumulation grads in ``main_grad`` when it has one."""
    grad = weight.grad if weight.grad is not None else getattr(weight, "main_grad", None)
    return grad.float()


def reference(case: dict, world_size: int) -> dict[str, torch.Tensor]:
    """The spec, in one process, over every rank's tokens: outputs, input and weight grads."""
    from megatron.core.transformer.moe.moe_utils import get_capacity

    from megatron.rectify.config import RectifyOptions
    from megatron.rectify.reference import reference_rectified_routing
    from megatron.rectify.router import full_score_distribution

    num_experts, topk = case["experts"], case["topk"]
    ep = case.get("ep", 1)
    experts_per_rank = num_experts // ep
    mode = case.get("mode", "ir+fr")
    options = RectifyOptions.from_mode(
        mode, ir_trigger=ir_trigger(case), ir_capacity_factor=case.get("ir_capacity_factor")
    )
    weights = {k: v.clone().requires_grad_() for k, v in global_weights(num_experts).items()}
    x_all, upstream_all = rank_tokens(world_size)
    x_all = x_all.clone().requires_grad_()
    outputs = []
    for rank in range(world_size):
        ep_rank = _ep_rank_of(rank, case, world_size)
        x = x_all[rank]
        probs = full_score_distribution(x @ weights["router"].t(), "softmax")
        topk_indices = probs.detach().topk(topk, dim=1).indices
        capacity = get_capacity(x.shape[0] * topk, num_experts, case.get("capacity_factor", 0.75))
        local = range(ep_rank * experts_per_rank, (ep_rank + 1) * experts_per_rank)
        decision = reference_rectified_routing(probs, topk_indices, capacity, options, local)
        y = torch.zeros_like(x)
        for t in range(x.shape[0]):
            for e in decision.routing_map[t].nonzero().flatten().tolist():
                y[t] = y[t] + decision.probs[t, e] * _expert(weights, e, x[t])
            h = int(decision.ir_expert[t])
            if h >= 0:
                y[t] = y[t] + decision.ir_probs[t] * _expert(weights, h, x[t])
        outputs.append(y)
    output = torch.stack(outputs)
    (output * upstream_all).sum().backward()
    return {
        "output": output.detach(),
        "x_grad": x_all.grad,
        "fc1": weights["fc1"].grad,
        "fc2": weights["fc2"].grad,
        "router": weights["router"].grad,
    }


def _expert(weights: dict[str, torch.Tensor], e: int, x: torch.Tensor) -> torch.Tensor:
    return weights["fc2"][e] @ torch.nn.functional.gelu(weights["fc1"][e] @ x)


def _ep_rank_of(rank: int, case: dict, world_size: int) -> int:
    """megatron's default rank order is tp-cp-ep-dp-pp: EP ranks are strided by TP (ETP=1) or
    by ETP within the expert grid."""
    etp = case.get("etp", 1)
    ep = case.get("ep", 1)
    return (rank // etp) % ep


def layer_vs_reference(rank: int, world_size: int, case: dict) -> dict:
    """Rank body: run the rectified layer, return max differences against the reference."""
    from megatron.core import parallel_state

    config = make_config(case, world_size)
    layer = build_layer(config)
    load_global_weights(layer, global_weights(case["experts"]))
    x_all, upstream_all = rank_tokens(world_size)
    output, x_grad = run_layer(layer, x_all[rank], upstream_all[rank])
    grads = summed_expert_grads(layer, case["experts"])
    expected = reference(case, world_size)
    stats = layer.router.statistics()
    return {
        "ep_rank": parallel_state.get_expert_model_parallel_rank(),
        "output": float((output - expected["output"][rank]).abs().max()),
        "x_grad": float((x_grad - expected["x_grad"][rank]).abs().max()),
        "fc1": float((grads["fc1"] - expected["fc1"]).abs().max()),
        "fc2": float((grads["fc2"] - expected["fc2"]).abs().max()),
        "router": float((grads["router"] - expected["router"]).abs().max()),
        "scale": float(expected["output"].abs().max()),
        "rectified": int(stats.rectified),
        "filled_in": int(stats.filled_in),
        "dropped": int(stats.dropped),
        "ir_over_budget": int(stats.ir_over_budget),
    }


def layer_vs_megatron(rank: int, world_size: int, case: dict) -> dict:
    """Rank body: rectification off must be bit-identical to megatron's own MoELayer."""
    config = make_config({**case, "mode": "none"}, world_size)
    weights = global_weights(case["experts"])
    x_all, upstream_all = rank_tokens(world_size)
    results = {}
    for name in ("megatron", "rectify"):
        layer = build_layer(config, layer_class=name)
        load_global_weights(layer, weights)
        output, x_grad = run_layer(layer, x_all[rank], upstream_all[rank])
        grads = summed_expert_grads(layer, case["experts"])
        results[name] = (output, x_grad, grads["fc1"], grads["fc2"], grads["router"])
    return {
        "types": [type(layer).__name__, type(layer.token_dispatcher).__name__],
        "identical": [
            bool(torch.equal(a, b))
            for a, b in zip(results["megatron"], results["rectify"], strict=True)
        ],
    }


def alltoall_elements_sent(rank: int, world_size: int, case: dict) -> dict:
    """Rank body: elements this rank sends to OTHER ranks in the forward EP all-to-alls
    (dispatch tokens, dispatch probs, combine; the backward mirrors them), for megatron's layer
    (vanilla top-k) and the rectified one, same weights, tokens and capacity."""
    from megatron.core import parallel_state
    from megatron.core.transformer.moe import token_dispatcher

    ep_group = parallel_state.get_expert_model_parallel_group()
    my_ep_rank = parallel_state.get_expert_model_parallel_rank()
    counter = {"elements": 0}
    original = token_dispatcher.all_to_all

    def counting_all_to_all(
        group, input_, output_split_sizes=None, input_split_sizes=None, **kwargs
    ):
        if group is ep_group:
            row = math.prod(input_.shape[1:])  # elements per token (1 for the probs)
            splits = input_split_sizes
            if splits is None:
                splits = [input_.shape[0] // group.size()] * group.size()
            splits = [int(s) for s in (splits.tolist() if hasattr(splits, "tolist") else splits)]
            counter["elements"] += row * sum(s for r, s in enumerate(splits) if r != my_ep_rank)
        return original(group, input_, output_split_sizes, input_split_sizes, **kwargs)

    token_dispatcher.all_to_all = counting_all_to_all
    weights = global_weights(case["experts"])
    x_all, upstream_all = rank_tokens(world_size)
    sent = {}
    try:
        for name, mode in (("megatron", "none"), ("rectify", case.get("mode", "ir+fr"))):
            config = make_config({**case, "mode": mode}, world_size)
            layer = build_layer(config, layer_class=name)
            load_global_weights(layer, weights)
            counter["elements"] = 0
            run_layer(layer, x_all[rank], upstream_all[rank])
            sent[name] = counter["elements"]
            if name == "rectify":
                stats = layer.router.statistics()
                sent["rectified"] = int(stats.rectified)
                sent["filled_in"] = int(stats.filled_in)
    finally:
        token_dispatcher.all_to_all = original
    return sent


def pad_vs_no_pad(rank: int, world_size: int, case: dict) -> dict:
    """Rank body: padding to capacity must not change the rectified layer's result."""
    weights = global_weights(case["experts"])
    x_all, upstream_all = rank_tokens(world_size)
    runs = []
    for pad in (True, False):
        layer = build_layer(make_config({**case, "pad": pad}, world_size))
        load_global_weights(layer, weights)
        runs.append(run_layer(layer, x_all[rank], upstream_all[rank]))
    (out_pad, grad_pad), (out_nopad, grad_nopad) = runs
    return {
        "output": float((out_pad - out_nopad).abs().max()),
        "x_grad": float((grad_pad - grad_nopad).abs().max()),
    }


def dispatched_column_counts(rank: int, world_size: int, case: dict) -> dict:
    """Rank body: tokens per expert column of the map megatron's dispatcher receives, the
    capacity, and whether any of them are zero-weight padding (the padded-dispatch contract)."""
    from megatron.core.transformer.moe.moe_utils import get_capacity

    layer = build_layer(make_config(case, world_size))
    load_global_weights(layer, global_weights(case["experts"]))
    seen = []
    original = layer.token_dispatcher.dispatch_preprocess

    def recording(hidden_states, routing_map, probs, **decision):
        seen.append(routing_map.sum(dim=0).tolist())
        return original(hidden_states, routing_map, probs, **decision)

    layer.token_dispatcher.dispatch_preprocess = recording
    x_all, upstream_all = rank_tokens(world_size)
    run_layer(layer, x_all[rank], upstream_all[rank])
    decision = layer.router.last_routing
    capacity = get_capacity(
        TOKENS_PER_RANK * case["topk"], case["experts"], case.get("capacity_factor", 0.75)
    )
    return {
        "columns": seen[0],
        "capacity": capacity,
        "padding_pairs": int(decision.padding_map.sum()) if decision is not None else 0,
    }
