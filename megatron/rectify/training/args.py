"""The command line of ``pretrain_gpt_rectify.py`` (and of the checkpoint tools, which parse
the same flags): the ``--moe-rectify*`` flags added next to megatron's own through its
``extra_args_provider`` hook, and the parse -> check -> validate sequence that turns a bad
combination into one line naming the flag (exit 2) before anything is built.

Owns: the rectify flags (:func:`add_rectify_args`), their checks (:func:`rectify_arg_problems`),
the evaluation-pass options (:func:`eval_rectify_options`), the embedded-corpus default when a
run names no data, and :func:`parse_and_validate_args`. ``--load`` / ``--use-checkpoint-args``
are :mod:`megatron.rectify.training.checkpoint_args`'s.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from megatron.rectify.config import (
    FILL_IN_CANDIDATES,
    IR_TRIGGERS,
    RECTIFY_EVAL_MODES,
    RECTIFY_MODES,
    RectifyConfigError,
    RectifyOptions,
    dispatcher_problem,
    ir_capacity_factor_problem,
    parse_ir_capacity_factor,
    rectify_options_from_config,
    rectifying_modes,
    validate_rectify_settings,
)
from megatron.rectify.dev.mode import (
    CPU_EMULATION_DEFAULT_ARGS,
    CPU_EMULATION_ENV,
    CPU_EMULATION_FLAG,
)
from megatron.rectify.training.option_checks import (
    environment_problems,
    megatron_option_problems,
)


def add_rectify_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The Rectify-Router flags, in their own group of megatron's ``--help``."""
    group = parser.add_argument_group(title="rectify-router (megatron-rectify)")
    group.add_argument(
        "--moe-rectify",
        choices=RECTIFY_MODES,
        default="none",
        help="Rectify top-k routing after capacity truncation: ir = Intra-GPU Rectification "
        "(dropped tokens go to the best expert on their own GPU), fr = Fill-in Rectification "
        "(padding slots take the best unrouted tokens), ir+fr = both. Needs "
        "--moe-expert-capacity-factor and --moe-token-dispatcher-type alltoall or allgather "
        "(not flex).",
    )
    group.add_argument(
        "--moe-rectify-ir-trigger",
        choices=IR_TRIGGERS,
        default="all",
        help="Which tokens IR rescues: all = every top-k choice dropped (and no fill-in slot "
        "won); any / ignore_kth = at least one top-k choice dropped (ignore_kth is the "
        "setting for ir+fr).",
    )
    group.add_argument(
        "--moe-rectify-fill-in-candidates",
        choices=FILL_IN_CANDIDATES,
        default="next",
        help="Fill-in candidates: next = only each token's (k+1)-th choice; any = any expert "
        "outside its top-k.",
    )
    group.add_argument(
        "--moe-rectify-ir-capacity-factor",
        type=parse_ir_capacity_factor,
        default=None,
        metavar="F",
        help="Static IR: give each local expert a fixed B = ceil(tokens * top-k / experts * F) "
        "IR rows per layer call (megatron's capacity formula with F), filled by the tokens "
        "that lost the most top-k choices, then by probability. Trades lost tokens for speed: "
        "tokens beyond the budget are not rescued (counted as lost / ir_over_budget), but IR "
        "adds no host sync and its shapes are static (CUDA-graph capturable). Default: dynamic "
        "IR, every triggered token rescued, 4 host syncs per layer call; 'dynamic' asks for it "
        "explicitly (e.g. over a checkpoint's budget with --use-checkpoint-args). Needs ir in "
        "--moe-rectify (or --moe-rectify-eval).",
    )
    group.add_argument(
        "--no-moe-rectify-straight-through",
        dest="moe_rectify_straight_through",
        action="store_false",
        help="Ablation: back-propagate through the gate-weight denominator (a token with one "
        "surviving choice then gives the router no gradient).",
    )
    group.add_argument(
        "--moe-rectify-eval",
        choices=RECTIFY_EVAL_MODES,
        default="train",
        help="Rectification during evaluation passes only (train = as in training). Measured "
        "here (docs/results.md): it helps an upcycled Top-1 trained with gate weight 1 (IR "
        "-0.027 held-out loss), does nothing from scratch, and HURTS a model trained with "
        "megatron's p-weighted Top-1 (+0.12 to +0.38): the rectified router also changes every "
        "token's gate weight from p to 1.",
    )
    group.add_argument(
        "--eval-data-seed",
        type=int,
        default=None,
        help="Seed of the validation and test sample order (default: --seed, megatron's "
        "behaviour). Fixing it gives runs with different --seed the same held-out batches, so "
        "their losses differ by the model only, not by which held-out sequences were drawn.",
    )
    group.add_argument(
        CPU_EMULATION_FLAG,
        action="store_true",
        help=f"Run on a machine without GPUs through megatron-rectify's CPU emulation layer "
        f"(gloo). Slow; for development and CI only. Same as {CPU_EMULATION_ENV}=1. Implies "
        f"{' '.join(CPU_EMULATION_DEFAULT_ARGS)}.",
    )
    from megatron.rectify.megatron_patches import escape_unformattable_help

    escape_unformattable_help(parser)
    return parser


class _ArgsAsConfig:
    """Read CLI args under ``TransformerConfig`` names (``--num-experts`` -> num_moe_experts)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self._args = args

    def __getattr__(self, name: str) -> Any:
        if name == "num_moe_experts":
            return self._args.num_experts
        return getattr(self._args, name)


def rectify_arg_problems(args: argparse.Namespace) -> list[str]:
    """Everything wrong with the rectify-related flags, as messages naming flag and fix."""
    topk = args.moe_router_topk
    if args.num_experts and not 1 <= topk <= args.num_experts:  # the checks below assume it
        return [
            f"--moe-router-topk {topk} is out of range for --num-experts {args.num_experts}: set "
            f"it between 1 and {args.num_experts} (the number of experts each token is routed to)."
        ]
    problem = ir_capacity_factor_problem(args)  # one line: the other checks may repeat it
    if problem:
        return [problem]
    problems = []
    try:
        validate_rectify_settings(_ArgsAsConfig(args))
    except RectifyConfigError as error:
        problems.append(str(error))
    # megatron-core 0.19.2 finds this only in initialize_model_parallel, as a RuntimeError on
    # every rank; args.world_size is megatron's reading of WORLD_SIZE (1 without a launcher).
    expert_grid = (
        args.expert_model_parallel_size
        * (args.expert_tensor_parallel_size or args.tensor_model_parallel_size)
        * args.pipeline_model_parallel_size
        * (getattr(args, "expert_gtp_weight_remat_size", None) or 1)
    )
    if args.world_size % expert_grid:
        problems.append(
            f"--expert-model-parallel-size {args.expert_model_parallel_size} does not fit "
            f"{args.world_size} processes (WORLD_SIZE): expert-model x expert-tensor x pipeline "
            f"parallel sizes = {expert_grid} must divide the number of processes. Launch a "
            f"multiple of {expert_grid} processes or lower --expert-model-parallel-size."
        )
    if args.num_experts is not None and args.num_experts % args.expert_model_parallel_size:
        problems.append(
            f"--num-experts {args.num_experts} is not divisible by "
            f"--expert-model-parallel-size {args.expert_model_parallel_size}: every EP rank "
            "must hold the same number of experts."
        )
    expert_tp = args.expert_tensor_parallel_size or args.tensor_model_parallel_size
    if args.num_experts and args.add_bias_linear and expert_tp > 1:
        # megatron-core 0.19.2 asserts this in TransformerConfig.__post_init__, at model build.
        problems.append(
            f"expert tensor parallel size {expert_tp} (--expert-tensor-parallel-size, default "
            "--tensor-model-parallel-size) with expert biases: megatron-core supports MoE "
            "biases only at expert-TP 1. Add --disable-bias-linear or set "
            "--expert-tensor-parallel-size 1."
        )
    if args.num_experts and args.moe_router_topk == 1 and not args.moe_router_pre_softmax:
        problems.append(
            "--moe-router-topk 1 needs --moe-router-pre-softmax (megatron-core refuses top-1 "
            "without it: a softmax over the one chosen logit is always 1 and trains no router)."
        )
    rectifying = rectifying_modes(args)  # {flag: mode} of --moe-rectify / --moe-rectify-eval
    dispatcher = dispatcher_problem(args)
    if dispatcher:
        problems.append(dispatcher)
    if "--moe-rectify" not in rectifying and rectifying and args.num_experts is None:
        # (--moe-rectify itself is checked by validate_rectify_settings above)
        problems.append(
            f"--moe-rectify-eval {rectifying['--moe-rectify-eval']} needs an MoE model: set "
            "--num-experts."
        )
    if "--moe-rectify-eval" in rectifying and args.num_experts is not None:
        try:
            validate_rectify_settings(_EvalModeArgs(args))
        except RectifyConfigError as error:
            problems.append(str(error).replace("--moe-rectify ", "--moe-rectify-eval "))
    problems.extend(megatron_option_problems(args))  # training/option_checks.py
    return problems


class _EvalModeArgs(_ArgsAsConfig):
    def __getattr__(self, name: str) -> Any:
        if name == "moe_rectify":
            return self._args.moe_rectify_eval
        return super().__getattr__(name)


def eval_rectify_options(args: argparse.Namespace) -> RectifyOptions | None:
    """Options for evaluation passes, or None when they are the training ones."""
    if args.moe_rectify_eval == "train":
        return None
    return rectify_options_from_config(args, mode=args.moe_rectify_eval)


def parse_and_validate_args(
    args_defaults: dict | None = None,
    build_tokenizer: bool = True,
    prog: str = "pretrain_gpt_rectify.py",
    training_data: bool = False,
) -> argparse.Namespace:
    """megatron's parse -> our checks (exit 2 with a message) -> megatron's validation.

    ``training_data`` (``pretrain_gpt_rectify.py``, not the checkpoint tools): a run given no
    data source trains on the embedded corpus, and the data it names is checked (prefixes exist,
    files are whole, every split megatron builds has tokens) before anything is built.
    """
    from megatron.training.arguments import parse_args, validate_args
    from megatron.training.global_vars import set_global_variables

    from megatron.rectify.data.checks import data_source_problem
    from megatron.rectify.megatron_patches import (
        install_byte_level_tokenizer,
        mirrored_argument_sequence,
    )

    mirrored_argument_sequence()  # this function follows megatron's own: same version?
    install_byte_level_tokenizer()  # --tokenizer-type ByteLevel; before megatron's parser exists
    args_defaults = args_defaults or {}
    yaml_problem = yaml_cfg_problem(sys.argv[1:])
    if yaml_problem:  # before megatron's parse_args, which replaces the args by the YAML's
        print(f"{prog}: error: {yaml_problem}", file=sys.stderr)
        sys.exit(2)
    args = parse_args(add_rectify_args)
    _restore_model_args_from_checkpoint(args, prog)
    _stop_on_the_first(rectify_arg_problems(args), prog)
    if training_data:
        _default_to_the_embedded_corpus(args)
    try:
        validate_args(args, args_defaults)
    except AssertionError as error:  # megatron's checks are bare asserts: say which one failed
        print(
            f"{prog}: error: megatron argument check failed: {_failed_assertion(error)}",
            file=sys.stderr,
        )
        sys.exit(2)
    problems = environment_problems(args) or transformer_config_problems(args)
    if training_data:
        problems += [p for p in [data_source_problem(args)] if p]  # needs validate's --split
    _stop_on_the_first(problems, prog)
    set_global_variables(args, build_tokenizer=build_tokenizer)
    return args


def _stop_on_the_first(problems: list[str], prog: str) -> None:
    """Exit 2 with ONE line, the first problem (the checks list the most basic first: a fix for
    it often changes the others), as argparse stops on its first error."""
    if problems:
        print(f"{prog}: error: {problems[0]}", file=sys.stderr)
        sys.exit(2)


def transformer_config_problems(args: argparse.Namespace) -> list[str]:
    """The model's ``TransformerConfig`` built once before start-up: megatron-core 0.19.2
    checks many settings only in ``TransformerConfig.__post_init__`` (e.g. a fusion whose
    kernels are missing), i.e. when each rank builds its model, as a traceback on every rank.
    Its message, as one line, instead."""
    from megatron.training.argument_utils import core_transformer_config_from_args

    from megatron.rectify.config import RectifyTransformerConfig

    if args.num_experts is None:  # a dense model: the recipe builds it without MoE settings
        return []
    try:
        core_transformer_config_from_args(args, RectifyTransformerConfig)
    except (ValueError, AssertionError) as error:
        message = " ".join(str(error).split()) or _failed_assertion(error)
        return [f"megatron's TransformerConfig refuses these settings: {message}"]
    return []


def yaml_cfg_problem(argv: list[str]) -> str | None:
    """``--yaml-cfg``: refused, because megatron-core 0.19.2's experimental YAML mode cannot
    train a GPT, with or without rectification. Its ``load_yaml`` replaces every command-line
    flag by the file's nested namespace, and its ``validate_yaml`` skips derivations that the
    training loop relies on (``main_grads_dtype`` stays the string ``"fp32"``, so megatron's own
    ``OptimizerConfig`` refuses it). A canary test (tests/unit/test_yaml_cfg.py) runs megatron's
    YAML path on a complete file of the tiny model and fails when megatron fixes this."""
    if not any(arg == "--yaml-cfg" or arg.startswith("--yaml-cfg=") for arg in argv):
        return None
    return (
        "--yaml-cfg is not supported: megatron-core's experimental YAML mode ignores every "
        "command-line flag and leaves settings underived (main_grads_dtype stays a string), so "
        "megatron's own optimizer set-up fails. Put the settings on the command line, e.g. "
        "`pretrain_gpt_rectify.py $(cat my_args.txt)`."
    )


def _restore_model_args_from_checkpoint(args: argparse.Namespace, prog: str) -> None:
    """``--load`` before megatron starts: the tracker file checked, ``--use-checkpoint-args``
    (architecture and routing) restored, unreadable checkpoint files reported in one line; see
    :mod:`megatron.rectify.training.checkpoint_args`."""
    from megatron.rectify.training.checkpoint_args import prepare_checkpoint_load

    prepare_checkpoint_load(args, prog)


def _failed_assertion(error: AssertionError) -> str:
    """The assertion's message, or its source line when it has none."""
    import traceback

    if str(error):
        return str(error)
    frame = traceback.extract_tb(error.__traceback__)[-1]
    return f"`{frame.line}` ({os.path.basename(frame.filename)}:{frame.lineno})"


def _default_to_the_embedded_corpus(args: argparse.Namespace) -> None:
    """With no data source at all, train on the embedded corpus (Python's standard library,
    byte-level tokens; built once and cached), with its ``--split`` and ``--tokenizer-type
    ByteLevel`` unless the user gave them.

    Decided from the parsed arguments, so every spelling of a data flag (``--data-path=P``,
    ``--train-data-path``, ``--data-args-path``, ``--per-split-data-args-path``,
    ``--mock-data``) counts; megatron's ``validate_args`` then sees the data as if given.
    """
    from megatron.rectify.data import (
        BYTE_LEVEL_TOKENIZER_TYPE,
        EMBEDDED_CORPUS_SPLIT,
        ensure_embedded_corpus,
    )

    sources = (
        args.data_path,
        args.data_args_path,
        args.train_data_path,
        args.valid_data_path,
        args.test_data_path,
        args.per_split_data_args_path,
    )
    if args.mock_data or any(source is not None for source in sources):
        return
    args.data_path = [ensure_embedded_corpus()]
    if args.split is None:
        args.split = EMBEDDED_CORPUS_SPLIT
    if args.tokenizer_type is None:
        args.tokenizer_type = BYTE_LEVEL_TOKENIZER_TYPE
