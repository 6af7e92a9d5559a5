"""The rectified MoE layer over real gloo collectives (2 and 4 processes), against a
single-process plain-torch reference of the spec, against megatron's own layer when off, and
with the EP all-to-all's bytes counted."""

from __future__ import annotations

import moe_layer_cases as cases
import pytest

from megatron.rectify.dev.multiprocess import run_distributed

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

# (name, world size, layout): EP x TP(SP) x ETP and the number of experts.
LAYOUTS = {
    "ep1": (1, {"ep": 1, "experts": 4}),
    "ep2_one_local_expert": (2, {"ep": 2, "experts": 2}),
    "ep2_two_local_experts": (2, {"ep": 2, "experts": 4}),
    "ep4": (4, {"ep": 4, "experts": 4}),
    "tp2_sp": (2, {"tp": 2, "experts": 4}),
    "ep2_tp2_sp": (4, {"ep": 2, "tp": 2, "experts": 4}),
    "ep2_tp2_etp2": (4, {"ep": 2, "tp": 2, "etp": 2, "experts": 4}),
}
# (top-k, pad to capacity, mode) per layout; every layout covers top-1 and top-2 (where E
# allows), pad and no pad, and IR / FR / IR+FR.
VARIANTS = [(1, True, "ir+fr"), (2, True, "ir"), (1, False, "fr"), (2, False, "ir+fr")]


def _variants(layout: dict) -> list[tuple[int, bool, str]]:
    variants = VARIANTS
    if layout["experts"] == 2:  # top-2 of 2 experts leaves nothing to fill in or drop to
        variants = [(1, True, "ir+fr"), (1, False, "ir"), (1, True, "fr")]
    if layout.get("etp", 1) > 1:
        # megatron's own uneven all-gather over expert-TP needs padding on gloo
        variants = [(1, True, "ir+fr"), (2, True, "ir"), (2, True, "fr"), (2, True, "ir+fr")]
    return variants


GRID = [
    pytest.param(
        world,
        {**layout, "topk": k, "pad": pad, "mode": mode},
        id=f"{name}-top{k}-{'pad' if pad else 'nopad'}-{mode}",
    )
    for name, (world, layout) in LAYOUTS.items()
    for k, pad, mode in _variants(layout)
]


# Static IR (--moe-rectify-ir-capacity-factor) with a budget that binds: EP 2 (IR rows per local
# expert on each rank) and expert-TP 2 (the fixed-size IR batch all-gathered / reduce-scattered).
STATIC_IR = [
    pytest.param(
        2,
        {"ep": 2, "experts": 4, "topk": 2, "pad": True, "mode": "ir+fr", "ir_capacity_factor": 0.1},
        id="ep2_two_local_experts-top2-pad-ir+fr-static-ir",
    ),
    pytest.param(
        2,
        {
            "tp": 2,
            "etp": 2,
            "experts": 4,
            "topk": 2,
            "pad": True,
            "mode": "ir",
            "ir_capacity_factor": 0.1,
        },
        id="tp2_etp2-top2-pad-ir-static-ir",
    ),
]


def _run(fn, world: int, case: dict) -> list:
    return run_distributed(
        fn,
        world,
        tensor_model_parallel_size=case.get("tp", 1),
        expert_model_parallel_size=case.get("ep", 1),
        expert_tensor_parallel_size=case.get("etp", 1),
        timeout_s=240,
        case=case,
    )


@pytest.mark.parametrize(("world", "case"), GRID + STATIC_IR)
def test_layer_equals_the_spec_reference(world: int, case: dict) -> None:
    results = _run(cases.layer_vs_reference, world, case)
    for rank, result in enumerate(results):
        tolerance = 2e-5 * max(1.0, result["scale"])
        for name in ("output", "x_grad", "fc1", "fc2", "router"):
            assert result[name] < tolerance, f"rank {rank}: {name} off by {result[name]}"
    assert sum(r["dropped"] for r in results) > 0  # the case exercises rectification
    if "ir" in case["mode"]:
        assert sum(r["rectified"] for r in results) > 0
    if "ir_capacity_factor" in case:  # the budget binds: some IR tokens are counted, not rescued
        assert sum(r["ir_over_budget"] for r in results) > 0


@pytest.mark.parametrize(
    ("world", "case"),
    [
        pytest.param(world, {**layout, "topk": 2}, id=name)
        for name, (world, layout) in LAYOUTS.items()
        if layout["experts"] > 2
    ]
    + [pytest.param(2, {"ep": 2, "experts": 4, "topk": 1, "pad": False}, id="ep2-top1-nopad")],
)
def test_rectification_off_is_bit_identical_to_megatron(world: int, case: dict) -> None:
    for result in _run(cases.layer_vs_megatron, world, case):
        assert result["types"] == ["RectifyMoELayer", "MoERectifyAlltoAllTokenDispatcher"]
        assert all(result["identical"]), result["identical"]  # output, x, fc1, fc2, router


@pytest.mark.parametrize(
    ("world", "case"),
    [
        pytest.param(2, {"ep": 2, "experts": 4, "topk": 1, "mode": "ir+fr"}, id="ep2-top1"),
        pytest.param(4, {"ep": 4, "experts": 8, "topk": 2, "mode": "ir+fr"}, id="ep4-top2"),
    ],
)
def test_ir_plus_fr_sends_exactly_the_bytes_of_vanilla_top_k(world: int, case: dict) -> None:
    results = _run(cases.alltoall_elements_sent, world, case)
    for rank, sent in enumerate(results):
        print(
            f"rank {rank}: EP all-to-all elements sent to other ranks: vanilla "
            f"{sent['megatron']}, IR+FR {sent['rectify']} "
            f"(rectified {sent['rectified']}, filled in {sent['filled_in']})"
        )
        assert sent["rectify"] == sent["megatron"]
    assert sum(r["rectified"] for r in results) > 0 and sum(r["filled_in"] for r in results) > 0


def test_ir_without_padding_sends_no_extra_bytes() -> None:
    case = {"ep": 2, "experts": 4, "topk": 1, "mode": "ir", "pad": False}
    for sent in _run(cases.alltoall_elements_sent, 2, case):
        assert sent["rectify"] == sent["megatron"] and sent["rectified"] > 0


@pytest.mark.parametrize("topk", [1, 2])
def test_padding_does_not_change_the_result(topk: int) -> None:
    case = {"ep": 2, "experts": 4, "topk": topk, "mode": "ir+fr"}
    for result in _run(cases.pad_vs_no_pad, 2, case):
        assert result["output"] < 1e-6 and result["x_grad"] < 1e-6
