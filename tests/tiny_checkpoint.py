"""One tiny rectified training run that saves checkpoints, shared by the checkpoint tests.

Top-1 with IR+FR at capacity 1.0 (padded), alltoall, on one CPU process (gloo, CPU emulation):
20 iterations, checkpoints at 10 and 20. It is trained once per test session and kept in
pytest's base temporary folder, so the checkpoint test modules share it; tests that damage a
checkpoint work on a copy (:func:`copy_checkpoint`).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

#: The routing of the saved run: what ``--use-checkpoint-args`` must bring back.
ROUTING = [
    "--moe-router-topk", "1",
    "--moe-router-pre-softmax",
    "--moe-expert-capacity-factor", "1.0",
    "--moe-pad-expert-input-to-capacity",
    "--moe-token-dispatcher-type", "alltoall",
    "--moe-rectify", "ir+fr",
    "--moe-rectify-ir-trigger", "ignore_kth",
]  # fmt: skip
#: Everything else: model, data, schedule, logging.
BASE = [
    "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
    "--seq-length", "64", "--max-position-embeddings", "64",
    "--micro-batch-size", "4", "--global-batch-size", "8", "--train-iters", "20",
    "--lr", "1e-3", "--min-lr", "1e-4", "--lr-decay-style", "cosine", "--lr-warmup-iters", "2",
    "--num-experts", "4", "--moe-aux-loss-coeff", "0.01",
    "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "256",
    "--hidden-dropout", "0", "--attention-dropout", "0",
    "--log-interval", "1", "--eval-interval", "1000", "--eval-iters", "0",
    "--cpu-emulation",
]  # fmt: skip


def env() -> dict[str, str]:
    return {
        **os.environ,
        "CUDA_DEVICE_MAX_CONNECTIONS": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
    }


def pretrain(*args: str, torchrun: bool = True, timeout: int = 300) -> subprocess.CompletedProcess:
    """``pretrain_gpt_rectify.py *args``: under torchrun (one process), or as a plain python
    call for runs that must stop before megatron starts."""
    from megatron.rectify.dev.multiprocess import find_free_port

    launcher = [sys.executable]
    if torchrun:
        launcher += [
            "-m",
            "torch.distributed.run",
            "--nproc-per-node=1",
            f"--master-port={find_free_port()}",
        ]
    command = [*launcher, str(REPO / "pretrain_gpt_rectify.py"), *args]
    return subprocess.run(
        command, cwd=REPO, env=env(), capture_output=True, text=True, timeout=timeout
    )


def ok(run: subprocess.CompletedProcess) -> str:
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    return run.stdout + run.stderr


def losses(log: str) -> dict[int, float]:
    pattern = re.compile(r"iteration\s+(\d+)/\s*\d+ \|.*?lm loss: ([0-9.E+-]+)")
    return {int(i): float(v) for i, v in pattern.findall(log)}


def saved_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The checkpoint folder (iterations 10 and 20; the tracker names 20) and the run's log,
    trained on first use in this test session."""
    folder = tmp_path_factory.getbasetemp() / "tiny-rectified-run"
    checkpoint, log_file = folder / "checkpoint", folder / "train.log"
    if not log_file.is_file():
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        log = ok(pretrain(*BASE, *ROUTING, "--save", str(checkpoint), "--save-interval", "10"))
        assert sorted(losses(log)) == list(range(1, 21)), log[-3000:]
        log_file.write_text(log)
    return checkpoint, log_file.read_text()


def copy_checkpoint(checkpoint: Path, destination: Path) -> Path:
    shutil.copytree(checkpoint, destination)
    return destination
