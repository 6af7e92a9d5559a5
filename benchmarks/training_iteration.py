"""Full training iteration time: rectified (IR+FR) vs vanilla megatron routing.

Runs ``pretrain_gpt_rectify.py`` twice in one invocation - ``--moe-rectify none`` then
``ir+fr`` - with the same model, data, seed and layout, and compares megatron's own
"elapsed time per iteration" (mean over the last logged window, after warm-up).

    python benchmarks/training_iteration.py            # CPU: 2 processes, EP=2, CPU emulation
    python benchmarks/training_iteration.py --gpus 8   # GPUs, bf16
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(rectify: str, nproc: int, gpus: bool, iters: int) -> tuple[float, str]:
    from megatron.rectify.testing.multiprocess import find_free_port

    device = ["--bf16"] if gpus else ["--cpu-emulation"]
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={nproc}",
        f"--master-port={find_free_port()}",
        str(REPO / "pretrain_gpt_rectify.py"),
        *device,
        "--num-layers",
        "4",
        "--hidden-size",
        "256",
        "--num-attention-heads",
        "4",
        "--seq-length",
        "256",
        "--max-position-embeddings",
        "256",
        "--micro-batch-size",
        "8",
        "--global-batch-size",
        str(8 * nproc),
        "--train-iters",
        str(iters),
        "--lr",
        "1e-3",
        "--log-interval",
        str(iters // 2),
        "--eval-iters",
        "1",
        "--eval-interval",
        str(iters),
        "--num-experts",
        "8",
        "--moe-router-topk",
        "1",
        "--moe-router-pre-softmax",
        "--moe-expert-capacity-factor",
        "1.0",
        "--moe-pad-expert-input-to-capacity",
        "--moe-token-dispatcher-type",
        "alltoall",
        "--moe-aux-loss-coeff",
        "0.01",
        "--expert-model-parallel-size",
        str(nproc),
        "--moe-rectify",
        rectify,
        "--moe-rectify-ir-trigger",
        "ignore_kth",
    ]
    result = subprocess.run(
        command,
        cwd=REPO,
        capture_output=True,
        text=True,
        env={
            "CUDA_DEVICE_MAX_CONNECTIONS": "1",
            "OMP_NUM_THREADS": "1",
            **dict(__import__("os").environ),
        },
    )
    times = re.findall(r"elapsed time per iteration \(ms\): ([0-9.]+)", result.stdout)
    if result.returncode or not times:
        raise SystemExit(result.stdout[-3000:] + result.stderr[-3000:])
    rates = re.findall(r"(rectify_(?:dropped|filled_in|rectified)_pct): ([0-9.]+)", result.stdout)
    return float(times[-1]), ", ".join(f"{n.removeprefix('rectify_')} {v}" for n, v in rates[-3:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, default=0)
    parser.add_argument("--iters", type=int, default=40)
    args = parser.parse_args()
    nproc = args.gpus or 2
    vanilla, _ = run("none", nproc, bool(args.gpus), args.iters)
    rectified, rates = run("ir+fr", nproc, bool(args.gpus), args.iters)
    print("| layout | vanilla ms/iter | IR+FR ms/iter | ratio | IR+FR routing |")
    print("|---|---:|---:|---:|---|")
    print(
        f"| EP={nproc}, {'GPU bf16' if args.gpus else 'CPU gloo'}, 4 layers, hidden 256, "
        f"8 experts, top-1, cf 1.0, pad | {vanilla:.1f} | {rectified:.1f} | "
        f"{rectified / vanilla:.2f} | {rates} |"
    )


if __name__ == "__main__":
    main()
