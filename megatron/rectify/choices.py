"""The rectify settings' vocabulary: every choice-valued flag and its values, in one table.

Owns: the ``Literal`` types of the choice-valued settings, the table the argparse ``choices``,
the validation and the benchmarks read, and "does this mode rectify?". It imports neither torch
nor megatron, so that light modules (the benchmark plan, the checkpoint architecture mapping)
use the same lists as the product instead of copies; :mod:`megatron.rectify.config` builds on it.
"""

from __future__ import annotations

from typing import Literal, NamedTuple, get_args

RectifyMode = Literal["none", "ir", "fr", "ir+fr"]
#: ``--moe-rectify-eval``: a mode for evaluation passes, or ``train`` (as in training).
RectifyEvalMode = Literal["train", RectifyMode]
IntraGpuTrigger = Literal["all", "any", "ignore_kth"]
FillInCandidates = Literal["next", "any"]
DropPolicy = Literal["probs", "position"]


class Choice(NamedTuple):
    """A setting with a fixed set of values: what messages call it, and its values."""

    name: str
    values: tuple[str, ...]


#: The one table of choice-valued settings, by flag. The values come from the ``Literal`` types
#: above (which also type the dataclass fields); the argparse ``choices`` (the tuples below) and
#: every validation (:func:`check_choice`: options, routing math, reference) read them here.
CHOICES: dict[str, Choice] = {
    flag: Choice(name, get_args(literal))
    for flag, name, literal in (
        ("--moe-rectify", "rectify mode", RectifyMode),
        ("--moe-rectify-eval", "evaluation rectify mode", RectifyEvalMode),
        ("--moe-rectify-ir-trigger", "IR trigger", IntraGpuTrigger),
        ("--moe-rectify-fill-in-candidates", "fill-in candidate set", FillInCandidates),
        ("--moe-token-drop-policy", "drop policy", DropPolicy),
    )
}
RECTIFY_MODES = CHOICES["--moe-rectify"].values
RECTIFY_EVAL_MODES = CHOICES["--moe-rectify-eval"].values
IR_TRIGGERS = CHOICES["--moe-rectify-ir-trigger"].values
FILL_IN_CANDIDATES = CHOICES["--moe-rectify-fill-in-candidates"].values
DROP_POLICIES = CHOICES["--moe-token-drop-policy"].values


def mode_parts(mode: str) -> set[str]:
    """``ir+fr`` -> {"ir", "fr"}: the rectifications a mode turns on (``none``, ``train``: none)."""
    return set(mode.split("+")) & {"ir", "fr"}


def mode_rectifies(mode: str) -> bool:
    """Whether a ``--moe-rectify`` / ``--moe-rectify-eval`` value turns rectification on
    (``none`` does not, nor ``train``: evaluation as in training)."""
    return bool(mode_parts(mode))
