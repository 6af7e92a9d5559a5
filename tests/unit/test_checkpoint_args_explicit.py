"""Which routing flags count as given on the command line when resuming from a checkpoint
(megatron's parser in-process, no training). The resume runs are in
tests/distributed/test_checkpoint_args_restore.py.
"""

from __future__ import annotations

import argparse
import sys

from megatron.rectify.training.checkpoint_args import apply_checkpoint_routing, explicit_options


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


def test_the_static_ir_budget_comes_from_the_checkpoint_unless_given() -> None:
    saved = argparse.Namespace(moe_rectify="ir", moe_rectify_ir_capacity_factor=0.25)
    args = _parsed([])
    assert apply_checkpoint_routing(args, saved, dict(vars(args)), explicit_options([])) == []
    assert args.moe_rectify_ir_capacity_factor == 0.25  # which IR tokens are rescued: restored
    argv = ["--moe-rectify-ir-capacity-factor", "0.5"]
    args = _parsed(argv)
    notes = apply_checkpoint_routing(args, saved, dict(vars(args)), explicit_options(argv))
    assert notes == ["--moe-rectify-ir-capacity-factor 0.5 overrides the checkpoint's 0.25"]
    assert args.moe_rectify_ir_capacity_factor == 0.5
    argv = ["--moe-rectify-ir-capacity-factor", "dynamic"]  # the only way back to dynamic IR
    args = _parsed(argv)
    notes = apply_checkpoint_routing(args, saved, dict(vars(args)), explicit_options(argv))
    assert notes == ["--moe-rectify-ir-capacity-factor dynamic overrides the checkpoint's 0.25"]
    assert args.moe_rectify_ir_capacity_factor is None
