"""``--use-checkpoint-args`` restores the routing, not only the architecture (issue 16, item 3).

megatron-core 0.19.2's ``load_args_from_checkpoint`` leaves out capacity, padding, dispatcher
and every ``--moe-rectify*`` flag: a run resumed with it and no routing flags became dropless,
unrectified, allgather - a different model - and exited 0. An explicit flag still wins, with a
note when it differs from the checkpoint.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest
from tiny_checkpoint import BASE, copy_checkpoint, losses, ok, pretrain, saved_run

from megatron.rectify.training.checkpoint_args import apply_checkpoint_routing, explicit_options

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
        "--moe-token-dispatcher-type", "allgather",  # differs from the checkpoint: a note
        "--moe-rectify-ir-trigger", "ignore_kth",  # as in the checkpoint: silent
        torchrun=False,
    )  # fmt: skip
    notes = [line for line in run.stderr.splitlines() if ": note: " in line]
    assert notes == [
        "pretrain_gpt_rectify.py: note: --moe-token-dispatcher-type allgather overrides the "
        "checkpoint's alltoall"
    ], run.stderr[-3000:]
    # the explicit allgather won, and --moe-rectify ir+fr came from the checkpoint: refused
    assert run.returncode == 2, run.stderr[-3000:]
    error = run.stderr.strip().splitlines()[-1]
    assert error.startswith("pretrain_gpt_rectify.py: error: --moe-rectify ir+fr needs")
    assert "--moe-token-dispatcher-type alltoall" in error
    errors = [line for line in run.stderr.splitlines() if ": error: " in line]
    assert len(errors) == 1, run.stderr[-3000:]
    assert "Traceback" not in run.stderr


def _parsed(argv: list[str]) -> argparse.Namespace:
    """argv parsed by megatron's parser with ours, as ``parse_and_validate_args`` does."""
    from megatron.training.arguments import parse_args

    from megatron.rectify.training import add_rectify_args

    saved, sys.argv = sys.argv, ["pretrain_gpt_rectify.py", *argv]
    try:
        return parse_args(add_rectify_args)
    finally:
        sys.argv = saved


def test_explicit_means_parsed_from_the_command_line_not_a_word_in_it() -> None:
    argv = [
        "--moe-rectify-eval", "ir",  # a prefix of --moe-rectify: not --moe-rectify
        "--moe-rectify=none",  # explicit although it is the default
        "--no-moe-rectify-straight-through",
        "--moe-router-load-balancing-type", "aux_loss",
    ]  # fmt: skip
    explicit = explicit_options(argv)
    assert {"moe_rectify", "moe_rectify_eval", "moe_rectify_straight_through"} <= set(explicit)
    assert "moe_expert_capacity_factor" not in explicit
    args = _parsed(argv)
    saved = argparse.Namespace(
        moe_rectify="ir+fr",
        moe_rectify_eval="train",
        moe_rectify_straight_through=True,
        moe_expert_capacity_factor=1.0,
        moe_token_dispatcher_type="alltoall",
        moe_router_load_balancing_type="aux_loss",  # a string in the checkpoint, a list here
    )
    given = dict(vars(args))
    notes = apply_checkpoint_routing(args, saved, given, explicit)
    assert notes == [
        "--moe-rectify none overrides the checkpoint's ir+fr",
        "--no-moe-rectify-straight-through overrides the checkpoint's "
        "moe_rectify_straight_through=True",
        "--moe-rectify-eval ir overrides the checkpoint's train",
    ]
    assert (args.moe_rectify, args.moe_rectify_eval) == ("none", "ir")  # explicit wins
    assert args.moe_rectify_straight_through is False
    assert args.moe_expert_capacity_factor == 1.0  # not given: the checkpoint's
    assert args.moe_token_dispatcher_type == "alltoall"
