"""``--load`` and ``--use-checkpoint-args`` for ``pretrain_gpt_rectify.py`` and the checkpoint
tools: what is checked before megatron starts, what a resumed run takes from the checkpoint, and
how a checkpoint that cannot be read is reported.

* :func:`check_load_dir` - an empty or garbled ``latest_checkpointed_iteration.txt``, or one
  naming a folder that is not there, stops the run before start-up with one line naming the
  file and the fix (megatron-core 0.19.2 prints ERROR and exits 0 without training).
* :func:`restore_args_from_checkpoint` - megatron's ``load_args_from_checkpoint`` rebuilds the
  architecture but not the routing: a run resumed with ``--use-checkpoint-args`` and no routing
  flags would silently become dropless, unrectified, allgather. The settings of
  :data:`CHECKPOINT_ROUTING_ARGS` are restored too. A flag given explicitly on the command line
  wins (switching rectification on for fine-tuning is legitimate), with one note line when it
  differs from the checkpoint's value.
* :func:`install_load_guard` - a checkpoint file that cannot be read (truncated or garbled
  shard) stops the run with one line naming the file and the newest earlier iteration whose
  files are complete, instead of megatron's traceback (the wrapper of megatron's
  ``load_checkpoint`` is :func:`megatron.rectify.megatron_patches.guard_checkpoint_loading`;
  the diagnosis is here).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

#: Model-defining args that megatron's ``--use-checkpoint-args`` does not restore but that change
#: the network's output: a model trained with ``--norm-epsilon 1e-6`` must not be rebuilt with
#: 1e-5. The checkpoint's value always wins (as for megatron's own architecture args).
EXTRA_CHECKPOINT_MODEL_ARGS = ("layernorm_epsilon", "make_vocab_size_divisible_by")

#: The routing: which expert each token goes to, with what weight, and which tokens are dropped
#: or rectified. megatron-core 0.19.2's ``load_args_from_checkpoint`` restores only some of them
#: (topk, pre-softmax, score function, top-k scaling: forcibly, over the command line) and never
#: the dispatcher (its ``_set_arg(force=False)`` keeps any non-None default, and allgather is
#: one). Restored here, with an explicit command-line flag winning:
CHECKPOINT_ROUTING_ARGS = (
    # the Rectify-Router's flags (training and evaluation passes)
    "moe_rectify",
    "moe_rectify_ir_trigger",
    "moe_rectify_fill_in_candidates",
    "moe_rectify_straight_through",
    "moe_rectify_eval",
    "moe_rectify_ir_capacity_factor",  # static IR's budget: which IR tokens are rescued
    # capacity: which tokens are dropped, and padding (what fill-in rectification fills)
    "moe_expert_capacity_factor",
    "moe_pad_expert_input_to_capacity",
    "moe_token_drop_policy",
    # the dispatcher: rectification needs alltoall or allgather (IR's "own GPU": the EP rank)
    "moe_token_dispatcher_type",
    # the routing function
    "moe_router_topk",
    "moe_router_pre_softmax",
    "moe_router_score_function",
    "moe_router_topk_scaling_factor",
    "moe_router_num_groups",
    "moe_router_group_topk",
    "moe_router_load_balancing_type",  # sinkhorn / quantile balancing route differently
    "moe_router_dtype",  # precision of the routing scores decides near ties
)
# Not restored, on purpose: loss coefficients (--moe-aux-loss-coeff, --moe-z-loss-coeff,
# --moe-router-bias-update-rate) and --moe-input-jitter-eps are optimisation hyperparameters
# like --lr, which a resumed or fine-tuning run states itself; --moe-router-enable-expert-bias,
# --moe-grouped-gemm, --moe-shared-expert-* define parameters and megatron restores them;
# flex-dispatcher settings (--moe-expert-rank-capacity-factor, --moe-flex-*) are backend choices
# of the machine, and rectification does not run on that dispatcher.

_ROUTING_FROM_CHECKPOINT = [True]


@contextlib.contextmanager
def architecture_only() -> Iterator[None]:
    """``--use-checkpoint-args`` restores the architecture only, not the routing: for tools
    that need the weights (export) or define the routing themselves (verify: dropless unless
    the caller gives a capacity)."""
    _ROUTING_FROM_CHECKPOINT.append(False)
    try:
        yield
    finally:
        _ROUTING_FROM_CHECKPOINT.pop()


def _fail(prog: str, message: str) -> NoReturn:
    print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def prepare_checkpoint_load(args: argparse.Namespace, prog: str) -> None:
    """Everything about ``--load`` / ``--pretrained-checkpoint`` that must happen before
    megatron starts, in megatron's own order (its ``parse_and_validate_args``): the folders
    checked, then ``--use-checkpoint-args`` from the pretrained checkpoint and then from
    ``--load``."""
    check_load_dir(args, prog)
    check_pretrained_dir(args, prog)
    if args.use_checkpoint_args:
        restore_args_from_checkpoint(args, prog)
    if args.load is not None or getattr(args, "pretrained_checkpoint", None) is not None:
        install_load_guard(prog)


# ---- the tracker file -------------------------------------------------------------------------


def check_load_dir(args: argparse.Namespace, prog: str) -> None:
    """Refuse an unusable ``latest_checkpointed_iteration.txt`` (or ``--ckpt-step``) in
    ``--load`` before start-up. A missing tracker is fine: megatron starts from scratch, the
    usual first run of a ``--save DIR --load DIR`` job."""
    from megatron.rectify.checkpoint.errors import CheckpointToolError
    from megatron.rectify.checkpoint.layout import (
        iteration_folder_name,
        missing_iteration_message,
        read_tracker,
        saved_iterations,
    )

    load = getattr(args, "load", None)
    if load is None:
        return
    try:
        marker = read_tracker(load)
    except CheckpointToolError as error:
        _fail(prog, str(error))
    step = getattr(args, "ckpt_step", None)
    if step:
        folder = Path(load) / iteration_folder_name(step)
        if not folder.is_dir():
            saved = ", ".join(str(i) for i in saved_iterations(load)[-5:]) or "none"
            _fail(prog, f"--ckpt-step {step}: {folder} does not exist (saved here: {saved})")
        problem = torch_format_ckpt_step_problem(args, marker)
        if problem:
            _fail(prog, problem)
    elif marker is not None and not (Path(load) / iteration_folder_name(marker)).is_dir():
        _fail(prog, missing_iteration_message(load, marker))
    elif marker is None and getattr(args, "exit_on_missing_checkpoint", False):
        # megatron-core 0.19.2 (checkpointing._load_base_checkpoint) prints a warning and calls
        # a bare sys.exit(): exit status 0 for a job that did not train.
        _fail(
            prog,
            f"--exit-on-missing-checkpoint: no checkpoint in --load {load} (no "
            "latest_checkpointed_iteration.txt): check the path, or drop "
            "--exit-on-missing-checkpoint to start from scratch.",
        )
    if step or marker is not None:  # the folder megatron will load
        problem = distributed_optimizer_resume_problem(
            args, Path(load) / iteration_folder_name(step or marker)
        )
        if problem:
            _fail(prog, problem)


def torch_format_ckpt_step_problem(args: argparse.Namespace, marker: str | None) -> str | None:
    """``--ckpt-step`` of a ``--ckpt-format torch`` checkpoint with
    ``--use-distributed-optimizer``, other than the iteration the tracker file names: refused,
    because megatron-core 0.19.2's ``load_checkpoint`` reads the distributed optimizer's file
    (``distrib_optim.pt``) of the tracker's iteration and then reports that iteration as the one
    loaded, so the run would resume with the model of one step, the optimizer state of another
    and a wrong iteration count, silently (seen on CPU: ``--ckpt-step 2`` next to a tracker
    naming 4 loaded "at iteration 4")."""
    step = getattr(args, "ckpt_step", None)
    if not step or marker == str(step):
        return None
    if not getattr(args, "use_distributed_optimizer", False):
        return None
    if getattr(args, "ckpt_format", None) != "torch":
        return None
    return (
        f"--ckpt-step {step} with --use-distributed-optimizer and --ckpt-format torch: "
        "megatron-core loads the distributed optimizer state of the iteration "
        f"latest_checkpointed_iteration.txt names ({marker}), not of step {step}. Write {step} "
        f"into {Path(args.load) / 'latest_checkpointed_iteration.txt'} instead of passing "
        "--ckpt-step."
    )


def distributed_optimizer_resume_problem(
    args: argparse.Namespace, folder: Path, have_apex_or_te: bool | None = None
) -> str | None:
    """Resuming ``--use-distributed-optimizer`` from the ``torch_dist`` checkpoint ``folder``
    with torch's own Adam (no Transformer Engine or Apex; ``have_apex_or_te``: megatron's
    finding, read from megatron when None): refused. megatron-core 0.19.2 first builds the
    optimizer's sharded state dict, whose ``DistributedOptimizer.state_dict`` asserts one
    ``step`` over the per-parameter states of torch's Adam, which has none before its first
    step: every rank stops with a bare AssertionError after start-up. (Giving torch's Adam an
    empty state first gets past it, but the step count then stays 0 after the load and the
    resumed run silently diverges: seen on CPU.) ``--ckpt-format torch`` checkpoints resume
    correctly (``megatron_patches.fix_distributed_optimizer_loading``)."""
    if not getattr(args, "use_distributed_optimizer", False):
        return None
    if getattr(args, "no_load_optim", False) or getattr(args, "finetune", False):
        return None
    if getattr(args, "optimizer", "adam") != "adam":
        return None
    if not (folder / "metadata.json").is_file():  # not torch_dist, or nothing to resume
        return None
    if have_apex_or_te is None:
        from megatron.core.optimizer.distrib_optimizer import HAVE_APEX_OR_TE

        have_apex_or_te = HAVE_APEX_OR_TE
    if have_apex_or_te:
        return None
    return (
        f"--use-distributed-optimizer resuming from the torch_dist checkpoint {folder} without "
        "Transformer Engine or Apex: megatron-core cannot rebuild torch Adam's optimizer state "
        "for that load (DistributedOptimizer.state_dict asserts on it). Resume from a "
        "checkpoint saved with --ckpt-format torch, add --no-load-optim (weights only), or "
        "drop --use-distributed-optimizer."
    )


def check_pretrained_dir(args: argparse.Namespace, prog: str) -> None:
    """``--pretrained-checkpoint DIR`` (fine-tuning): megatron loads it when ``--load`` holds
    no checkpoint yet, and megatron-core 0.19.2 finds a ``DIR`` without a usable checkpoint
    only after building the model (a ``FileNotFoundError`` on every rank). Checked here, with
    one line naming the folder, whenever the pretrained checkpoint is the one that will load."""
    from megatron.rectify.checkpoint.errors import CheckpointToolError
    from megatron.rectify.checkpoint.layout import missing_iteration_message, read_tracker

    pretrained = getattr(args, "pretrained_checkpoint", None)
    if pretrained is None or _has_tracker(getattr(args, "load", None)):
        return
    if not os.path.isdir(pretrained):
        _fail(prog, f"--pretrained-checkpoint {pretrained}: no such folder")
    try:
        marker = read_tracker(pretrained)
    except CheckpointToolError as error:
        _fail(prog, f"--pretrained-checkpoint: {error}")
    if marker is None:
        _fail(
            prog,
            f"--pretrained-checkpoint {pretrained} holds no checkpoint (no "
            "latest_checkpointed_iteration.txt): give the folder a training run saved with "
            "--save, or a converted checkpoint (tools/checkpoint).",
        )
    from megatron.rectify.checkpoint.layout import iteration_folder_name

    if marker != "release" and not (Path(pretrained) / iteration_folder_name(marker)).is_dir():
        _fail(prog, f"--pretrained-checkpoint: {missing_iteration_message(pretrained, marker)}")


def _has_tracker(folder: str | None) -> bool:
    """megatron's ``checkpoint_exists``: the tracker file is there."""
    from megatron.rectify.checkpoint.layout import TRACKER_FILE

    return folder is not None and (Path(folder) / TRACKER_FILE).is_file()


# ---- --use-checkpoint-args ----------------------------------------------------------------------


def restore_args_from_checkpoint(
    args: argparse.Namespace, prog: str, argv: Sequence[str] | None = None
) -> None:
    """``--use-checkpoint-args``: megatron's own restore (architecture, MoE shape), plus
    :data:`EXTRA_CHECKPOINT_MODEL_ARGS` and :data:`CHECKPOINT_ROUTING_ARGS`, before any
    validation, from the checkpoints megatron's ``parse_and_validate_args`` reads them from:
    ``--pretrained-checkpoint`` first, then ``--load`` (whose values win). A ``--load`` folder
    without a checkpoint yet is the first run of a fine-tuning job when a pretrained checkpoint
    is given; with neither giving args the run stops (megatron would go on with the command
    line's architecture, which is not what the flag asks for).

    ``argv``: the command line the args were parsed from (default ``sys.argv[1:]``), to tell
    the flags given explicitly from defaults."""
    folders = [
        (flag, dest, getattr(args, dest, None))
        for flag, dest in (("--pretrained-checkpoint", "pretrained_checkpoint"), ("--load", "load"))
    ]
    folders = [(flag, dest, folder) for flag, dest, folder in folders if folder is not None]
    if not folders:
        _fail(prog, "--use-checkpoint-args needs --load DIR or --pretrained-checkpoint DIR")
    given = dict(vars(args))  # megatron overwrites some routing args even when given
    restored = [
        saved
        for flag, dest, folder in folders
        if (saved := _checkpoint_args(args, dest, folder, prog, required=len(folders) == 1))
    ]
    if not restored:
        names = " or ".join(f"{flag} {folder}" for flag, _, folder in folders)
        _fail(prog, f"--use-checkpoint-args: no checkpoint args in {names}")
    checkpoint_args = restored[-1]  # --load's, when it has a checkpoint
    for name in EXTRA_CHECKPOINT_MODEL_ARGS:
        if getattr(checkpoint_args, name, None) is not None:
            setattr(args, name, getattr(checkpoint_args, name))
    if not _ROUTING_FROM_CHECKPOINT[-1]:
        return
    explicit = explicit_options(sys.argv[1:] if argv is None else argv)
    notes = apply_checkpoint_routing(args, checkpoint_args, given, explicit)
    if getattr(args, "rank", 0) == 0:
        for note in notes:
            print(f"{prog}: note: {note}", file=sys.stderr, flush=True)


def _checkpoint_args(
    args: argparse.Namespace, dest: str, folder: str, prog: str, required: bool
) -> argparse.Namespace | None:
    """megatron's ``load_args_from_checkpoint`` on the folder of ``args.<dest>`` (it updates
    ``args`` in place); the checkpoint's args, or None when the folder has no checkpoint and
    ``required`` is False."""
    from megatron.training.checkpointing import load_args_from_checkpoint

    if not required and not _has_tracker(folder):
        return None
    try:
        restored = load_args_from_checkpoint(args, load_arg=dest)
    except Exception as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        _fail(prog, f"--use-checkpoint-args: cannot read the saved args in {folder}: {first}")
    if not isinstance(restored, tuple):  # megatron returns args alone when nothing was found
        if required:
            _fail(prog, f"--use-checkpoint-args: no checkpoint args in {folder}")
        return None
    return restored[1]


def _flag_parser() -> argparse.ArgumentParser:
    """The parser ``parse_and_validate_args`` uses (megatron's ``parse_args`` with our
    ``extra_args_provider``), every default suppressed: parsing gives only what was typed."""
    from megatron.training.arguments import add_megatron_arguments

    from megatron.rectify.training.args import add_rectify_args

    parser = argparse.ArgumentParser(allow_abbrev=False, add_help=False)
    parser = add_rectify_args(add_megatron_arguments(parser))
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    parser._defaults.clear()
    return parser


def explicit_options(argv: Sequence[str]) -> dict[str, argparse.Action]:
    """The args (by ``dest``) given on the command line ``argv``, each with the option that
    set it, decided by argparse itself (abbreviations off, ``--x=v`` and flag values
    handled as in the real parse)."""
    parser = _flag_parser()
    given, _ = parser.parse_known_args(list(argv))
    explicit: dict[str, argparse.Action] = {}
    for dest, value in vars(given).items():
        actions = [a for a in parser._actions if a.dest == dest and a.option_strings]
        if not actions:
            continue
        setting = [a for a in actions if a.nargs == 0 and getattr(a, "const", None) == value]
        explicit[dest] = (setting or actions)[0]
    return explicit


def _canonical(value: Any) -> Any:
    if isinstance(value, list | tuple):
        return _canonical(value[0]) if len(value) == 1 else [_canonical(v) for v in value]
    return value


def _shown(value: Any, name: str = "") -> str:
    if value is None and name == "moe_rectify_ir_capacity_factor":
        from megatron.rectify.config import IR_CAPACITY_DYNAMIC

        return IR_CAPACITY_DYNAMIC
    if isinstance(value, list | tuple):
        return " ".join(str(v) for v in value)
    return str(value)


def apply_checkpoint_routing(
    args: argparse.Namespace,
    checkpoint_args: argparse.Namespace,
    given: dict[str, Any],
    explicit: dict[str, argparse.Action],
) -> list[str]:
    """Set :data:`CHECKPOINT_ROUTING_ARGS` from the checkpoint unless given explicitly;
    ``given``: the parsed values before megatron's restore. Returns a note for each explicit
    value that differs from the checkpoint's."""
    notes = []
    for name in CHECKPOINT_ROUTING_ARGS:
        if not hasattr(checkpoint_args, name):  # older checkpoint, or not one of ours
            continue
        saved = getattr(checkpoint_args, name)
        if name not in explicit:
            setattr(args, name, saved)
            continue
        mine = given.get(name, getattr(args, name, None))
        setattr(args, name, mine)
        if _canonical(mine) == _canonical(saved):
            continue
        action = explicit[name]
        flag = max(action.option_strings, key=len)
        if action.nargs == 0:
            notes.append(f"{flag} overrides the checkpoint's {name}={_shown(saved)}")
        else:
            notes.append(
                f"{flag} {_shown(mine, name)} overrides the checkpoint's {_shown(saved, name)}"
            )
    return notes


# ---- a checkpoint that cannot be read -----------------------------------------------------------


def is_legacy_torch_checkpoint(folder: Path) -> bool:
    """``folder`` (an iteration folder) was written with ``--ckpt-format torch``: one
    ``mp_rank_*`` folder of ``torch.save`` files per model-parallel rank and no
    ``torch_dist`` index. The file checks here read that index, so they do not apply: a failed
    load of such a checkpoint is reported by megatron itself."""
    return not (folder / "metadata.json").exists() and any(folder.glob("mp_rank_*"))


def corrupt_checkpoint_message(load_dir: str, marker: str, last_read: Sequence[str]) -> str | None:
    """One line naming the unreadable file of the iteration ``marker`` of ``load_dir`` and
    the newest earlier iteration whose files are complete; None when no file is at fault."""
    from megatron.rectify.checkpoint.integrity import (
        find_unreadable_item,
        previous_complete_iteration,
        quick_check,
    )
    from megatron.rectify.checkpoint.layout import TRACKER_FILE, iteration_folder_name

    folder = Path(load_dir) / iteration_folder_name(marker)
    if is_legacy_torch_checkpoint(folder):  # --ckpt-format torch: no index to check against
        return None
    problem = quick_check(folder)
    if problem is None and last_read:
        problem = find_unreadable_item(folder, keys=(), files=last_read)
    if problem is None:
        return None
    before = None if marker == "release" else int(marker)
    previous = previous_complete_iteration(load_dir, before)
    if previous is None:
        fix = (
            f"no earlier checkpoint in {load_dir} has complete files: restore the file from a "
            "copy, or start without --load"
        )
    else:
        fix = (
            f"the newest earlier checkpoint with complete files is "
            f"{iteration_folder_name(previous)}: resume from it with --ckpt-step {previous} "
            f"(or write {previous} into {Path(load_dir) / TRACKER_FILE})"
        )
    return f"cannot load the checkpoint: {problem}; {fix}"


def install_load_guard(prog: str) -> None:
    """Make megatron's ``load_checkpoint`` turn an unreadable checkpoint file into one line
    naming it and exit 2 (:func:`megatron.rectify.megatron_patches.guard_checkpoint_loading`).
    Any other load error is re-raised as is."""
    from megatron.rectify.megatron_patches import guard_checkpoint_loading

    def on_failure(call_args: tuple, call_kwargs: dict, last_read: list[str]) -> None:
        message = _diagnose_load_failure(call_args, call_kwargs, last_read)
        if message is not None:
            _fail(prog, message)

    guard_checkpoint_loading(on_failure)


def _diagnose_load_failure(call_args: tuple, call_kwargs: dict, last_read: list[str]) -> str | None:
    """Which file made ``load_checkpoint(*call_args, **call_kwargs)`` fail, as a message."""
    from megatron.training.global_vars import get_args

    from megatron.rectify.checkpoint.layout import read_tracker

    try:  # a diagnosis that fails itself must not hide megatron's error
        args = get_args()
        load_arg = call_kwargs.get("load_arg", call_args[3] if len(call_args) > 3 else "load")
        load_dir = getattr(args, load_arg, None)
        if load_dir is None or not os.path.isdir(load_dir):
            return None
        step = getattr(args, "ckpt_step", None)
        marker = str(step) if step else read_tracker(load_dir)
        if marker is None:
            return None
        return corrupt_checkpoint_message(load_dir, marker, last_read)
    except Exception:
        return None
