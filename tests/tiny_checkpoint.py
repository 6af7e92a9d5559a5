"""One tiny rectified training run that saves checkpoints, shared by the checkpoint tests.

Top-1 with IR+FR at capacity 1.0 (padded), alltoall, on one CPU process (gloo, CPU emulation):
20 iterations, checkpoints at 10 and 20. It is trained once per test session and kept in
pytest's base temporary folder, so the checkpoint test modules share it; tests that damage a
checkpoint work on a copy (:func:`copy_checkpoint`).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from megatron.rectify.dev.tiny_model import (
    MOCK_DATA,
    NO_EVAL,
    RECTIFIED_ROUTING,
    TINY_MODEL,
    TINY_SCHEDULE,
    TRAINING_RUN,
    subprocess_env,
)

REPO = Path(__file__).resolve().parents[1]

#: The routing of the saved run: what ``--use-checkpoint-args`` must bring back.
ROUTING = list(RECTIFIED_ROUTING)
#: Everything else: model, data, schedule (20 iterations: checkpoints at 10 and 20), logging.
BASE = [*TINY_MODEL, *TINY_SCHEDULE, *TRAINING_RUN, *MOCK_DATA, *NO_EVAL, "--cpu-emulation"]


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
        command, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=timeout
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
