"""`make demo`: train a tiny rectified MoE GPT on the embedded corpus, save it, summarise.

CPU-only machine: 2 processes over gloo with the CPU emulation, EP = 2, a few hundred
iterations (a few minutes on 2 cores). GPU machine: every visible GPU, bf16, EP = #GPUs.
The full log goes to checkpoints/demo/train.log; the run ends with the loss curve and the
per-MoE-layer routing statistics (dropped / padded / filled-in / rectified %).
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from megatron.rectify.dev.tiny_model import RECTIFIED_ROUTING, subprocess_env  # noqa: E402

OUT = REPO / "checkpoints" / "demo"

#: Larger than the tests' tiny model (4 layers, width 128, 8 experts); the same rectified routing.
MODEL = [
    "--num-layers",
    "4",
    "--hidden-size",
    "128",
    "--num-attention-heads",
    "4",
    "--seq-length",
    "128",
    "--max-position-embeddings",
    "128",
    "--num-experts",
    "8",
    *RECTIFIED_ROUTING,
    "--moe-aux-loss-coeff",
    "0.01",
]
TRAINING = [
    "--micro-batch-size",
    "8",
    "--global-batch-size",
    "16",
    "--train-iters",
    "300",
    "--lr",
    "2e-3",
    "--min-lr",
    "2e-4",
    "--lr-decay-style",
    "cosine",
    "--lr-warmup-iters",
    "20",
    "--weight-decay",
    "0.01",
    "--clip-grad",
    "1.0",
    "--log-interval",
    "10",
    "--eval-interval",
    "100",
    "--eval-iters",
    "5",
    "--save-interval",
    "300",
    "--seed",
    "1234",
]
CPU = ["--cpu-emulation"]  # implies gloo, the local spec and no CUDA-only fusions


def main() -> int:
    gpus = torch.cuda.device_count()
    nproc = gpus if gpus else 2
    layout = ["--expert-model-parallel-size", str(nproc)]
    device_args = ["--bf16"] if gpus else CPU
    OUT.mkdir(parents=True, exist_ok=True)
    log_path = OUT / "train.log"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={nproc}",
        "--master-port=29477",
        str(REPO / "pretrain_gpt_rectify.py"),
        *MODEL,
        *TRAINING,
        *layout,
        *device_args,
        "--save",
        str(OUT),
    ]
    where = f"{gpus} GPU(s)" if gpus else "CPU (2 processes, gloo, CPU emulation: slow on purpose)"
    print(
        f"demo: training a tiny rectified MoE GPT (8 experts, top-1, IR+FR, EP={nproc}) on "
        f"the embedded corpus, {where}; log: {log_path}",
        flush=True,
    )
    env = subprocess_env(one_cpu_thread=not gpus)
    start = time.time()
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for line in process.stdout:
            log.write(line)
            if " iteration " in line and "lm loss" in line:
                match = re.search(r"iteration\s+(\d+)/\s*(\d+).*?lm loss: ([0-9.E+-]+)", line)
                if match:
                    print(
                        f"  iteration {match.group(1)}/{match.group(2)}  lm loss "
                        f"{float(match.group(3)):.3f}",
                        flush=True,
                    )
        returncode = process.wait()
    text = log_path.read_text()
    if returncode != 0:
        print("\n".join(text.splitlines()[-40:]))
        print(f"demo: training failed (exit {returncode}); full log: {log_path}")
        return returncode
    print(summary(text, time.time() - start))
    return 0


def summary(log: str, seconds: float) -> str:
    losses = [
        (int(i), float(v))
        for i, v in re.findall(r"iteration\s+(\d+)/\s*\d+ \|.*?lm loss: ([0-9.E+-]+)", log)
    ]
    lines = ["", f"demo finished in {seconds / 60:.1f} min; checkpoint: {OUT}", "loss curve:"]
    if losses:
        first, last = losses[0], losses[-1]
        lines.append(
            f"  train lm loss {first[1]:.3f} (iteration {first[0]}) -> {last[1]:.3f} "
            f"(iteration {last[0]})"
        )
    for split, value in re.findall(r"on (validation|test) set \| lm loss value: ([0-9.E+-]+)", log)[
        -2:
    ]:
        lines.append(
            f"  {split} lm loss {float(value):.3f} (perplexity {2.718281828 ** float(value):.1f})"
        )
    rates = re.findall(r"(rectify_\w+_pct): ([0-9.]+)", log)
    if rates:
        lines.append(
            "last logged routing rates (mean over MoE layers): "
            + ", ".join(f"{name.removeprefix('rectify_')} {value}" for name, value in rates[-4:])
        )
    block = log[log.rfind("rectify routing summary") :]
    if "rectify routing summary" in log:
        lines.append("routing statistics per MoE layer over training:")
        lines += [line for line in block.splitlines()[1:] if "MoE layer" in line]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
