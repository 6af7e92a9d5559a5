"""Forward+backward time of one rectified MoE layer (IR+FR) over megatron's own MoE layer.

Both layers run in the same processes, on the same weights and tokens, with the same capacity;
their timings alternate so machine noise hits both alike. Expert parallelism over N processes
(gloo + the CPU emulation on CPU machines; NCCL on GPUs, one process per GPU).

    python benchmarks/moe_layer_overhead.py                       # 2 processes, EP=2
    python benchmarks/moe_layer_overhead.py --tokens 2048 --topk 2 --no-pad
    torchrun --nproc-per-node 8 benchmarks/moe_layer_overhead.py --ep 8 --bf16 --te

Prints one markdown table row per setting: vanilla ms, rectified ms, ratio (median of repeats,
rank 0; every rank waits at a barrier before each timed call).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch


def _layer(config, use_te: bool):
    from megatron.core.models.gpt import gpt_layer_specs

    from megatron.rectify import layer_specs

    if use_te:
        vanilla = gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(
            num_experts=config.num_moe_experts, moe_grouped_gemm=True
        )
    else:
        vanilla = gpt_layer_specs.get_gpt_layer_local_spec(
            num_experts=config.num_moe_experts, moe_grouped_gemm=False
        )
    return vanilla, layer_specs.rectify_layer_spec(vanilla)


def _config(args, rectify: str):
    from megatron.rectify.config import RectifyTransformerConfig

    return RectifyTransformerConfig(
        num_layers=1,
        hidden_size=args.hidden,
        ffn_hidden_size=args.ffn,
        moe_ffn_hidden_size=args.ffn,
        num_attention_heads=8,
        num_moe_experts=args.experts,
        moe_router_topk=args.topk,
        moe_router_pre_softmax=args.topk == 1,
        moe_token_dispatcher_type="alltoall",
        moe_expert_capacity_factor=args.capacity_factor,
        moe_pad_expert_input_to_capacity=not args.no_pad,
        moe_grouped_gemm=args.te,
        moe_aux_loss_coeff=0.0,
        moe_rectify=rectify,
        moe_rectify_ir_trigger="ignore_kth",
        expert_model_parallel_size=args.ep,
        add_bias_linear=False,
        bf16=args.bf16,
        params_dtype=torch.bfloat16 if args.bf16 else torch.float32,
        use_cpu_initialization=True,
    )


def _time_once(layer, x: torch.Tensor, upstream: torch.Tensor) -> float:
    x = x.detach().requires_grad_()
    torch.distributed.barrier()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    output, _ = layer(x)
    (output * upstream).sum().backward()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def bench(rank: int, world_size: int, args: argparse.Namespace) -> dict:
    from megatron.core import parallel_state

    device = (
        torch.device("cuda", torch.cuda.current_device())
        if torch.cuda.is_available()
        else (torch.device("cpu"))
    )
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    vanilla_spec, rectified_spec = _layer(_config(args, "none"), args.te)
    torch.manual_seed(1)
    vanilla = vanilla_spec.submodules.mlp(config=_config(args, "none"), layer_number=1).to(device)
    rectified = rectified_spec.submodules.mlp(config=_config(args, "ir+fr"), layer_number=1).to(
        device
    )
    rectified.load_state_dict(vanilla.state_dict())
    gen = torch.Generator().manual_seed(100 + parallel_state.get_expert_model_parallel_rank())
    x = torch.randn(args.tokens, 1, args.hidden, generator=gen).to(device, dtype)
    upstream = torch.randn(args.tokens, 1, args.hidden, generator=gen).to(device, dtype)
    times: dict[str, list[float]] = {"vanilla": [], "rectified": []}
    for i in range(args.repeats + 2):
        for name, layer in (("vanilla", vanilla), ("rectified", rectified)):
            elapsed = _time_once(layer, x, upstream)
            if i >= 2:
                times[name].append(elapsed)
    stats = rectified.router.statistics().as_percentages()
    v, r = statistics.median(times["vanilla"]), statistics.median(times["rectified"])
    return {"vanilla_ms": 1e3 * v, "rectified_ms": 1e3 * r, "ratio": r / v, **stats}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ep", type=int, default=2, help="expert-parallel size (= processes)")
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per rank")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--ffn", type=int, default=1024)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--topk", type=int, default=1)
    parser.add_argument("--capacity-factor", type=float, default=1.0)
    parser.add_argument("--no-pad", action="store_true")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--te", action="store_true", help="Transformer-Engine spec, grouped GEMM")
    return parser.parse_args(argv)


def _print(args: argparse.Namespace, row: dict, device: str) -> None:
    print(f"# one MoE layer forward+backward, EP={args.ep}, device={device}")
    print(
        "| tokens/rank | hidden | experts | top-k | capacity | pad | megatron ms | "
        "rectified (IR+FR) ms | ratio | dropped % | filled-in % | rectified % |"
    )
    print("|---:|---:|---:|---:|---:|:-:|---:|---:|---:|---:|---:|---:|")
    print(
        f"| {args.tokens} | {args.hidden} | {args.experts} | {args.topk} | "
        f"{args.capacity_factor} | {'yes' if not args.no_pad else 'no'} | "
        f"{row['vanilla_ms']:.1f} | {row['rectified_ms']:.1f} | {row['ratio']:.2f} | "
        f"{row['dropped_pct']:.1f} | {row['filled_in_pct']:.1f} | {row['rectified_pct']:.1f} |",
        flush=True,
    )


def main() -> None:
    args = parse_args()
    if "RANK" in os.environ:  # launched by torchrun: one process per GPU
        from megatron.core import parallel_state

        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        torch.distributed.init_process_group("nccl")
        parallel_state.initialize_model_parallel(expert_model_parallel_size=args.ep)
        row = bench(torch.distributed.get_rank(), torch.distributed.get_world_size(), args)
        if torch.distributed.get_rank() == 0:
            _print(args, row, torch.cuda.get_device_name())
        parallel_state.destroy_model_parallel()
        torch.distributed.destroy_process_group()
        return
    from megatron.rectify.testing.multiprocess import run_distributed

    rows = run_distributed(
        bench, args.ep, expert_model_parallel_size=args.ep, timeout_s=3000, args=args
    )
    _print(args, rows[0], "cpu (gloo, CPU emulation)")


if __name__ == "__main__":
    main()
