"""End to end: ``pretrain_gpt_rectify.py`` under torchrun in CPU mode (gloo, CPU emulation).

Tiny model, mock data; each run is a real megatron training loop with the rectified MoE layers.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from megatron.rectify.dev.mode import CHECK_REPLICAS_ENV
from megatron.rectify.dev.tiny_model import (
    MOCK_DATA,
    RECTIFIED_ROUTING,
    TINY_MODEL,
    TINY_SCHEDULE,
    TRAINING_RUN,
    subprocess_env,
)

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

#: The tiny model trained with the full rectified routing; evaluation every 10 iterations for 2
#: (the runs evaluate too, and a test compares test-set losses). Extra flags come after these
#: and win.
TINY = [
    *TINY_MODEL,
    *TINY_SCHEDULE,
    *TRAINING_RUN,
    *RECTIFIED_ROUTING,
    *MOCK_DATA,
    *("--eval-interval", "10", "--eval-iters", "2"),
    "--cpu-emulation",
]


def _env() -> dict[str, str]:
    return subprocess_env(**{CHECK_REPLICAS_ENV: "1"})


def torchrun(nproc: int, *extra: str, timeout: int = 300) -> subprocess.CompletedProcess:
    from megatron.rectify.dev.multiprocess import find_free_port

    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={nproc}",
        f"--master-port={find_free_port()}",
        str(REPO / "pretrain_gpt_rectify.py"),
        *TINY,
        *extra,
    ]
    return subprocess.run(
        command, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout
    )


def losses(log: str) -> dict[int, float]:
    pattern = re.compile(r"iteration\s+(\d+)/\s*\d+ \|.*?lm loss: ([0-9.E+-]+)")
    return {int(i): float(v) for i, v in pattern.findall(log)}


def ok(run: subprocess.CompletedProcess) -> str:
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    return run.stdout + run.stderr


@pytest.fixture(scope="module")
def ep2_run() -> str:
    return ok(torchrun(2, "--expert-model-parallel-size", "2"))


def test_ep2_trains_with_falling_loss_and_logs_routing_statistics(ep2_run: str) -> None:
    loss = losses(ep2_run)
    assert sorted(loss) == list(range(1, 21))
    assert loss[20] < loss[1] - 0.3, loss
    for name in (
        "rectify_dropped_pct",
        "rectify_padded_pct",
        "rectify_filled_in_pct",
        "rectify_rectified_pct",
    ):
        assert re.search(rf"{name}: [0-9.]+", ep2_run), name
    assert "CPU emulation is ACTIVE" in ep2_run
    summary = re.findall(r"MoE layer (\d): dropped ([0-9.]+) % \| padded ([0-9.]+) %", ep2_run)
    assert [layer for layer, _, _ in summary] == ["1", "2"], ep2_run[-2000:]
    # EP=2 on 2 ranks: dense weights are replicated over DP=2 and must still agree.
    assert ep2_run.count("data-parallel replicas hold identical weights") == 2


def test_checkpoint_resume_reproduces_the_uninterrupted_run(ep2_run: str, tmp_path: Path) -> None:
    checkpoint = str(tmp_path / "ckpt")
    first = ok(
        torchrun(
            2,
            "--expert-model-parallel-size",
            "2",
            "--save",
            checkpoint,
            "--save-interval",
            "10",
            "--exit-interval",
            "10",
        )
    )
    assert max(losses(first)) == 10
    resumed = losses(ok(torchrun(2, "--expert-model-parallel-size", "2", "--load", checkpoint)))
    uninterrupted = losses(ep2_run)
    assert sorted(resumed) == list(range(11, 21))
    # NOTE: iteration 12's *logged* loss has differed by ~0.3 % in some runs while every later
    # iteration (hence the parameters) matched exactly; see the issue notes.
    for iteration in range(11, 21):
        assert resumed[iteration] == pytest.approx(uninterrupted[iteration], rel=5e-3)
    assert [resumed[i] for i in range(13, 21)] == [uninterrupted[i] for i in range(13, 21)]


def test_four_processes_tensor_sequence_and_expert_parallel() -> None:
    """TP=2 + SP + EP=2 (ETP=1): the local spec's norm must work under sequence parallelism
    (megatron's torch fallback refuses it) and its gradients must be summed over TP, which the
    replica check (norm weights compared across the TP group) verifies. With the allgather
    dispatcher (megatron's choice with TP and few experts), rectified ir+fr."""
    log = ok(
        torchrun(
            4,
            "--tensor-model-parallel-size",
            "2",
            "--sequence-parallel",
            "--expert-model-parallel-size",
            "2",
            "--expert-tensor-parallel-size",
            "1",
            "--moe-token-dispatcher-type",
            "allgather",
            "--train-iters",
            "12",
        )
    )
    loss = losses(log)
    assert loss[12] < loss[1] - 0.2, loss
    assert log.count("replicas hold identical weights") == 4
    rectified = [float(v) for v in re.findall(r"rectify_rectified_pct: ([0-9.]+)", log)]
    assert rectified and max(rectified) > 0, log[-2000:]


def test_four_processes_pipeline_and_expert_parallel() -> None:
    log = ok(
        torchrun(
            4,
            "--pipeline-model-parallel-size",
            "2",
            "--expert-model-parallel-size",
            "2",
            "--train-iters",
            "12",
        )
    )
    loss = losses(log)
    assert loss[12] < loss[1]


def _single(*extra: str) -> subprocess.CompletedProcess:
    """Argument checks run before any process group exists: a plain python call suffices."""
    command = [sys.executable, str(REPO / "pretrain_gpt_rectify.py"), *TINY, *extra]
    return subprocess.run(
        command, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        # megatron's own bare assert, made readable:
        (["--save", "/nonexistent/checkpoints"], "args.save_interval is not None"),
        (["--moe-token-dispatcher-type", "flex"], "--moe-token-dispatcher-type alltoall or allg"),
        # one line: the first problem (the other, 3 experts over 2 EP ranks, comes after it)
        (["--num-experts", "3", "--expert-model-parallel-size", "2"], "does not fit 1 processes"),
        (["--moe-rectify-ir-trigger", "any"], "--moe-rectify-ir-trigger"),
        (
            ["--moe-rectify", "none", "--moe-rectify-eval", "ir"]
            + ["--moe-expert-capacity-factor", "8"],
            "--moe-rectify-eval ir:",
        ),
    ],
)
def test_bad_flags_exit_early_with_a_message(extra: list[str], message: str) -> None:
    run = _single(*extra)
    assert run.returncode == 2, run.stderr[-2000:]
    error = run.stderr.strip().splitlines()[-1]
    assert error.startswith("pretrain_gpt_rectify.py: error:"), run.stderr[-2000:]
    assert message in error
    assert "Traceback" not in run.stderr


def test_fill_in_without_capacity_is_refused() -> None:
    command = [
        sys.executable,
        str(REPO / "pretrain_gpt_rectify.py"),
        *[a for a in TINY if a not in ("--moe-pad-expert-input-to-capacity",)],
    ]
    index = command.index("--moe-expert-capacity-factor")
    del command[index : index + 2]
    run = subprocess.run(command, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert "--moe-expert-capacity-factor" in run.stderr.strip().splitlines()[-1]


def test_help_lists_the_rectify_flags() -> None:
    run = subprocess.run(
        [sys.executable, str(REPO / "pretrain_gpt_rectify.py"), "--help"],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0
    for flag in (
        "--moe-rectify ",
        "--moe-rectify-ir-trigger",
        "--moe-rectify-fill-in-candidates",
        "--no-moe-rectify-straight-through",
        "--moe-rectify-eval",
        "--cpu-emulation",
    ):
        assert flag in run.stdout, flag


def _test_set_loss(log: str) -> float:
    match = re.search(r"on test set \| lm loss value: ([0-9.E+-]+)", log)
    assert match, log[-3000:]
    return float(match.group(1))


def test_ep2_checkpoint_loads_with_ep1_and_gives_the_same_loss(tmp_path: Path) -> None:
    """megatron's distributed checkpoint reshards experts from EP=2 to EP=1.

    Fill-in rectification only: its result does not depend on the EP layout. Intra-GPU
    rectification does by design (a dropped token goes to the best expert *of its own rank*), so
    an IR model evaluated under another EP layout is a different function; see docs/routing.md.
    """
    checkpoint = str(tmp_path / "ckpt")
    saved = ok(
        torchrun(
            2,
            "--expert-model-parallel-size",
            "2",
            "--moe-rectify",
            "fr",
            "--train-iters",
            "10",
            "--save",
            checkpoint,
            "--save-interval",
            "10",
        )
    )
    loaded = ok(
        torchrun(
            1,
            "--expert-model-parallel-size",
            "1",
            "--moe-rectify",
            "fr",
            "--train-iters",
            "10",
            "--load",
            checkpoint,
            "--skip-train",
            "--no-load-optim",
            "--no-load-rng",
        )
    )
    assert _test_set_loss(loaded) == _test_set_loss(saved)
