"""``pretrain_gpt_rectify.py`` with the routing observation the quality benchmark needs.

The quality benchmark compares vanilla top-k routing with rectified routing, so it needs the
same dropped / padded / lost rates for *every* variant, and it needs them for the held-out
evaluation too (inference-only rectification changes routing only there). The training entry
point records statistics only for rectified training calls, because a vanilla router is
megatron's own ``TopKRouter`` path and keeps no decision. This script wraps
``RectifyMoELayer.route`` from the outside (nothing in ``megatron.rectify`` changes) and:

* counts vanilla calls from megatron's ``routing_map`` (kept pairs) and the capacity, and feeds
  them into the layer's own training statistics, so the iteration log line and the final
  "rectify routing summary" carry the same numbers for vanilla runs as for rectified ones;
* accumulates every evaluation-mode call (vanilla or rectified) separately and prints them at
  the end as ``quality eval routing summary`` lines;
* with ``--quality-eval-modes ir,fr,ir+fr`` (removed from the command line before megatron
  parses it), repeats every evaluation pass under each listed rectification, on the very same
  batches (recorded during the first pass and replayed). That is inference-only rectification
  measured *paired*: same weights, same held-out tokens, only the routing differs, and no second
  process or checkpoint is needed. Lines read ``... on test set [eval rectify ir] | lm loss ...``;
* with ``--quality-unit-gate`` (also removed before megatron parses), vanilla top-1 calls get
  the rectified router's gate weight ``1 + p - sg(p)`` (forward 1, gradient as if ``p``) instead
  of megatron's ``p``. A rectified top-1 router weights every token that way, so without this
  control a rectified-vs-vanilla comparison also compares two gate scalings.

Then it runs ``megatron.rectify.training.main`` unchanged. Launch it exactly like
``pretrain_gpt_rectify.py`` (torchrun, same flags).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any

import torch

EVAL_MODES_FLAG = "--quality-eval-modes"
UNIT_GATE_FLAG = "--quality-unit-gate"
AS_TRAINED = "as trained"
EVAL_SUMMARY_HEADER = "quality eval routing summary"
_COUNT_NAMES = ("dropped", "padded", "filled_in", "rectified", "lost")
_TOTAL_NAMES = ("num_requests", "slots", "num_tokens")
#: Which evaluation pass is running (keys the evaluation statistics).
_current_eval_label = [AS_TRAINED]


def unrectified_statistics(
    probs: torch.Tensor, routing_map: torch.Tensor, topk: int, capacity_factor: float | None
):
    """``RoutingStatistics`` of a vanilla (megatron) router call.

    NOTE: with ``--moe-pad-expert-input-to-capacity`` megatron's ``routing_map`` [T, E] holds
    exactly ``C`` tokens per expert: the kept requests *plus* the best-scoring other tokens with
    probability zero (megatron's padding is real tokens with no weight). The kept requests are
    therefore the pairs with a non-zero probability, ``dropped = T * k - kept``, and ``padded``
    is ``E * C - kept`` as in ``routing.routing_statistics``. Dropless routing has nothing to
    pad.
    """
    from megatron.core.transformer.moe.moe_utils import get_capacity

    from megatron.rectify.routing import RoutingStatistics

    num_tokens, num_experts = routing_map.shape
    kept_map = routing_map & (probs.detach() != 0)
    kept = kept_map.sum()
    if capacity_factor is None:
        slots = int(kept)
    else:
        capacity = get_capacity(
            num_tokens=num_tokens * topk, num_experts=num_experts, capacity_factor=capacity_factor
        )
        slots = num_experts * capacity
    zero = torch.zeros((), dtype=kept.dtype, device=kept.device)
    return RoutingStatistics(
        num_tokens=num_tokens,
        num_requests=num_tokens * topk,
        slots=slots,
        dropped=num_tokens * topk - kept,
        filled_in=zero,
        rectified=zero,
        occupied=kept,
        padded=(slots - kept).clamp_min(0),
        lost=(~kept_map.any(dim=1)).sum(),
        expert_load=kept_map.sum(dim=0),
    )


def accumulate(totals: dict[str, float], stats) -> None:
    """Add one call's counts to ``totals`` (one host sync per call: evaluation only)."""
    for name in _COUNT_NAMES:
        totals[name] = totals.get(name, 0.0) + float(getattr(stats, name))
    for name in _TOTAL_NAMES:
        totals[name] = totals.get(name, 0.0) + float(getattr(stats, name))


def rates(totals: dict[str, float]) -> dict[str, float]:
    """Percentages as the training summary defines them (``routing.routing_rates``), ``lost``
    included (tokens no expert computes: the quantity rectification exists to remove)."""
    from megatron.rectify.routing import routing_rates

    return routing_rates(totals)


def install_observer() -> None:
    """Wrap ``RectifyMoELayer.route``: vanilla training calls feed the layer's statistics,
    every evaluation call feeds ``layer.quality_eval_totals``."""
    from megatron.rectify.moe_layer import RectifyMoELayer

    original_route = RectifyMoELayer.route

    def observed_route(self, hidden_states: torch.Tensor, padding_mask=None):
        probs, routing_map = original_route(self, hidden_states, padding_mask)
        stats = self.router.statistics()
        training = self.training and torch.is_grad_enabled()
        if stats is None:  # megatron's own routing: count it from the routing map
            stats = unrectified_statistics(
                probs, routing_map, self.router.topk, self.config.moe_expert_capacity_factor
            )
            if training:
                self._record_statistics(stats)
        if not self.training:
            per_label = self.__dict__.setdefault("quality_eval_totals", {})
            accumulate(per_label.setdefault(_current_eval_label[0], {}), stats)
        return probs, routing_map

    RectifyMoELayer.route = observed_route


def report_routing_metrics_always() -> None:
    """The entry point adds our rates to megatron's iteration log only when rectifying; the
    benchmark wants them for vanilla runs too (installed once, here)."""
    from megatron.rectify import training

    training._report_routing_statistics_with_the_moe_metrics()
    training._report_routing_statistics_with_the_moe_metrics = lambda: None


def print_eval_summary() -> None:
    """Per MoE layer: routing rates over every evaluation call (first data-parallel rank)."""
    from megatron.core import parallel_state

    from megatron.rectify.moe_layer import LIVE_LAYERS

    if (
        parallel_state.get_data_parallel_rank() != 0
        or parallel_state.get_tensor_model_parallel_rank()
    ):
        return
    layers = sorted(LIVE_LAYERS, key=lambda layer: layer.layer_number or 0)
    observed = [(layer.layer_number, getattr(layer, "quality_eval_totals", {})) for layer in layers]
    if not any(per_label for _, per_label in observed):
        return
    print(f"{EVAL_SUMMARY_HEADER} (this rank's tokens, all evaluation passes):", flush=True)
    for number, per_label in observed:
        for label, totals in per_label.items():
            r = rates(totals)
            print(
                f"  eval [{label}] MoE layer {number}: dropped {r['dropped_pct']:.2f} % | padded "
                f"{r['padded_pct']:.2f} % | filled-in {r['filled_in_pct']:.2f} % | rectified "
                f"{r['rectified_pct']:.2f} % | lost {r['lost_pct']:.2f} %",
                flush=True,
            )


class RecordingIterator:
    """Pass batches through and keep them, so that later passes can replay the same ones."""

    def __init__(self, source: Iterator[Any]) -> None:
        self.source = source
        self.batches: list[Any] = []

    def __iter__(self) -> RecordingIterator:
        return self

    def __next__(self) -> Any:
        batch = next(self.source)
        self.batches.append(batch)
        return batch


def pop_eval_modes(argv: list[str]) -> list[str]:
    """Remove ``--quality-eval-modes a,b`` from ``argv`` (megatron would refuse it); return
    the modes."""
    if EVAL_MODES_FLAG not in argv:
        return []
    at = argv.index(EVAL_MODES_FLAG)
    modes = [mode for mode in argv[at + 1].split(",") if mode]
    del argv[at : at + 2]
    from megatron.rectify.config import RECTIFY_MODES

    unknown = [mode for mode in modes if mode not in RECTIFY_MODES]
    if unknown:
        raise SystemExit(f"{EVAL_MODES_FLAG}: unknown modes {unknown}; use {RECTIFY_MODES}")
    return modes


def pop_flag(argv: list[str], flag: str) -> bool:
    """Remove a bare ``flag`` from ``argv``; return whether it was there."""
    if flag not in argv:
        return False
    argv.remove(flag)
    return True


def install_unit_gate() -> None:
    """Vanilla top-1 routing with the rectified router's gate weight (see the module docstring).

    Applied to the ``probs`` megatron returns, after its aux-loss autograd hooks, so the
    load-balancing gradient is unchanged; zero entries (dropped, padding) stay zero.
    """
    from megatron.rectify.router import RectifyRouter

    original_route_logits = RectifyRouter.route_logits

    def route_logits_with_unit_gate(self, logits: torch.Tensor, padding_mask=None):
        output = original_route_logits(self, logits, padding_mask)
        if output.decision is None and self.topk == 1:  # megatron's own path was taken
            probs = output.probs
            output.probs = torch.where(probs != 0, 1 + probs - probs.detach(), probs)
        return output

    RectifyRouter.route_logits = route_logits_with_unit_gate


#: Settings that only mean something for an MoE model, and their dense-model values.
_MOE_ONLY_ARGS = {"moe_ffn_hidden_size": None, "moe_rectify": "none", "moe_rectify_eval": "train"}


def allow_megatron_upcycling() -> None:
    """Work around two bugs of megatron-core 0.19.2's ``--moe-use-upcycling`` path:

    * to build the dense model it sets ``args.num_experts = None`` but leaves
      ``moe_ffn_hidden_size`` (filled in by its own argument validation), which
      ``TransformerConfig`` refuses ("moe_ffn_hidden_size is set but num_moe_experts is None"):
      hidden while the dense model is built, and so is ``--moe-rectify`` (a dense model has no
      router to rectify; our config check would refuse it the same way);
    * it calls ``load_checkpoint(model=...)`` but the function's parameter is ``ddp_model``.
    """
    from megatron.core.transformer.moe import upcycling_utils

    from megatron.rectify import training

    upcycle = upcycling_utils.load_and_upcycle_model

    def load_and_upcycle_model(*args: Any, load_kwargs: dict | None = None, **kwargs: Any):
        load_kwargs = dict(load_kwargs or {})
        if "model" in load_kwargs:
            load_kwargs["ddp_model"] = load_kwargs.pop("model")
        return upcycle(*args, load_kwargs=load_kwargs, **kwargs)

    upcycling_utils.load_and_upcycle_model = load_and_upcycle_model

    provider = training.model_provider

    def model_provider(*args: Any, **kwargs: Any):
        from megatron.training import get_args

        megatron_args = get_args()
        saved = {name: getattr(megatron_args, name) for name in _MOE_ONLY_ARGS}
        if megatron_args.num_experts is None:  # megatron is building the dense model
            for name, dense_value in _MOE_ONLY_ARGS.items():
                setattr(megatron_args, name, dense_value)
        try:
            return provider(*args, **kwargs)
        finally:
            for name, value in saved.items():
                setattr(megatron_args, name, value)

    training.model_provider = model_provider


def eval_options(args: Any, mode: str):
    """``RectifyOptions`` for an extra evaluation pass, from the run's own rectify flags."""
    from megatron.rectify.config import RectifyOptions

    trigger = args.moe_rectify_ir_trigger
    if trigger == "any" and "fr" in mode:
        trigger = "ignore_kth"  # `any` with FR is refused; ignore_kth is its FR form
    return RectifyOptions.from_mode(
        mode,
        ir_trigger=trigger,
        fill_in_candidates=args.moe_rectify_fill_in_candidates,
        straight_through=args.moe_rectify_straight_through,
        drop_policy=args.moe_token_drop_policy,
    )


def install_extra_evaluations(modes: list[str]) -> None:
    """Every evaluation pass runs once as trained, then once per mode on the replayed batches."""
    from megatron.training import get_args
    from megatron.training import training as megatron_training

    from megatron.rectify.router import RectifyRouter

    original = megatron_training.evaluate_and_print_results

    def evaluate_in_every_mode(prefix, forward_step_func, data_iterator, model, *rest, **kw):
        args = get_args()
        if args.moe_rectify_eval != "train" or args.moe_expert_capacity_factor is None:
            raise SystemExit(f"{EVAL_MODES_FLAG} needs a capacity factor and no --moe-rectify-eval")
        recorder = None if data_iterator is None else RecordingIterator(data_iterator)
        _current_eval_label[0] = AS_TRAINED
        original(prefix, forward_step_func, recorder, model, *rest, **kw)
        chunks = model if isinstance(model, list) else [model]
        routers = [m for chunk in chunks for m in chunk.modules() if isinstance(m, RectifyRouter)]
        trained = [router.rectify_options for router in routers]
        for mode in modes:
            for router in routers:
                router.set_rectify_options(eval_options(args, mode))
            _current_eval_label[0] = mode
            replay = None if recorder is None else iter(list(recorder.batches))
            original(
                f"{prefix} [eval rectify {mode}]", forward_step_func, replay, model, *rest, **kw
            )
        for router, options in zip(routers, trained, strict=True):
            router.set_rectify_options(options)
        _current_eval_label[0] = AS_TRAINED

    megatron_training.evaluate_and_print_results = evaluate_in_every_mode


def main() -> None:
    """Observe, then run the project's training entry point unchanged."""
    from megatron.rectify.training import cpu_emulation_requested
    from megatron.rectify.training import main as pretrain_main

    modes = pop_eval_modes(sys.argv)
    unit_gate = pop_flag(sys.argv, UNIT_GATE_FLAG)
    if cpu_emulation_requested():  # before megatron's modules load, as the entry point does
        from megatron.rectify.testing import cpu_emulation

        cpu_emulation.activate()
    install_observer()
    if unit_gate:
        install_unit_gate()
    report_routing_metrics_always()
    if modes:
        install_extra_evaluations(modes)
    if "--moe-use-upcycling" in sys.argv:
        allow_megatron_upcycling()
    pretrain_main()
    print_eval_summary()


if __name__ == "__main__":
    main()
