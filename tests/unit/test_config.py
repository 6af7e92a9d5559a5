"""Impossible rectify settings fail early, with a message that names the flag and the fix."""

from __future__ import annotations

import pytest

from megatron.rectify.config import (
    RectifyConfigError,
    RectifyOptions,
    RectifyTransformerConfig,
)

BASE = dict(
    num_layers=1,
    hidden_size=16,
    num_attention_heads=4,
    num_moe_experts=8,
    moe_router_topk=2,
    moe_expert_capacity_factor=1.0,
    moe_aux_loss_coeff=0.0,
    use_cpu_initialization=True,
)


def make(**overrides) -> RectifyTransformerConfig:
    return RectifyTransformerConfig(**{**BASE, **overrides})


@pytest.mark.parametrize(
    ("overrides", "flag"),
    [
        ({"moe_rectify": "ir", "moe_expert_capacity_factor": None}, "--moe-expert-capacity-factor"),
        ({"moe_rectify": "fr", "moe_expert_capacity_factor": None}, "--moe-expert-capacity-factor"),
        ({"moe_rectify": "ir", "moe_expert_capacity_factor": 4.0}, "--moe-expert-capacity-factor"),
        ({"moe_rectify": "ir+fr", "moe_rectify_ir_trigger": "any"}, "--moe-rectify-ir-trigger"),
        ({"moe_rectify": "ir", "moe_rectify_ir_trigger": "some"}, "--moe-rectify-ir-trigger"),
        (
            {"moe_rectify": "fr", "moe_rectify_fill_in_candidates": "all"},
            "--moe-rectify-fill-in-candidates",
        ),
        ({"moe_rectify": "irfr"}, "--moe-rectify"),
        (
            {
                "moe_rectify": "ir",
                "moe_router_load_balancing_type": "sinkhorn",
                "moe_router_topk": 1,
            },
            "--moe-router-load-balancing-type",
        ),
        ({"moe_rectify": "fr", "moe_router_topk": 8}, "--moe-router-topk"),
        ({"moe_rectify": "ir", "moe_enable_routing_replay": True}, "--moe-enable-routing-replay"),
        # static IR: the budget must be a positive number (whatever the mode)
        ({"moe_rectify": "ir", "moe_rectify_ir_capacity_factor": 0.0}, "--moe-rectify-ir-capacity"),
        ({"moe_rectify": "ir", "moe_rectify_ir_capacity_factor": -1}, "--moe-rectify-ir-capacity"),
        (
            {"moe_rectify": "none", "moe_rectify_ir_capacity_factor": float("nan")},
            "--moe-rectify-ir-capacity-factor",
        ),
    ],
)
def test_bad_combinations_name_the_flag(overrides: dict, flag: str) -> None:
    with pytest.raises(RectifyConfigError) as error:
        make(**overrides)
    assert flag in str(error.value)


def test_good_combinations_validate() -> None:
    config = make(moe_rectify="ir+fr", moe_rectify_ir_trigger="ignore_kth")
    assert config.rectify_options == RectifyOptions(
        intra_gpu=True, fill_in=True, ir_trigger="ignore_kth"
    )
    assert not make().rectify_options.enabled
    # Dropless MoE without rectification stays allowed.
    assert not make(moe_expert_capacity_factor=None).rectify_options.enabled


def test_options_from_mode() -> None:
    assert RectifyOptions.from_mode("ir") == RectifyOptions(intra_gpu=True)
    assert RectifyOptions.from_mode("fr") == RectifyOptions(fill_in=True)
    assert not RectifyOptions.from_mode("none").enabled


def test_one_table_gives_the_choices_the_literals_and_the_check() -> None:
    import dataclasses
    import typing

    from megatron.rectify import config

    assert config.RECTIFY_MODES == typing.get_args(config.RectifyMode)
    assert config.RECTIFY_EVAL_MODES == ("train", *config.RECTIFY_MODES)
    fields = {f.name: f.type for f in dataclasses.fields(RectifyOptions)}
    assert fields["ir_trigger"] == "IntraGpuTrigger"  # the field is typed with the Literal
    for flag, choice in config.CHOICES.items():
        for value in choice.values:
            config.check_choice(flag, value)
        with pytest.raises(RectifyConfigError, match=f"unknown {choice.name} 'x' \\({flag}\\)"):
            config.check_choice(flag, "x")


def test_options_from_settings_with_an_evaluation_mode() -> None:
    import argparse

    from megatron.rectify.config import rectify_options_from_config

    args = argparse.Namespace(
        moe_rectify="none",
        moe_rectify_ir_trigger="ignore_kth",
        moe_rectify_fill_in_candidates="any",
        moe_rectify_straight_through=False,
        moe_token_drop_policy="position",
    )
    evaluation = rectify_options_from_config(args, mode="ir+fr")
    assert evaluation == RectifyOptions(True, True, "ignore_kth", "any", False, "position")
    training = rectify_options_from_config(args)  # the run's own mode: none
    assert training == RectifyOptions(False, False, "ignore_kth", "any", False, "position")


@pytest.mark.parametrize(
    ("rectify", "evaluate", "dispatcher", "flag"),
    [
        ("ir", "train", "flex", "--moe-rectify ir"),
        ("none", "fr", "flex", "--moe-rectify-eval fr"),
        ("none", "none", "flex", None),
        ("none", "train", "flex", None),
        ("ir+fr", "ir", "alltoall", None),
        ("ir+fr", "ir", "allgather", None),
        ("fr", "train", "allgather", None),
    ],
)
def test_rectifying_needs_alltoall_or_allgather(
    rectify: str, evaluate: str, dispatcher: str, flag
) -> None:
    import argparse

    from megatron.rectify.config import dispatcher_problem

    args = argparse.Namespace(
        moe_rectify=rectify, moe_rectify_eval=evaluate, moe_token_dispatcher_type=dispatcher
    )
    problem = dispatcher_problem(args)
    if flag is None:
        assert problem is None
    else:
        assert problem.startswith(
            f"{flag} needs --moe-token-dispatcher-type alltoall or allgather (got 'flex'): "
        )
        assert "DeepEP" in problem and "HybridEP" in problem
