"""Every change megatron-rectify makes to megatron-core's own functions, in one register.

megatron-rectify plugs into megatron through its hooks (``extra_args_provider``,
``model_provider``, the forward step, layer specs) wherever there is one. Where there is none,
or where megatron-core 0.19.2 has a bug on a path we use, one of megatron's functions is
wrapped or replaced: each such patch is one function of this module, with its reason, and
:data:`PATCHED_FUNCTIONS` records which megatron functions it depends on together with a
fingerprint (sha256 of their source text) in megatron-core 0.19.2, the version the patches were
written for. Every patch first calls :func:`check`: on a megatron version where a patched
function changed (or is gone), the run stops with ONE line naming the patch, the function and
the installed version, instead of a patch silently doing the wrong thing. After reviewing the
patch against the new megatron, record the new fingerprint (:func:`fingerprint`).

Not here, on purpose: the CPU emulation (:mod:`megatron.rectify.dev.cpu_emulation`,
development only, with its own rules) and benchmark-only wrappers
(``benchmarks/quality/pretrain_observed.py``'s extra evaluation passes).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import copy
import functools
import hashlib
import importlib.util
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

#: The megatron-core release every patch below was written for and checked against.
WRITTEN_FOR = "0.19.2"

#: patch -> {"module:qualname" of a megatron function it depends on -> the sha256 (first 16 hex
#: digits) of that function's source in megatron-core 0.19.2}.
PATCHED_FUNCTIONS: dict[str, dict[str, str]] = {
    "mirrored_argument_sequence": {
        "megatron.training.arguments:parse_and_validate_args": "8fc63dea4813642c",
    },
    "escape_unformattable_help": {
        "megatron.training.arguments:add_megatron_arguments": "61c518361be376bf",
    },
    "install_byte_level_tokenizer": {
        "megatron.training.arguments:_add_tokenizer_args": "f63941a6c5da04e6",
        "megatron.training.global_vars:_build_tokenizer": "23c1974b097f471b",
    },
    "report_routing_statistics_with_the_moe_metrics": {
        "megatron.core.transformer.moe.moe_logging:MoEMetricsTracker.report": "0dd3627d44a31065",
    },
    "use_prebuilt_dataset_helpers": {
        "megatron.core.datasets.utils:compile_helpers": "02c160f0fa9c7590",
    },
    "allow_cpu_only_initialisation": {
        "megatron.training.initialize:initialize_megatron": "1894d53ca72933ae",
    },
    "guard_checkpoint_loading": {
        "megatron.training.checkpointing:load_checkpoint": "ee0f61114e6ff179",
    },
    "recording_save_dir": {
        "megatron.training.checkpointing:generate_state_dict": "6b8e7b30febb0ad6",
    },
    "fix_distributed_optimizer_loading": {
        "megatron.core.optimizer.distrib_optimizer:DistributedOptimizer."
        "load_state_dict": "5c2af1e56e0b8eec",
        "megatron.core.optimizer.distrib_optimizer:DistributedOptimizer."
        "_set_main_param_and_optimizer_states": "abb463384d3f18b5",
    },
    "fix_upcycling_load_keyword": {
        "megatron.core.transformer.moe.upcycling_utils:load_and_upcycle_model": "86f2e6fc8482389c",
        "megatron.training.training:setup_model_and_optimizer": "e564c0eccd763727",
    },
}


class MegatronPatchMismatch(SystemExit):
    """A patched megatron function is not the one the patch was written for. A ``SystemExit``:
    the message is the one line printed, and the run must not go on."""


# ---- the check ----------------------------------------------------------------------------------


@functools.cache
def _module_source(module: str) -> tuple[str, ast.Module] | None:
    """The source file of ``module`` as text and syntax tree (read from the file, not the live
    module: the check must see megatron's function even after it was patched)."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
        return None
    text = Path(spec.origin).read_text(encoding="utf-8")
    return text, ast.parse(text)


def source_of(target: str) -> str | None:
    """The source text of ``"module:qualname"`` (a function or method), or None if absent."""
    module, qualname = target.split(":")
    found = _module_source(module)
    if found is None:
        return None
    text, node = found
    for name in qualname.split("."):
        defined = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
        children = [c for c in getattr(node, "body", []) if isinstance(c, defined)]
        matches = [child for child in children if child.name == name]
        if not matches:
            return None
        node = matches[-1]  # the last definition is the one the module ends up with
    return ast.get_source_segment(text, node)


def fingerprint(target: str) -> str | None:
    """sha256 (16 hex digits) of ``target``'s source; None when megatron has no such function."""
    source = source_of(target)
    if source is None:
        return None
    return hashlib.sha256(source.encode("utf-8")).hexdigest()[:16]


def installed_megatron_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("megatron-core")
    except PackageNotFoundError:
        return "unknown"


def mismatch(patch: str) -> str | None:
    """Why ``patch`` does not fit the installed megatron-core (one line), or None if it does."""
    for target, expected in PATCHED_FUNCTIONS[patch].items():
        found = fingerprint(target)
        if found == expected:
            continue
        what = "is gone" if found is None else f"changed (source fingerprint {found})"
        return (
            f"megatron patch {patch!r} was written for megatron-core {WRITTEN_FOR}, but "
            f"{target.replace(':', '.')} {what} in the installed megatron-core "
            f"{installed_megatron_version()}: review the patch in {Path(__file__).name} "
            "before running on this version"
        )
    return None


_CHECKED: set[str] = set()


def check(patch: str) -> None:
    """Raise :class:`MegatronPatchMismatch` (one line) unless ``patch`` fits the installed
    megatron-core; called by every patch before it changes anything."""
    if patch in _CHECKED:
        return
    problem = mismatch(patch)
    if problem is not None:
        raise MegatronPatchMismatch(problem)
    _CHECKED.add(patch)


# ---- command line -------------------------------------------------------------------------------


def mirrored_argument_sequence() -> None:
    """Not a patch but a copy of megatron's order, registered here for the same reason:
    ``megatron.rectify.training.args.parse_and_validate_args`` runs the steps of megatron-core
    0.19.2's ``parse_and_validate_args`` (``parse_args`` with our ``extra_args_provider``;
    ``--use-checkpoint-args`` from ``--pretrained-checkpoint``, then ``--load``;
    ``validate_args``; ``set_global_variables``) with our checks between them, for which
    megatron's function has no hook. A megatron whose sequence changed must be reviewed."""
    check("mirrored_argument_sequence")


def escape_unformattable_help(parser: argparse.ArgumentParser) -> None:
    """megatron-core 0.19.2's ``add_megatron_arguments`` adds a help text with a bare '%'
    (``--moe-paged-stash-buffer-size-factor-cuda``, from ``TransformerConfig``'s docstring)
    that makes ``--help`` crash in argparse; escape such texts on ``parser``."""
    check("escape_unformattable_help")
    formatter = parser._get_formatter()
    for action in parser._actions:
        if action.help and "%" in action.help:
            try:
                formatter._expand_help(action)
            except (ValueError, TypeError, KeyError):
                action.help = action.help.replace("%", "%%")


def install_byte_level_tokenizer() -> None:
    """Teach megatron-core 0.19.2's ``megatron.training`` the ``--tokenizer-type ByteLevel``
    option (:class:`megatron.rectify.data.tokenizer.ByteTokenizer`).

    Its parser takes the ``--tokenizer-type`` choices from a ``Literal`` in
    ``_add_tokenizer_args`` and its ``_build_tokenizer`` calls the module attribute
    ``global_vars.build_tokenizer``; patched, idempotently: ``arguments._add_tokenizer_args``
    (the parser accepts the value) and ``global_vars.build_tokenizer`` (``initialize_megatron``
    builds the byte tokenizer and sets ``padded_vocab_size``). Other tokenizer types are
    unaffected. Call it before megatron parses the command line (i.e. before ``pretrain`` /
    ``initialize_megatron`` / ``parse_args``). The tokenizer itself stays in
    :mod:`megatron.rectify.data.tokenizer`.
    """
    check("install_byte_level_tokenizer")
    import megatron.training.arguments as margs
    import megatron.training.global_vars as mglobals

    from megatron.rectify.data.tokenizer import add_byte_level_tokenizer_choice, build_tokenizer

    if not getattr(margs._add_tokenizer_args, "_rectify_byte_level", False):
        original_add = margs._add_tokenizer_args

        @functools.wraps(original_add)
        def _add_tokenizer_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
            parser = original_add(parser)
            return add_byte_level_tokenizer_choice(parser)

        _add_tokenizer_args._rectify_byte_level = True  # type: ignore[attr-defined]
        margs._add_tokenizer_args = _add_tokenizer_args

    if mglobals.build_tokenizer is not build_tokenizer:
        mglobals.build_tokenizer = build_tokenizer


# ---- training -----------------------------------------------------------------------------------


def report_routing_statistics_with_the_moe_metrics(names: Sequence[str]) -> None:
    """megatron-core 0.19.2's ``MoEMetricsTracker.report`` logs only the MoE metric names its
    caller passes (aux losses); add ``names`` (the rectify routing statistics) so that they
    appear in the iteration log line and in TensorBoard (per layer with
    ``--moe-per-layer-logging``).

    Call it only where every name is recorded (``statistics.routing_statistics_available``):
    megatron reports a registered name that no layer recorded as 0.00, which reads as "nothing
    dropped"."""
    check("report_routing_statistics_with_the_moe_metrics")
    from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker

    tracker = get_moe_metrics_tracker()
    report = tracker.report

    def report_with_rectify_statistics(*args: Any, track_names: Any = None, **kwargs: Any):
        if track_names is not None:
            track_names = [*track_names, *names]
        return report(*args, track_names=track_names, **kwargs)

    tracker.report = report_with_rectify_statistics


def use_prebuilt_dataset_helpers() -> None:
    """The megatron-core 0.19.2 wheel ships its C++ dataset helpers compiled but not their
    Makefile, so ``megatron.core.datasets.utils.compile_helpers`` (a ``make`` at start-up)
    fails; skip it when the compiled module is importable."""
    check("use_prebuilt_dataset_helpers")
    from megatron.core.datasets import utils as dataset_utils

    if importlib.util.find_spec("megatron.core.datasets.helpers_cpp") is not None:
        dataset_utils.compile_helpers = lambda: None


def allow_cpu_only_initialisation(module: Any) -> None:
    """CPU mode: megatron-core 0.19.2's ``initialize_megatron`` asserts CUDA unless called with
    ``allow_no_cuda=True``, which ``pretrain`` does not pass; make the name ``module`` calls
    (``megatron.training.training``) pass it."""
    check("allow_cpu_only_initialisation")
    original = module.initialize_megatron
    if getattr(original, "keywords", {}).get("allow_no_cuda"):
        return
    module.initialize_megatron = functools.partial(original, allow_no_cuda=True)


def fix_upcycling_load_keyword() -> None:
    """megatron-core 0.19.2's ``setup_model_and_optimizer`` (``--moe-use-upcycling``) calls
    ``load_and_upcycle_model(load_checkpoint, ..., load_kwargs={'model': ...})`` but
    ``load_checkpoint``'s parameter is ``ddp_model``: pass it under its name. (The other bug of
    that path, the dense model's leftover MoE settings, is handled by the model provider.)"""
    check("fix_upcycling_load_keyword")
    from megatron.core.transformer.moe import upcycling_utils

    upcycle = upcycling_utils.load_and_upcycle_model
    if getattr(upcycle, "rectify_upcycling_fix", False):
        return

    @functools.wraps(upcycle)
    def load_and_upcycle_model(*args: Any, load_kwargs: dict | None = None, **kwargs: Any):
        load_kwargs = dict(load_kwargs or {})
        if "model" in load_kwargs:
            load_kwargs["ddp_model"] = load_kwargs.pop("model")
        return upcycle(*args, load_kwargs=load_kwargs, **kwargs)

    load_and_upcycle_model.rectify_upcycling_fix = True  # type: ignore[attr-defined]
    upcycling_utils.load_and_upcycle_model = load_and_upcycle_model


# ---- checkpoints --------------------------------------------------------------------------------


def fix_distributed_optimizer_loading() -> None:
    """Three bugs of megatron-core 0.19.2's ``DistributedOptimizer`` when a run resumes
    without Transformer Engine or Apex (torch's own Adam, fp32), fixed here idempotently (a
    fourth, ``torch_dist`` checkpoints, is refused instead: ``checkpoint_args.
    distributed_optimizer_resume_problem``):

    * ``load_state_dict`` gives every parameter's torch-Adam state one and the same ``step``
      tensor, which torch's Adam then increments in place once per parameter: after one step
      the bias correction counts the parameters, not the steps, and the resumed run diverges
      from the uninterrupted one. Each parameter gets its own copy.
    * ``_set_main_param_and_optimizer_states`` (called by the loader of a ``--ckpt-format
      torch`` checkpoint's optimizer shards, ``distrib_optim.pt``) copies into the main
      parameters with ``copy_`` outside ``torch.no_grad()``; in fp32 a main parameter is a view
      of the model parameter, a leaf that requires grad: "a view of a leaf Variable that
      requires grad is being used in an in-place operation". It runs under ``torch.no_grad()``
      here.
    * it also looks up every tensor of a parameter's optimizer state in the loaded shards, which
      hold ``exp_avg`` / ``exp_avg_sq`` only, not torch Adam's ``step`` tensor: KeyError
      'step'. A state the shards do not hold is skipped (``load_state_dict`` restores ``step``
      from the param groups).
    """
    check("fix_distributed_optimizer_loading")
    import collections

    import torch
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    load_state_dict = DistributedOptimizer.load_state_dict
    if getattr(load_state_dict, "rectify_fixed", False):
        return
    set_states = DistributedOptimizer._set_main_param_and_optimizer_states

    @functools.wraps(load_state_dict)
    def load_state_dict_with_own_steps(self: Any, state_dict: Any) -> Any:
        result = load_state_dict(self, state_dict)
        for state in getattr(self.optimizer, "state", {}).values():
            step = state.get("step") if isinstance(state, dict) else None
            if isinstance(step, torch.Tensor):
                state["step"] = step.clone()
        return result

    @functools.wraps(set_states)
    def _set_main_param_and_optimizer_states(self: Any, model_param: Any, tensors: dict) -> None:
        # megatron skips an entry that is not a tensor: a state missing from the file is None
        with torch.no_grad():
            set_states(self, model_param, collections.defaultdict(lambda: None, tensors))

    load_state_dict_with_own_steps.rectify_fixed = True  # type: ignore[attr-defined]
    DistributedOptimizer.load_state_dict = load_state_dict_with_own_steps
    DistributedOptimizer._set_main_param_and_optimizer_states = _set_main_param_and_optimizer_states


@contextlib.contextmanager
def _recording_files_read() -> Iterator[list[str]]:
    """The shard file torch.distributed.checkpoint's reader is reading (its ``_slice_file`` is
    called per stored item), so that a failed read can be traced to its file. torch's, not
    megatron's: on a torch without ``_slice_file`` nothing is recorded (the caller's quick file
    check still names truncated files)."""
    from torch.distributed.checkpoint.filesystem import FileSystemReader

    original = FileSystemReader.__dict__.get("_slice_file")
    last: list[str] = []
    if original is None:
        yield last
        return

    def slice_file(self: Any, file: Any, sinfo: Any) -> Any:
        last[:] = [sinfo.relative_path]
        return original(self, file, sinfo)

    FileSystemReader._slice_file = slice_file
    try:
        yield last
    finally:
        FileSystemReader._slice_file = original


#: ``on_failure(call_args, call_kwargs, files_read)``; see :func:`guard_checkpoint_loading`.
LoadFailureHandler = Callable[[tuple, dict, list[str]], None]


def guard_checkpoint_loading(on_failure: LoadFailureHandler) -> None:
    """megatron-core 0.19.2's ``load_checkpoint`` reports an unreadable checkpoint file as a
    long traceback that does not name the file. Wrap it (in ``megatron.training.checkpointing``
    and, when imported, the name ``megatron.training.training`` calls) so that a failed load
    calls ``on_failure`` with the call's arguments and the shard files being read; it may end
    the run with its own message, and when it returns megatron's error is raised as is.
    Installed once per process (the first handler stays)."""
    check("guard_checkpoint_loading")
    from megatron.training import checkpointing

    if getattr(checkpointing.load_checkpoint, "rectify_load_guard", False):
        return
    original = checkpointing.load_checkpoint

    @functools.wraps(original)
    def load_checkpoint(*args: Any, **kwargs: Any) -> Any:
        from torch.distributed.checkpoint.api import CheckpointException

        with _recording_files_read() as last_read:
            try:
                return original(*args, **kwargs)
            except (Exception, CheckpointException):  # DCP's exception is a BaseException
                on_failure(args, kwargs, list(last_read))
                raise

    load_checkpoint.rectify_load_guard = True  # type: ignore[attr-defined]
    checkpointing.load_checkpoint = load_checkpoint
    training = sys.modules.get("megatron.training.training")
    if training is not None and getattr(training, "load_checkpoint", None) is original:
        training.load_checkpoint = load_checkpoint


@contextlib.contextmanager
def recording_save_dir(save_dir: Path | None) -> Iterator[None]:
    """Within the block, checkpoints megatron saves record ``--save`` as ``save_dir``.

    The checkpoint tools write into a staging folder that is renamed when complete; the saved
    args must name the final folder. megatron-core 0.19.2's ``save_checkpoint`` takes the args
    from its globals, so its ``generate_state_dict`` is given a copy that says so."""
    check("recording_save_dir")
    from megatron.training import checkpointing

    original = checkpointing.generate_state_dict

    def generate_with_recorded_save_dir(args: argparse.Namespace, *rest: Any, **kw: Any) -> Any:
        recorded = copy.copy(args)
        if save_dir is not None:
            recorded.save = str(save_dir)
        return original(recorded, *rest, **kw)

    checkpointing.generate_state_dict = generate_with_recorded_save_dir
    try:
        yield
    finally:
        checkpointing.generate_state_dict = original
