"""Tests of megatron.rectify.dev.multiprocess.run_distributed (gloo, CPU emulation).

Rank bodies are module-level functions so that they can be pickled. Most tests use the default
forkserver start method (megatron imported once, before emulation); one uses spawn (emulation
activated before megatron is imported).
"""

from __future__ import annotations

import multiprocessing
import os
import time
from typing import Any

import pytest

from megatron.rectify.dev.multiprocess import DistributedTestError, run_distributed

pytestmark = pytest.mark.multiprocess


def _layout(rank: int, world_size: int) -> dict[str, Any]:
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    summed = torch.tensor([float(rank + 1)], device="cuda")
    dist.all_reduce(summed)
    tp_sum = torch.tensor([rank], device="cuda")
    dist.all_reduce(tp_sum, group=ps.get_tensor_model_parallel_group())
    ep_sum = torch.tensor([rank], device="cuda")
    dist.all_reduce(ep_sum, group=ps.get_expert_model_parallel_group())
    return {
        "all_reduce": summed.item(),
        "tp": (ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()),
        "dp": (ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()),
        "ep": (ps.get_expert_model_parallel_rank(), ps.get_expert_model_parallel_world_size()),
        "etp": (ps.get_expert_tensor_parallel_rank(), ps.get_expert_tensor_parallel_world_size()),
        "tp_group_rank_sum": int(tp_sum.item()),
        "ep_group_rank_sum": int(ep_sum.item()),
        "device": summed.device.type,
    }


@pytest.mark.parametrize("start_method", ["forkserver", "spawn"])
def test_all_reduce_and_ep2_layout(start_method: str) -> None:
    out = run_distributed(_layout, 2, expert_model_parallel_size=2, start_method=start_method)
    assert [o["all_reduce"] for o in out] == [3.0, 3.0]
    assert [o["ep"] for o in out] == [(0, 2), (1, 2)]
    assert [o["tp"] for o in out] == [(0, 1), (0, 1)]
    assert [o["dp"] for o in out] == [(0, 2), (1, 2)]
    assert [o["ep_group_rank_sum"] for o in out] == [1, 1]
    assert {o["device"] for o in out} == {"cpu"}


def test_tp2_layout() -> None:
    out = run_distributed(_layout, 2, tensor_model_parallel_size=2)
    assert [o["tp"] for o in out] == [(0, 2), (1, 2)]
    assert [o["dp"] for o in out] == [(0, 1), (0, 1)]
    assert [o["ep"] for o in out] == [(0, 1), (0, 1)]
    assert [o["tp_group_rank_sum"] for o in out] == [1, 1]


def test_tp2_ep2_four_processes() -> None:
    out = run_distributed(_layout, 4, tensor_model_parallel_size=2, expert_model_parallel_size=2)
    assert [o["all_reduce"] for o in out] == [10.0] * 4
    assert [o["tp"] for o in out] == [(0, 2), (1, 2), (0, 2), (1, 2)]
    assert [o["dp"] for o in out] == [(0, 2), (0, 2), (1, 2), (1, 2)]
    assert [o["etp"] for o in out] == [(0, 2), (1, 2), (0, 2), (1, 2)]  # expert TP defaults to TP
    assert [o["ep"] for o in out] == [(0, 2), (0, 2), (1, 2), (1, 2)]
    assert [o["tp_group_rank_sum"] for o in out] == [1, 1, 5, 5]
    assert [o["ep_group_rank_sum"] for o in out] == [2, 4, 2, 4]


def _fail_on_rank_1(rank: int, world_size: int) -> int:
    if rank == 1:
        raise ValueError("deliberate failure on rank 1")
    return rank


def test_failing_rank_surfaces_rank_and_traceback() -> None:
    with pytest.raises(DistributedTestError) as info:
        run_distributed(_fail_on_rank_1, 2)
    message = str(info.value)
    assert "rank 1 failed" in message and "rank 0 failed" not in message
    assert "ValueError: deliberate failure on rank 1" in message
    assert "_fail_on_rank_1" in message  # the traceback, not just the exception text
    assert not multiprocessing.active_children()


def _exit_on_rank_1(rank: int, world_size: int) -> int:
    if rank == 1:
        os._exit(3)  # dies without a Python exception (as a segfault or OOM kill would)
    return rank


def test_rank_dying_silently_is_reported() -> None:
    with pytest.raises(DistributedTestError, match="rank 1 failed:\nexited with code 3"):
        run_distributed(_exit_on_rank_1, 2)
    assert not multiprocessing.active_children()


def _hang_on_rank_1(rank: int, world_size: int) -> int:
    if rank == 1:
        time.sleep(3600)
    return rank


def test_hanging_rank_is_killed_on_timeout() -> None:
    start = time.monotonic()
    with pytest.raises(DistributedTestError) as info:
        run_distributed(_hang_on_rank_1, 2, timeout_s=8)
    assert time.monotonic() - start < 30
    message = str(info.value)
    assert "timed out after 8 s" in message and "ranks [1] hung" in message
    assert "_hang_on_rank_1" in message  # the hung rank's stack, dumped before the kill
    assert not multiprocessing.active_children()


def _print_and_return(rank: int, world_size: int) -> int:
    print(f"hello from rank {rank}")
    return rank * 10


def test_rank_output_reaches_parent_and_env_is_current(
    capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MEGATRON_RECTIFY_TEST_MARKER", "42")
    assert run_distributed(_env_marker, 2) == ["42", "42"]
    assert run_distributed(_print_and_return, 2) == [0, 10]
    err = capfd.readouterr().err
    assert "[rank 0] hello from rank 0" in err and "[rank 1] hello from rank 1" in err


def _env_marker(rank: int, world_size: int) -> str | None:
    return os.environ.get("MEGATRON_RECTIFY_TEST_MARKER")


def _moe_layer_ep2(rank: int, world_size: int) -> dict[str, Any]:
    import torch
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.moe.moe_layer import MoELayer
    from megatron.core.transformer.transformer_config import TransformerConfig

    def build(use_cpu_initialization: bool) -> MoELayer:
        config = TransformerConfig(
            num_layers=1, hidden_size=32, num_attention_heads=4, num_moe_experts=4,
            moe_router_topk=2, moe_token_dispatcher_type="alltoall", expert_model_parallel_size=2,
            params_dtype=torch.float32, use_cpu_initialization=use_cpu_initialization,
            add_bias_linear=False, moe_expert_capacity_factor=1.0,
            moe_pad_expert_input_to_capacity=True,
        )  # fmt: skip
        mlp = get_gpt_layer_local_spec(num_experts=4, moe_grouped_gemm=False).submodules.mlp
        submodules = getattr(mlp, "submodules", None) or mlp.keywords["submodules"]
        return MoELayer(config, submodules)

    layer = build(use_cpu_initialization=True)
    x = torch.randn(8, 2, 32, device="cuda", requires_grad=True)  # [seq, batch, hidden]
    out, _ = layer(x)
    (out.float() ** 2).sum().backward()
    # GPU-style initialisation runs under the RNG tracker: data-parallel replicas (the router)
    # must come out identical, which needs the emulated _set_cuda_rng_state.
    gpu_init_router = build(use_cpu_initialization=False).router.weight
    return {
        "shape": tuple(out.shape),
        "finite": bool(torch.isfinite(out).all()),
        "input_grad": x.grad is not None and bool(torch.isfinite(x.grad).all()),
        "missing_grads": [n for n, p in layer.named_parameters() if p.grad is None],
        "num_local_experts": len(layer.experts.local_experts),
        "expert_grad_norm": float(
            sum(p.grad.norm() for n, p in layer.named_parameters() if "experts" in n)
        ),
        # plain lists: unpickling a tensor would import megatron-core into the parent
        "gpu_init_router": gpu_init_router.detach().flatten().tolist(),
    }


def test_megatron_moe_layer_ep2_forward_backward() -> None:
    out = run_distributed(_moe_layer_ep2, 2, expert_model_parallel_size=2)
    for rank_out in out:
        assert rank_out["shape"] == (8, 2, 32)
        assert rank_out["finite"] and rank_out["input_grad"]
        assert rank_out["missing_grads"] == []
        assert rank_out["num_local_experts"] == 2
        assert rank_out["expert_grad_norm"] > 0
    assert out[0]["gpu_init_router"] == out[1]["gpu_init_router"]


def _uneven_gather(rank: int, world_size: int) -> list[list[float]]:
    import torch
    import torch.distributed as dist
    from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

    sizes = [2, 3]
    x = torch.full((sizes[rank], 2), float(rank + 1), device="cuda", requires_grad=True)
    gathered = gather_from_sequence_parallel_region(x, output_split_sizes=sizes)
    gathered.sum().backward()  # megatron's backward: an uneven reduce-scatter (gloo has it)
    assert dist.get_backend() == "gloo"
    return [gathered[:, 0].tolist(), x.grad[:, 0].tolist()]


def test_megatron_gathers_uneven_sizes_over_gloo() -> None:
    """megatron's alltoall dispatcher with expert TP > 1 and no padding gathers each TP rank's
    received tokens with uneven sizes; gloo refuses those, the emulation pads them."""
    out = run_distributed(_uneven_gather, 2, tensor_model_parallel_size=2)
    for rank in range(2):
        assert out[rank][0] == [1.0, 1.0, 2.0, 2.0, 2.0]
        assert out[rank][1] == [2.0] * [2, 3][rank]  # both ranks' sums flow back
