"""``pretrain_gpt_rectify.py`` with the routing observation the quality benchmark needs.

The quality benchmark compares vanilla top-k routing with rectified routing, so it needs the
same dropped / padded / lost rates for *every* variant, and it needs them for the held-out
evaluation too (inference-only rectification changes routing only there). The product already
counts rectified calls and megatron's own top-k-with-capacity calls in its training log and
final "rectify routing summary"; this script adds, through the product's public observation
points only (``moe_layer.add_routing_observer``, ``RectifyRouter.set_unit_gate``,
``RectifyRouter.set_rectify_options``):

* every evaluation-mode call (vanilla or rectified) accumulated per layer and printed at the
  end as ``quality eval routing summary`` lines;
* dropless vanilla training calls counted as what they are (nothing dropped, nothing padded),
  which the product leaves uncounted, so the capacity sweep's dropless row has its rates;
* with ``--quality-eval-modes ir,fr,ir+fr`` (removed from the command line before megatron
  parses it), every evaluation pass repeated under each listed rectification, on the very same
  batches (recorded during the first pass and replayed). That is inference-only rectification
  measured *paired*: same weights, same held-out tokens, only the routing differs, and no second
  process or checkpoint is needed. Lines read ``... on test set [eval rectify ir] | lm loss ...``;
* with ``--quality-unit-gate`` (also removed before megatron parses), the routers' gate-scaling
  control switched on before the first forward (``RectifyRouter.set_unit_gate``: vanilla top-1
  weights ``1 + p - sg(p)``, as a rectified top-1 router does), through the entry point's
  ``training.add_model_built_callback``.

Then it runs ``megatron.rectify.training.main`` unchanged. Launch it exactly like
``pretrain_gpt_rectify.py`` (torchrun, same flags). What still wraps code that is not ours:
megatron's ``evaluate_and_print_results`` (the extra passes, benchmark-only). Upcycling
(``--moe-use-upcycling``) needs nothing here: the product handles megatron-core 0.19.2's two
bugs on that path itself (``megatron_patches.fix_upcycling_load_keyword``, and the model
provider's dense-model settings).
"""

from __future__ import annotations

import sys
import weakref
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
#: layer -> {evaluation label -> summed counts}, over every evaluation call.
_eval_totals: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
#: Whether this rank prints the evaluation summary. Decided while the process groups exist:
#: the summary is printed after ``pretrain`` has torn them down, when every rank would read
#: itself as data-parallel rank 0 (and all of them printed, the last one read by the report).
_prints_eval_summary = [False]


def dropless_statistics(probs: torch.Tensor, routing_map: torch.Tensor, topk: int):
    """``RoutingStatistics`` of a dropless megatron top-k call: every request kept (the pairs
    with a non-zero probability), no slot to pad (the slots are the kept requests).

    NOTE: the product counts only calls with a capacity (``routing_statistics_available``);
    this keeps the benchmark's dropless rows at their true 0 % until the product counts
    dropless top-k calls itself.
    """
    from megatron.rectify.statistics import RoutingStatistics

    num_tokens = routing_map.shape[0]
    kept_map = routing_map & (probs.detach() != 0)
    kept = kept_map.sum()
    zero = torch.zeros((), dtype=kept.dtype, device=kept.device)
    return RoutingStatistics(
        num_tokens=num_tokens,
        num_requests=num_tokens * topk,
        slots=int(kept),
        dropped=num_tokens * topk - kept,
        filled_in=zero,
        rectified=zero,
        occupied=kept,
        padded=zero,
        lost=(~kept_map.any(dim=1)).sum(),
        expert_load=kept_map.sum(dim=0),
    )


def accumulate(totals: dict[str, float], stats) -> None:
    """Add one call's counts to ``totals`` (one host sync per call: evaluation only)."""
    for name in (*_COUNT_NAMES, *_TOTAL_NAMES):
        totals[name] = totals.get(name, 0.0) + float(getattr(stats, name))


def observe_routing(layer, stats, training: bool) -> None:
    """The routing observer: dropless training calls feed the layer's statistics (the product
    has none for them), every evaluation call feeds ``_eval_totals``."""
    if stats is None:
        if layer.config.moe_expert_capacity_factor is not None:
            return  # no truthful count (sinkhorn, replayed routing): nothing to add
        output = layer.router.last_output
        stats = dropless_statistics(output.probs, output.routing_map, layer.router.topk)
        if training:
            layer.record_statistics(stats)
    if not layer.training:
        _prints_eval_summary[0] = is_first_data_parallel_rank()
        per_label = _eval_totals.setdefault(layer, {})
        accumulate(per_label.setdefault(_current_eval_label[0], {}), stats)


def install_observer() -> None:
    from megatron.rectify.moe_layer import add_routing_observer

    add_routing_observer(observe_routing)


def is_first_data_parallel_rank() -> bool:
    """The rank whose tokens the summaries report: data- and tensor-parallel rank 0, as for the
    training summary (``megatron.rectify.training.run.print_routing_summary``)."""
    from megatron.core import parallel_state

    return (
        parallel_state.get_data_parallel_rank() == 0
        and parallel_state.get_tensor_model_parallel_rank() == 0
    )


def print_eval_summary() -> None:
    """Per MoE layer: routing rates over every evaluation call (first data-parallel rank)."""
    from megatron.rectify.statistics import routing_rates
    from megatron.rectify.training.built_models import BUILT_MODELS

    if not _prints_eval_summary[0]:
        return
    layers = BUILT_MODELS.moe_layers()
    observed = [(layer.layer_number, _eval_totals.get(layer, {})) for layer in layers]
    if not any(per_label for _, per_label in observed):
        return
    print(
        f"{EVAL_SUMMARY_HEADER} (data-parallel rank 0's tokens, all evaluation passes):",
        flush=True,
    )
    for number, per_label in observed:
        for label, totals in per_label.items():
            r = routing_rates(totals)
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
    """Switch every router's gate-scaling control on (``RectifyRouter.set_unit_gate``) in each
    model chunk the training entry point builds, before the chunk's first forward."""
    from megatron.rectify.moe_layer import RectifyMoELayer
    from megatron.rectify.training import add_model_built_callback

    def switch_on(model: torch.nn.Module) -> None:
        for module in model.modules():
            if isinstance(module, RectifyMoELayer):
                module.router.set_unit_gate(True)

    add_model_built_callback(switch_on)


def eval_options(args: Any, mode: str):
    """``RectifyOptions`` for an extra evaluation pass, from the run's own rectify flags."""
    import copy

    from megatron.rectify.config import rectify_options_from_config

    if args.moe_rectify_ir_trigger == "any" and "fr" in mode:
        args = copy.copy(args)  # `any` with FR is refused; ignore_kth is its FR form
        args.moe_rectify_ir_trigger = "ignore_kth"
    return rectify_options_from_config(args, mode)


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
    from megatron.rectify.dev.mode import activate_cpu_emulation, cpu_emulation_requested
    from megatron.rectify.training import main as pretrain_main

    modes = pop_eval_modes(sys.argv)
    unit_gate = pop_flag(sys.argv, UNIT_GATE_FLAG)
    if cpu_emulation_requested():  # before megatron's modules load, as the entry point does
        activate_cpu_emulation()
    install_observer()
    if unit_gate:
        install_unit_gate()
    if modes:
        install_extra_evaluations(modes)
    pretrain_main()
    print_eval_summary()


if __name__ == "__main__":
    main()
