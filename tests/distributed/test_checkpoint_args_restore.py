"""``--use-checkpoint-args`` restores the routing, not only the architecture (issue 16, item 3).

megatron-core 0.19.2's ``load_args_from_checkpoint`` leaves out capacity, padding, dispatcher
and every ``--moe-rectify*`` flag: a run resumed with it and no routing flags became dropless,
unrectified, allgather - a different model - and exited 0. An explicit flag still wins, with a
note when it differs from the checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny_checkpoint import BASE, copy_checkpoint, losses, ok, pretrain, saved_run

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    return saved_run(tmp_path_factory)


def test_resuming_with_checkpoint_args_and_no_routing_flags_continues_the_same_run(
    trained: tuple[Path, str], tmp_path: Path
) -> None:
    checkpoint, log = trained
    at_ten = copy_checkpoint(checkpoint, tmp_path / "ckpt")
    (at_ten / "latest_checkpointed_iteration.txt").write_text("10")
    resumed_log = ok(pretrain(*BASE, "--use-checkpoint-args", "--load", str(at_ten)))
    resumed, uninterrupted = losses(resumed_log), losses(log)
    assert sorted(resumed) == list(range(11, 21)), resumed_log[-3000:]
    # capacity, dispatcher and rectification as saved: the run continues as if uninterrupted
    # (dropless allgather without rectification gives other losses)
    for iteration in range(11, 21):
        assert resumed[iteration] == pytest.approx(uninterrupted[iteration], rel=5e-3), iteration
    for statistic in ("rectify_rectified_pct", "rectify_filled_in_pct", "rectify_padded_pct"):
        assert statistic in resumed_log, statistic
    assert "note:" not in resumed_log  # nothing was given explicitly, so nothing overridden


def test_an_explicit_flag_wins_with_a_note_when_it_differs(trained: tuple[Path, str]) -> None:
    checkpoint, _ = trained
    run = pretrain(
        *BASE,
        "--use-checkpoint-args",
        "--load", str(checkpoint),
        "--moe-token-dispatcher-type", "flex",  # differs from the checkpoint: a note
        "--moe-rectify-ir-trigger", "ignore_kth",  # as in the checkpoint: silent
        torchrun=False,
    )  # fmt: skip
    notes = [line for line in run.stderr.splitlines() if ": note: " in line]
    assert notes == [
        "pretrain_gpt_rectify.py: note: --moe-token-dispatcher-type flex overrides the "
        "checkpoint's alltoall"
    ], run.stderr[-3000:]
    # the explicit flex won, and --moe-rectify ir+fr came from the checkpoint: refused
    assert run.returncode == 2, run.stderr[-3000:]
    error = run.stderr.strip().splitlines()[-1]
    assert error.startswith("pretrain_gpt_rectify.py: error: --moe-rectify ir+fr needs")
    assert "--moe-token-dispatcher-type alltoall or allgather (got 'flex')" in error
    errors = [line for line in run.stderr.splitlines() if ": error: " in line]
    assert len(errors) == 1, run.stderr[-3000:]
    assert "Traceback" not in run.stderr


def test_fine_tuning_from_a_pretrained_checkpoint_restores_its_args(
    trained: tuple[Path, str], tmp_path: Path
) -> None:
    """``--use-checkpoint-args --pretrained-checkpoint DIR`` with a fresh ``--load`` folder: the
    first run of a fine-tuning job, megatron's order (pretrained args, then --load's, which has
    none yet). Our restore once demanded --load and refused."""
    checkpoint, log = trained
    fresh = tmp_path / "finetune"
    run_log = ok(
        pretrain(
            *BASE,
            "--use-checkpoint-args",
            "--pretrained-checkpoint", str(checkpoint),
            "--load", str(fresh),
            "--train-iters", "3",
        )
    )  # fmt: skip
    assert "attempting to finetune with checkpoint in" in run_log, run_log[-3000:]
    tuned, trained_losses = losses(run_log), losses(log)
    assert sorted(tuned) == [1, 2, 3], run_log[-3000:]  # fine-tuning starts at iteration 1
    # the pretrained weights were loaded: the first loss is the trained model's, not a new one's
    assert abs(tuned[1] - trained_losses[20]) < abs(tuned[1] - trained_losses[1]), (tuned, log)
    # and the routing came with the args (without it: dropless allgather, no rectification)
    for statistic in ("rectify_rectified_pct", "rectify_filled_in_pct", "rectify_padded_pct"):
        assert statistic in run_log, statistic
