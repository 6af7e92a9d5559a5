"""Rectify-Router settings: names, defaults and the validation of impossible combinations.

This module owns the user-facing vocabulary of the method (``--moe-rectify`` and friends) and the
checks that turn a bad combination into one clear, early error that names the flag and the fix.
It does not touch tensors, process groups or CUDA.

One source for each fact: :data:`CHOICES` (every choice-valued flag: its values, from the
``Literal`` types, for argparse and validation; kept in the light
:mod:`megatron.rectify.choices` and re-exported here), :func:`rectify_options_from_config` (the
only place options are built from settings), :func:`mode_rectifies` / :func:`rectifying_modes`
("does this rectify?") and :func:`dispatcher_problem` (rectification runs on alltoall and
allgather, not on flex).

Two objects live here:

* :class:`RectifyOptions` - a small frozen value object that the pure routing math receives.
* :class:`RectifyTransformerConfig` - megatron's ``TransformerConfig`` with the ``moe_rectify_*``
  fields added, so that the settings travel the way every other ``--moe-*`` flag travels in
  megatron (argparse -> ``core_transformer_config_from_args`` -> ``config``), and are validated in
  ``__post_init__`` together with megatron's own checks.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from math import inf
from typing import Any

from megatron.core.transformer.transformer_config import TransformerConfig

from megatron.rectify.choices import (  # noqa: F401  (re-exported: the settings' vocabulary)
    CHOICES,
    DROP_POLICIES,
    FILL_IN_CANDIDATES,
    IR_TRIGGERS,
    RECTIFY_EVAL_MODES,
    RECTIFY_MODES,
    Choice,
    DropPolicy,
    FillInCandidates,
    IntraGpuTrigger,
    RectifyEvalMode,
    RectifyMode,
    mode_parts,
    mode_rectifies,
)

#: The flags that switch rectification on (training, evaluation passes), in that order.
MODE_FLAGS = ("--moe-rectify", "--moe-rectify-eval")
#: megatron's token dispatchers (selected by name) that rectified routing runs with: alltoall
#: (IR side batch off the all-to-all) and allgather (IR pairs in the gathered map).
ALLTOALL = "alltoall"
ALLGATHER = "allgather"
RECTIFIED_DISPATCHERS = (ALLTOALL, ALLGATHER)


class RectifyConfigError(ValueError):
    """A rectify setting that cannot work. The message names the flag and the fix."""


@dataclass(frozen=True)
class RectifyOptions:
    """What the rectified routing math needs to know, already validated.

    Attributes:
        intra_gpu: Intra-GPU Rectification (IR) on: dropped tokens go to their best local expert.
        fill_in: Fill-in Rectification (FR) on: vacant capacity slots take unrouted tokens.
        ir_trigger: which tokens IR rescues. ``all``: every top-k choice was dropped and no
            fill-in slot was won (the token would otherwise be computed by nobody); ``any`` and
            ``ignore_kth``: at least one top-k choice was dropped. The authors' ``any`` also
            counts a lost fill-in candidate, which makes nearly every token trigger; that
            combination is refused (``ignore_kth`` is the variant meant for FR).
        fill_in_candidates: ``next``: a token may fill expert ``e`` only if ``e`` is its
            (k+1)-th choice; ``any``: any expert outside the token's top-k.
        straight_through: detach the renormalisation denominator in the backward pass so the
            router keeps a gradient when a token has a single surviving choice.
        drop_policy: which top-k request wins a capacity slot (``probs`` or ``position``).
        ir_capacity_factor: ``None`` (default): IR rescues every triggered token (dynamic IR,
            a variable-sized side batch). A number ``F`` > 0: static IR, each local expert
            gets exactly ``B = min(T, ceil(T * k / E * F))`` IR rows (``intra_gpu_capacity``),
            so every shape is static (no host sync, CUDA-graph capturable); tokens beyond the
            budget are not rescued and are counted (``ir_over_budget``, ``lost``).
    """

    intra_gpu: bool = False
    fill_in: bool = False
    ir_trigger: IntraGpuTrigger = "all"
    fill_in_candidates: FillInCandidates = "next"
    straight_through: bool = True
    drop_policy: DropPolicy = "probs"
    ir_capacity_factor: float | None = None

    def __post_init__(self) -> None:
        check_choice("--moe-rectify-ir-trigger", self.ir_trigger)
        check_choice("--moe-rectify-fill-in-candidates", self.fill_in_candidates)
        check_choice("--moe-token-drop-policy", self.drop_policy)
        problem = ir_capacity_factor_value_problem(self.ir_capacity_factor)
        if problem:
            raise RectifyConfigError(problem)
        if self.intra_gpu and self.fill_in and self.ir_trigger == "any":
            raise RectifyConfigError(
                "--moe-rectify-ir-trigger any with fill-in rectification would send almost "
                "every token to intra-GPU rectification (a lost fill-in candidate counts as a "
                "drop). Use --moe-rectify-ir-trigger ignore_kth (or all) with --moe-rectify ir+fr."
            )

    @property
    def enabled(self) -> bool:
        """True when any rectification is on (otherwise the router is megatron's TopKRouter)."""
        return self.intra_gpu or self.fill_in

    @classmethod
    def from_mode(cls, mode: str, **kwargs: Any) -> RectifyOptions:
        """Build options from a ``--moe-rectify`` mode: ``none``, ``ir``, ``fr`` or ``ir+fr``."""
        check_choice("--moe-rectify", mode)
        parts = mode_parts(mode)
        return cls(intra_gpu="ir" in parts, fill_in="fr" in parts, **kwargs)


#: The static-IR flag (``RectifyOptions.ir_capacity_factor``).
IR_CAPACITY_FLAG = "--moe-rectify-ir-capacity-factor"
#: Its value for dynamic IR (the default, None): needed on the command line to turn a budget
#: off that ``--use-checkpoint-args`` would otherwise restore from the checkpoint.
IR_CAPACITY_DYNAMIC = "dynamic"


def parse_ir_capacity_factor(text: str) -> float | None:
    """The flag's argparse ``type``: a number, or ``dynamic`` for None (dynamic IR). Range
    checks are :func:`ir_capacity_factor_value_problem`'s, shared with the config."""
    if text.strip().lower() == IR_CAPACITY_DYNAMIC:
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a number (e.g. 0.25) or {IR_CAPACITY_DYNAMIC!r}, got {text!r}"
        ) from None


def ir_capacity_factor_value_problem(factor: object) -> str | None:
    """The message when an IR capacity factor is set but not a positive finite number."""
    if factor is None:
        return None
    if isinstance(factor, bool) or not isinstance(factor, int | float) or not 0 < factor < inf:
        return (
            f"{IR_CAPACITY_FLAG} must be a positive number (got {factor!r}): it sizes the static "
            f"IR batch, ceil(tokens * top-k / experts * F) rows per local expert. Use e.g. "
            f"{IR_CAPACITY_FLAG} 0.25, or {IR_CAPACITY_FLAG} {IR_CAPACITY_DYNAMIC} (the "
            f"default) for dynamic IR."
        )
    return None


def ir_capacity_factor_problem(config: Any) -> str | None:
    """The message when ``config`` (parsed args: both mode flags are visible) sets
    ``--moe-rectify-ir-capacity-factor`` wrongly: not a positive number, or with no mode that
    runs IR (``ir`` / ``ir+fr`` in ``--moe-rectify`` or ``--moe-rectify-eval``). A capacity is
    required by every rectifying mode already (``validate_rectify_settings``)."""
    factor = getattr(config, "moe_rectify_ir_capacity_factor", None)
    if factor is None:
        return None
    problem = ir_capacity_factor_value_problem(factor)
    if problem:
        return problem
    if not any("ir" in mode_parts(mode) for mode in rectifying_modes(config).values()):
        return (
            f"{IR_CAPACITY_FLAG} {factor:g} sizes the intra-GPU rectification batch, but "
            f"--moe-rectify {getattr(config, 'moe_rectify', 'none')} runs no IR: use "
            f"--moe-rectify ir or ir+fr (or --moe-rectify-eval ir / ir+fr), or drop "
            f"{IR_CAPACITY_FLAG}."
        )
    return None


def check_choice(flag: str, value: object) -> None:
    """Raise :class:`RectifyConfigError` (a ``ValueError``) unless ``value`` is one of the
    values :data:`CHOICES` lists for ``flag``; the message names the setting, flag and values."""
    choice = CHOICES[flag]
    if value not in choice.values:
        raise RectifyConfigError(
            f"unknown {choice.name} {value!r} ({flag}); choose one of: {', '.join(choice.values)}."
        )


def rectifying_modes(config: Any) -> dict[str, str]:
    """The flags of :data:`MODE_FLAGS` whose value in ``config`` (parsed args, or a config,
    which has no ``moe_rectify_eval``) turns rectification on: ``{flag: mode}``, empty when
    nothing is rectified."""
    modes = {flag: getattr(config, flag[2:].replace("-", "_"), None) for flag in MODE_FLAGS}
    return {flag: mode for flag, mode in modes.items() if mode and mode_rectifies(mode)}


def uses_alltoall_dispatcher(config: Any) -> bool:
    """Whether ``config`` selects megatron's alltoall dispatcher, whose padded path needs a
    buffer of exactly ``C`` tokens per expert (the router checks ``C`` against the tokens)."""
    return getattr(config, "moe_token_dispatcher_type", None) == ALLTOALL


def dispatcher_problem(config: Any) -> str | None:
    """The message when ``config`` rectifies (in training or, for parsed args, evaluation) with
    a token dispatcher other than alltoall or allgather, i.e. flex, else None.

    Why flex is refused rather than supported: megatron's flex dispatcher does not send the
    router's map. DeepEP keeps each token's top-k weights (top-k * TP) and reads weight 0 as
    "dropped", so a token's fill-in pair beyond its k choices, its IR pair and every
    zero-weight padding pair vanish (megatron itself refuses DeepEP with padding); HybridEP
    with padding sizes each expert's buffer as exactly C per rank, which IR pairs exceed. Both
    are GPU-only kernels that cannot run here, so a rectified flex path could not be tested.
    """
    modes = rectifying_modes(config)
    dispatcher = getattr(config, "moe_token_dispatcher_type", None)
    if not modes or dispatcher in RECTIFIED_DISPATCHERS:
        return None
    flag, mode = next(iter(modes.items()))
    return (
        f"{flag} {mode} needs --moe-token-dispatcher-type {ALLTOALL} or {ALLGATHER} (got "
        f"{dispatcher!r}): megatron's flex dispatcher rebuilds each token's experts in GPU-only "
        "kernels (DeepEP keeps the top-k gate weights per token and drops weight-0 pairs, so "
        "fill-in pairs beyond k choices, intra-GPU pairs and padding pairs are lost; HybridEP "
        "with padding expects exactly C tokens per expert, which intra-GPU pairs exceed), and a "
        "rectified flex path could not be tested without them. Use "
        f"{ALLTOALL} (the same EP all-to-all, IR tokens kept off it) or {ALLGATHER}."
    )


def validate_rectify_settings(config: Any) -> None:
    """Refuse combinations that cannot work, before any tensor is built.

    ``config`` is anything with megatron's ``TransformerConfig`` MoE attributes plus the
    ``moe_rectify*`` fields (a :class:`RectifyTransformerConfig`, or parsed CLI args).
    """
    options = rectify_options_from_config(config)
    if not options.enabled:
        return
    mode = config.moe_rectify
    capacity_factor = getattr(config, "moe_expert_capacity_factor", None)
    if capacity_factor is None:
        raise RectifyConfigError(
            f"--moe-rectify {mode} needs an expert capacity: without "
            "--moe-expert-capacity-factor routing is dropless, so no token is dropped (nothing "
            "for IR) and no slot is vacant (nothing for FR). Set e.g. "
            "--moe-expert-capacity-factor 1.0, or use --moe-rectify none."
        )
    if capacity_factor <= 0:
        # megatron-core 0.19.2 turns a negative factor into dropless routing (None) without a
        # word, which would make rectification a silent no-op; 0 leaves no capacity at all.
        why = (
            "megatron reads a negative factor as dropless routing, where rectification has "
            "nothing to do"
            if capacity_factor < 0
            else "0 gives the experts no capacity"
        )
        raise RectifyConfigError(
            f"--moe-rectify {mode} needs a positive --moe-expert-capacity-factor (got "
            f"{capacity_factor}: {why}). Set e.g. --moe-expert-capacity-factor 1.0, or use "
            "--moe-rectify none."
        )
    num_experts = getattr(config, "num_moe_experts", None)
    topk = getattr(config, "moe_router_topk", 1)
    if not num_experts:
        raise RectifyConfigError(f"--moe-rectify {mode} needs an MoE model: set --num-experts.")
    if not 1 <= topk <= num_experts:  # before the capacity checks, whose messages assume it
        raise RectifyConfigError(
            f"--moe-router-topk {topk} is out of range for --num-experts {num_experts}: set it "
            f"between 1 and {num_experts} (the number of experts each token is routed to)."
        )
    if options.intra_gpu and capacity_factor * topk >= num_experts:
        raise RectifyConfigError(
            f"--moe-rectify {mode}: with --moe-expert-capacity-factor {capacity_factor}, "
            f"top-{topk} and {num_experts} experts every expert can hold every token, so no "
            "token is ever dropped and intra-GPU rectification has nothing to do. Lower the "
            "capacity factor or drop 'ir' from --moe-rectify."
        )
    routing_type = getattr(config, "moe_router_load_balancing_type", "aux_loss")
    for unsupported in ("sinkhorn", "quantile_balancing"):
        if routing_type == unsupported or (
            isinstance(routing_type, list) and unsupported in routing_type
        ):
            raise RectifyConfigError(
                f"--moe-rectify {mode} is not defined for --moe-router-load-balancing-type "
                f"{unsupported} (it replaces top-k routing itself). Use aux_loss, seq_aux_loss, "
                "global_aux_loss or none, or --moe-rectify none."
            )
    if getattr(config, "moe_enable_routing_replay", False):
        raise RectifyConfigError(
            f"--moe-rectify {mode} cannot be combined with --moe-enable-routing-replay "
            "(replayed top-k indices bypass the rectified assignment). Turn one of them off."
        )
    if topk >= num_experts and options.fill_in and options.fill_in_candidates == "next":
        raise RectifyConfigError(
            f"--moe-rectify {mode}: with --moe-router-topk {topk} and {num_experts} experts no "
            "token has a (k+1)-th choice to fill in with. Use fewer experts per token or "
            "--moe-rectify-fill-in-candidates any."
        )
    # Padding contract: with padding every expert buffer holds exactly C = ceil(k f T / E)
    # distinct tokens, impossible when C > T, i.e. k f > E for every T (megatron's own padded
    # alltoall dispatcher fails on it with a shape error). The router re-checks per call, for
    # k f == E, where megatron's float arithmetic can still round C up to T + 1.
    padded = getattr(config, "moe_pad_expert_input_to_capacity", False)
    if padded and capacity_factor * topk > num_experts:
        raise RectifyConfigError(
            f"--moe-rectify {mode}: --moe-pad-expert-input-to-capacity needs "
            f"--moe-expert-capacity-factor at most {num_experts / topk:g} (experts / top-k; got "
            f"{capacity_factor}): a padded expert buffer holds more slots than there are tokens."
        )


def rectify_options_from_config(config: Any, mode: str | None = None) -> RectifyOptions:
    """Read ``RectifyOptions`` from a config or args object (missing fields mean 'off').

    The one place options are built from settings: ``mode`` replaces ``config.moe_rectify``
    (evaluation passes rectify in another mode with the run's other settings)."""
    return RectifyOptions.from_mode(
        getattr(config, "moe_rectify", "none") if mode is None else mode,
        ir_trigger=getattr(config, "moe_rectify_ir_trigger", "all"),
        fill_in_candidates=getattr(config, "moe_rectify_fill_in_candidates", "next"),
        straight_through=getattr(config, "moe_rectify_straight_through", True),
        drop_policy=getattr(config, "moe_token_drop_policy", "probs"),
        ir_capacity_factor=getattr(config, "moe_rectify_ir_capacity_factor", None),
    )


@dataclass
class RectifyTransformerConfig(TransformerConfig):
    """megatron's ``TransformerConfig`` plus the Rectify-Router settings.

    Each field mirrors a CLI flag of the same name (``moe_rectify`` <-> ``--moe-rectify``).
    """

    moe_rectify: RectifyMode = "none"
    """Which rectifications run after capacity truncation: none, ir, fr or ir+fr."""

    moe_rectify_ir_trigger: IntraGpuTrigger = "all"
    """Tokens that intra-GPU rectification rescues: all / any / ignore_kth (see RectifyOptions)."""

    moe_rectify_fill_in_candidates: FillInCandidates = "next"
    """Fill-in candidates: the (k+1)-th choice only (next) or any non-selected expert (any)."""

    moe_rectify_straight_through: bool = True
    """Detach the gate-weight denominator in backward (keeps router gradients alive)."""

    moe_rectify_ir_capacity_factor: float | None = None
    """Static IR: B = min(T, ceil(T * k / E * F)) IR rows per local expert (None: dynamic)."""

    def __post_init__(self) -> None:
        validate_rectify_settings(self)  # first: ours name the rectify flag and the fix
        super().__post_init__()

    @property
    def rectify_options(self) -> RectifyOptions:
        """The validated options the routing math consumes."""
        return rectify_options_from_config(self)
