"""Forward+backward time of ``RectifyRouter`` (IR+FR) over megatron's ``TopKRouter``.

Both routers run in the same process, on the same weights and input, with the same capacity;
timings alternate between them so machine noise hits both alike. The printed ratio is
rectified / vanilla (median over repeats).

    python benchmarks/router_overhead.py                 # T=16384, E in {8, 64}, k in {1, 2}
    python benchmarks/router_overhead.py --tokens 4096 --experts 8 --topk 1 --repeats 5

On a CPU-only machine the CPU emulation layer is switched on (it says so in the log).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch


def _setup_single_process() -> None:
    if not torch.cuda.is_available():
        from megatron.rectify.testing.cpu_emulation import activate

        activate()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29561")
    if not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend, rank=0, world_size=1)
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel()


def _time_fwd_bwd(router: torch.nn.Module, x: torch.Tensor, upstream: torch.Tensor) -> float:
    x = x.detach().requires_grad_()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    probs, _ = router(x)
    loss = (probs * upstream).sum()
    ir = getattr(router, "last_routing", None)
    if ir is not None:
        loss = loss + ir.ir_probs.sum()
    loss.backward()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def measure(tokens: int, experts: int, topk: int, hidden: int, repeats: int) -> dict:
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
    from megatron.core.transformer.moe.router import TopKRouter

    from megatron.rectify.config import RectifyTransformerConfig
    from megatron.rectify.router import RectifyRouter

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    common = dict(
        num_layers=1,
        hidden_size=hidden,
        num_attention_heads=8,
        num_moe_experts=experts,
        moe_router_topk=topk,
        moe_expert_capacity_factor=1.0,
        moe_router_load_balancing_type="aux_loss",
        moe_aux_loss_coeff=0.0,
        moe_router_pre_softmax=topk == 1,  # megatron requires it for top-1
        use_cpu_initialization=True,
    )
    vanilla = TopKRouter(
        RectifyTransformerConfig(**common), pg_collection=get_default_pg_collection()
    ).to(device)
    rectified = RectifyRouter(
        RectifyTransformerConfig(**common, moe_rectify="ir+fr", moe_rectify_ir_trigger="ignore_kth")
    ).to(device)
    rectified.load_state_dict(vanilla.state_dict())
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, 1, hidden, generator=gen).to(device)
    upstream = torch.randn(tokens, experts, generator=gen).to(device)
    times: dict[str, list[float]] = {"vanilla": [], "rectified": []}
    for i in range(repeats + 2):
        for name, router in (("vanilla", vanilla), ("rectified", rectified)):
            elapsed = _time_fwd_bwd(router, x, upstream)
            if i >= 2:  # warm-up
                times[name].append(elapsed)
    v = statistics.median(times["vanilla"])
    r = statistics.median(times["rectified"])
    return {
        "tokens": tokens,
        "experts": experts,
        "topk": topk,
        "hidden": hidden,
        "vanilla_ms": 1e3 * v,
        "rectified_ms": 1e3 * r,
        "ratio": r / v,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--experts", type=int, nargs="+", default=[8, 64])
    parser.add_argument("--topk", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    _setup_single_process()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"# router forward+backward, device={device}, threads={torch.get_num_threads()}")
    print(
        "| tokens | experts | top-k | hidden | TopKRouter ms | RectifyRouter (IR+FR) ms | ratio |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for experts in args.experts:
        for topk in args.topk:
            row = measure(args.tokens, experts, topk, args.hidden, args.repeats)
            print(
                f"| {row['tokens']} | {row['experts']} | {row['topk']} | {row['hidden']} | "
                f"{row['vanilla_ms']:.1f} | {row['rectified_ms']:.1f} | {row['ratio']:.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
