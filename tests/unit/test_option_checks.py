"""megatron MoE options against rectification (``megatron/rectify/training/option_checks.py``):
each refused combination gives one line naming the flag and the fix, and the allowed ones go
through ``rectify_arg_problems`` with no problem. Arguments are megatron's own parse (its
parser plus the rectify flags), as ``pretrain_gpt_rectify.py`` checks them before megatron's
``validate_args``. The behaviour behind each decision is tested in
``tests/unit/test_option_behaviour.py``.
"""

from __future__ import annotations

import sys

import pytest

from megatron.rectify.config import IR_CAPACITY_FLAG
from megatron.rectify.dev.tiny_model import TINY_MODEL, TINY_SCHEDULE

PROG = "pretrain_gpt_rectify.py"
#: The tiny model and schedule with this module's own routing (top-2 at capacity 1.0, alltoall,
#: no rectify flags: each test adds its own); megatron's parse only, so no data or CPU flags.
BASE = [
    *TINY_MODEL, *TINY_SCHEDULE,
    "--moe-router-topk", "2", "--moe-expert-capacity-factor", "1.0",
    "--moe-token-dispatcher-type", "alltoall",
]  # fmt: skip
OVERLAP = ["--overlap-moe-expert-parallel-comm", "--expert-model-parallel-size", "2", "--bf16"]
PAD = "--moe-pad-expert-input-to-capacity"
QUANT_PAD = "--moe-router-padding-for-quantization"
FP8 = ["--fp8-format", "e4m3"]

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]

#: CUDA-graph settings whose graphs hold the MoE router, as (id, flags, partial MoE graph).
ROUTER_GRAPHS = [
    ("te-whole-layer", ["--cuda-graph-impl", "transformer_engine"], False),
    ("local-moe", ["--cuda-graph-impl", "local", "--cuda-graph-modules", "moe"], False),
    ("full-iteration", ["--cuda-graph-impl", "full_iteration"], False),
    ("deprecated-enable", ["--enable-cuda-graph"], False),
    ("deprecated-scope", ["--cuda-graph-scope", "full_iteration"], False),
    (
        "te-router",
        ["--cuda-graph-impl", "transformer_engine", "--cuda-graph-modules", "moe_router"],
        True,
    ),
    (
        "te-router-preprocess",
        [
            "--cuda-graph-impl",
            "transformer_engine",
            "--cuda-graph-modules",
            "moe_router",
            "moe_preprocess",
        ],
        True,
    ),  # fmt: skip
    (
        "local-attn-router",
        ["--cuda-graph-impl", "local", "--cuda-graph-modules", "attn", "moe_router"],
        True,
    ),
    ("deprecated-external", ["--external-cuda-graph", "--cuda-graph-scope", "moe_router"], True),
]
#: CUDA graphs that leave the MoE layer out: every mode may use them.
ATTENTION_GRAPHS = [
    ["--cuda-graph-impl", "local", "--cuda-graph-modules", "attn"],
    ["--cuda-graph-impl", "transformer_engine", "--cuda-graph-modules", "attn"],
    ["--cuda-graph-scope", "full_iteration_inference"],  # megatron's inference graphs only
]


@pytest.fixture(scope="module")
def parse():
    """``parse(*flags, world_size=1)``: megatron's parse of BASE + flags, not validated.

    megatron's ``parse_args`` builds its parser (about a thousand flags) on every call; this
    builds it once, the same way (megatron's flags, then the rectify flags), and takes
    ``rank`` / ``world_size`` as ``parse_args`` does from the launcher's environment.
    """
    import argparse

    from megatron.training.arguments import add_megatron_arguments

    from megatron.rectify.training.args import add_rectify_args

    parser = argparse.ArgumentParser(description="Megatron-LM Arguments", allow_abbrev=False)
    parser = add_rectify_args(add_megatron_arguments(parser))

    def run(*flags: str, world_size: int = 1):
        args = parser.parse_args([*BASE, *flags])
        args.rank, args.world_size = 0, world_size
        return args

    return run


@pytest.fixture
def problems(parse):
    """``problems(*flags, world_size=1, **attributes)``: ``rectify_arg_problems`` of the parse,
    with ``attributes`` set on the parsed arguments first."""
    from megatron.rectify.training.args import rectify_arg_problems

    def run(*flags: str, world_size: int = 1, **attributes) -> list[str]:
        args = parse(*flags, world_size=world_size)
        for name, value in attributes.items():
            setattr(args, name, value)
        found = rectify_arg_problems(args)
        assert all("\n" not in line for line in found), found
        return found

    return run


def _mode(mode: str, eval_mode: str | None = None) -> list[str]:
    flags = ["--moe-rectify", mode]
    if mode == "ir+fr" or eval_mode == "ir+fr":
        flags += ["--moe-rectify-ir-trigger", "ignore_kth"]
    if eval_mode is not None:
        flags += ["--moe-rectify-eval", eval_mode]
    return flags


# ---- CUDA graphs -------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["ir", "ir+fr"])
@pytest.mark.parametrize(
    ("graph", "partial"), [c[1:] for c in ROUTER_GRAPHS], ids=[c[0] for c in ROUTER_GRAPHS]
)
def test_ir_in_a_cuda_graph_holding_the_router_is_refused(
    problems, mode: str, graph: list[str], partial: bool
) -> None:
    (line,) = problems(*_mode(mode), *graph)
    assert line.startswith(f"--moe-rectify {mode} with CUDA graphs holding the MoE router (")
    assert (
        "IR's side batch has a data-dependent size; use --moe-rectify fr with CUDA graphs" in line
    )
    assert IR_CAPACITY_FLAG in line and "--cuda-graph-modules attn" in line
    assert ("with the whole MoE layer in the graph" in line) == partial  # what static IR needs
    assert graph[0] in line  # the flags as the user gave them


@pytest.mark.parametrize(
    ("graph", "partial"), [c[1:] for c in ROUTER_GRAPHS], ids=[c[0] for c in ROUTER_GRAPHS]
)
def test_static_ir_lifts_the_refusal_where_the_graph_holds_the_whole_moe_layer(
    problems, graph: list[str], partial: bool
) -> None:
    found = problems(*_mode("ir+fr"), *graph, moe_rectify_ir_capacity_factor=0.5)
    if not partial:
        assert found == []
        return
    (line,) = found
    assert line.startswith(f"--moe-rectify ir+fr with {IR_CAPACITY_FLAG} and ")
    assert "Python state" in line and "--cuda-graph-modules moe" in line


@pytest.mark.parametrize("mode", ["none", "fr", "ir", "ir+fr"])
@pytest.mark.parametrize("graph", ATTENTION_GRAPHS, ids=lambda flags: "-".join(flags[1::2]))
def test_graphs_without_the_moe_layer_are_fine_in_every_mode(problems, mode, graph) -> None:
    assert problems(*_mode(mode), *graph) == []


@pytest.mark.parametrize("pad", [[], [PAD]], ids=["unpadded", "padded"])
@pytest.mark.parametrize("graph", [c[1] for c in ROUTER_GRAPHS], ids=[c[0] for c in ROUTER_GRAPHS])
def test_fr_is_allowed_in_every_cuda_graph(problems, graph: list[str], pad: list[str]) -> None:
    assert problems(*_mode("fr"), *graph, *pad) == []
    assert problems(*_mode("none"), *graph, *pad) == []  # megatron's own


def test_transformer_engine_graphs_leave_evaluation_eager(problems) -> None:
    """TE graphs are training-only: an IR evaluation mode runs eagerly next to FR graphs."""
    graph = ["--cuda-graph-impl", "transformer_engine", "--cuda-graph-modules", "moe_router"]
    assert problems(*_mode("fr", eval_mode="ir+fr"), *graph) == []
    assert problems(*_mode("none", eval_mode="ir"), *graph) == []


def test_ir_evaluation_in_a_full_iteration_graph_is_refused(problems) -> None:
    """full_iteration captures a validation graph too, with the evaluation mode in it."""
    (line,) = problems(*_mode("fr", eval_mode="ir+fr"), "--cuda-graph-impl", "full_iteration")
    assert line.startswith("--moe-rectify-eval ir+fr with CUDA graphs holding the MoE router")
    assert "use --moe-rectify-eval fr with CUDA graphs" in line
    assert problems(*_mode("ir+fr", eval_mode="fr"), "--cuda-graph-impl", "full_iteration") != []
    assert problems(*_mode("none", eval_mode="fr"), "--cuda-graph-impl", "full_iteration") == []


@pytest.mark.parametrize(("mode", "eval_mode"), [("fr", "none"), ("none", "fr"), ("fr", "ir+fr")])
def test_local_graphs_refuse_an_evaluation_mode_they_would_not_run(problems, mode, eval_mode):
    graph = ["--cuda-graph-impl", "local", "--cuda-graph-modules", "moe_router"]
    (line,) = problems(*_mode(mode, eval_mode=eval_mode), *graph)
    assert line.startswith(f"--moe-rectify-eval {eval_mode} with local CUDA graphs holding")
    assert f"would route as --moe-rectify {mode}" in line
    assert "--cuda-graph-impl transformer_engine" in line and "drop --moe-rectify-eval" in line
    assert problems(*_mode(mode, eval_mode="train"), *graph) == []
    assert problems(*_mode(mode, eval_mode=mode), *graph) == []


# ---- EP communication overlap ------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["ir", "ir+fr"])
@pytest.mark.parametrize(
    "wgrad", [[], ["--delay-wgrad-compute"]], ids=["no-delay-wgrad", "delay-wgrad"]
)
def test_ir_with_the_overlapped_ep_schedule_is_refused(problems, mode, wgrad) -> None:
    (line,) = problems(*_mode(mode), *OVERLAP, *wgrad, world_size=2)
    assert line.startswith(f"--moe-rectify {mode} with --overlap-moe-expert-parallel-comm: ")
    assert "Use --moe-rectify fr with the overlap" in line
    assert line.endswith(
        "drop --overlap-moe-expert-parallel-comm"
        + (" and --delay-wgrad-compute." if wgrad else ".")
    )


@pytest.mark.parametrize(
    "wgrad", [[], ["--delay-wgrad-compute"]], ids=["no-delay-wgrad", "delay-wgrad"]
)
@pytest.mark.parametrize("pad", [[], [PAD]], ids=["unpadded", "padded"])
def test_fr_with_the_overlapped_ep_schedule_is_allowed(problems, wgrad, pad) -> None:
    assert problems(*_mode("fr"), *OVERLAP, *wgrad, *pad, world_size=2) == []
    # evaluation passes are forward-only: megatron runs them without the node split
    assert problems(*_mode("fr", eval_mode="ir+fr"), *OVERLAP, *wgrad, world_size=2) == []
    assert problems(*_mode("none", eval_mode="ir"), *OVERLAP, *wgrad, world_size=2) == []


# ---- routing-map padding for FP8 / FP4 ---------------------------------------------------------


@pytest.mark.parametrize("mode", ["fr", "ir", "ir+fr"])
def test_quantization_padding_with_padding_to_capacity_is_refused(problems, mode) -> None:
    found = problems(*_mode(mode), *FP8, QUANT_PAD, PAD)
    line = found[0]
    assert line.startswith(f"{QUANT_PAD} with {PAD} and --moe-rectify {mode}: ")
    assert line.endswith("megatron's experts pad each expert's rows for FP8/FP4 themselves.")
    assert len(found) == (2 if "ir" in mode else 1)  # IR's own problem is listed too


@pytest.mark.parametrize("mode", ["ir", "ir+fr"])
@pytest.mark.parametrize("padding", [QUANT_PAD, "--moe-router-padding-for-fp8"])
def test_ir_with_quantization_padding_is_refused(problems, mode, padding) -> None:
    (line,) = problems(*_mode(mode), *FP8, padding)
    assert line.startswith(f"--moe-rectify {mode} with {padding}: ")
    assert "unaligned splits" in line and f"Drop {padding}" in line
    assert line.endswith("or use --moe-rectify fr.")
    (line,) = problems(*_mode("fr", eval_mode=mode), *FP8, padding)  # the dispatcher pads in
    assert line.startswith(f"--moe-rectify-eval {mode} with {padding}: ")  # evaluation too


def test_fr_with_quantization_padding_is_allowed(problems) -> None:
    assert problems(*_mode("fr"), *FP8, QUANT_PAD) == []
    assert problems(*_mode("none"), *FP8, QUANT_PAD, PAD) == []  # megatron's own


# ---- allowed everywhere ------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["fr", "ir", "ir+fr"])
@pytest.mark.parametrize(
    "flags",
    [
        ["--moe-permute-fusion"],
        ["--moe-permute-fusion", PAD],
        ["--moe-router-fusion"],
        ["--moe-router-fusion", "--moe-permute-fusion", PAD],
        FP8,
        [*FP8, PAD],
        ["--fp4-format", "e2m1"],
    ],
    ids=lambda flags: "-".join(f.strip("-") for f in flags if f.startswith("--")),
)
def test_fusions_and_fp8_are_allowed_in_every_mode(problems, mode, flags) -> None:
    assert problems(*_mode(mode), *flags) == []
    assert problems(*_mode("none", eval_mode=mode), *flags) == []


# ---- the command line --------------------------------------------------------------------------


def test_the_script_stops_with_one_line(monkeypatch, capsys) -> None:
    """Through ``parse_and_validate_args``: exit 2 and one ``pretrain_gpt_rectify.py: error:``
    line, before megatron's own validation."""
    import megatron.training.global_vars as megatron_globals

    from megatron.rectify.dev.mode import CPU_EMULATION_DEFAULT_ARGS
    from megatron.rectify.training import parse_and_validate_args

    monkeypatch.setattr(megatron_globals, "set_global_variables", lambda *a, **k: None)
    flags = [*_mode("ir"), *OVERLAP, "--mock-data", "--tokenizer-type", "NullTokenizer"]
    argv = [PROG, *CPU_EMULATION_DEFAULT_ARGS, *BASE, *flags, "--vocab-size", "256"]
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(SystemExit) as exited:
        parse_and_validate_args(training_data=True)
    err = capsys.readouterr().err
    assert exited.value.code == 2
    errors = [line for line in err.splitlines() if line.startswith(f"{PROG}: error: ")]
    assert errors == [err.strip().splitlines()[-1]], err[-2000:]
    assert errors[0].startswith(
        f"{PROG}: error: --moe-rectify ir with --overlap-moe-expert-parallel-comm: "
    )


@pytest.mark.parametrize("mode", ["fr", "ir", "ir+fr"])
def test_gate_weights_on_the_input_are_refused_with_rectification(problems, mode: str) -> None:
    (line,) = problems(*_mode(mode), "--moe-apply-probs-on-input")
    assert f"--moe-rectify {mode} with --moe-apply-probs-on-input" in line
    assert problems(*_mode("none"), "--moe-apply-probs-on-input") == []
