"""Turn one training log into the numbers the report needs.

The log is megatron's own (iteration lines, ``validation loss at ... on test set`` lines) plus
the two summaries the training prints at the end: ``rectify routing summary`` (training calls,
from ``megatron.rectify.training``) and ``quality eval routing summary`` (evaluation calls, from
``pretrain_observed.py``). Parsing the text rather than hooking into the process keeps the
benchmark usable on any log of ``pretrain_gpt_rectify.py``, including ones from a cluster.
"""

from __future__ import annotations

import re
import statistics
from typing import Any

AS_TRAINED = "as trained"
_ITERATION = re.compile(r"\] iteration\s+(\d+)/\s*(\d+) \|(.*)$", re.MULTILINE)
_FIELD = re.compile(r"\s*([A-Za-z_ ()]+?):\s+([-+0-9.eE]+|nan|inf)\s*$")
_HELDOUT = re.compile(
    r"validation loss at iteration (\d+) on (validation|test) set"
    r"(?: \[eval rectify ([^\]]+)\])? \| lm loss value: ([-+0-9.eE]+)"
)
_TRAIN_LAYER = re.compile(
    r"^\s+MoE layer (\d+): dropped ([0-9.]+) % \| padded ([0-9.]+) % \| filled-in ([0-9.]+) % "
    r"\| rectified ([0-9.]+) %",
    re.MULTILINE,
)
_EVAL_LAYER = re.compile(
    r"^\s+eval \[([^\]]+)\] MoE layer (\d+): dropped ([0-9.]+) % \| padded ([0-9.]+) % \| "
    r"filled-in ([0-9.]+) % \| rectified ([0-9.]+) % \| lost ([0-9.]+) %",
    re.MULTILINE,
)
RATE_NAMES = ("dropped_pct", "padded_pct", "filled_in_pct", "rectified_pct")
#: iteration-line field -> record key
_CURVE_FIELDS = {
    "lm loss": "lm_loss",
    "load_balancing_loss": "load_balancing_loss",
    "rectify_dropped_pct": "dropped_pct",
    "rectify_padded_pct": "padded_pct",
    "rectify_filled_in_pct": "filled_in_pct",
    "rectify_rectified_pct": "rectified_pct",
    "elapsed time per iteration (ms)": "ms_per_iter",
}


def parse_curve(log: str) -> list[dict[str, float]]:
    """One entry per logged iteration: lm loss, aux loss, routing rates, step time."""
    curve = []
    for match in _ITERATION.finditer(log):
        entry: dict[str, float] = {"iteration": int(match.group(1))}
        for part in match.group(3).split("|"):
            field = _FIELD.match(part)
            if field and field.group(1).strip() in _CURVE_FIELDS:
                entry[_CURVE_FIELDS[field.group(1).strip()]] = float(field.group(2))
        if "lm_loss" in entry:
            curve.append(entry)
    return curve


def parse_heldout(log: str) -> dict[str, dict[str, float]]:
    """``{eval mode: {"validation": loss, "test": loss}}``; the last evaluation wins."""
    heldout: dict[str, dict[str, float]] = {}
    for match in _HELDOUT.finditer(log):
        mode = match.group(3) or AS_TRAINED
        heldout.setdefault(mode, {})[match.group(2)] = float(match.group(4))
    return heldout


def _layer_summary(layers: dict[int, dict[str, float]]) -> dict[str, Any]:
    names = sorted({name for rates in layers.values() for name in rates})
    mean = {name: statistics.fmean(rates[name] for rates in layers.values()) for name in names}
    return {"per_layer": {str(n): layers[n] for n in sorted(layers)}, "mean": mean}


def parse_train_routing(log: str) -> dict[str, Any] | None:
    """The final per-layer training summary (this rank's tokens over all iterations)."""
    at = log.rfind("rectify routing summary")
    if at < 0:
        return None
    layers = {
        int(m.group(1)): dict(zip(RATE_NAMES, map(float, m.groups()[1:]), strict=True))
        for m in _TRAIN_LAYER.finditer(log, at)
    }
    return _layer_summary(layers) if layers else None


def parse_eval_routing(log: str) -> dict[str, dict[str, Any]]:
    """``{eval mode: summary}`` from the evaluation routing summary."""
    per_mode: dict[str, dict[int, dict[str, float]]] = {}
    for m in _EVAL_LAYER.finditer(log):
        rates = dict(zip((*RATE_NAMES, "lost_pct"), map(float, m.groups()[2:]), strict=True))
        per_mode.setdefault(m.group(1), {})[int(m.group(2))] = rates
    return {mode: _layer_summary(layers) for mode, layers in per_mode.items()}


def heldout_loss(losses: dict[str, float]) -> float | None:
    """The benchmark's held-out loss: the mean of the validation and test losses. Both splits
    are documents never trained on and are evaluated on the same number of sequences, so the
    mean halves the noise of a single split at no extra cost."""
    values = [losses[split] for split in ("validation", "test") if split in losses]
    return statistics.fmean(values) if values else None


def steady_step_ms(curve: list[dict[str, float]]) -> float | None:
    """Median logged step time, without the first window (start-up, first all-to-alls)."""
    times = [entry["ms_per_iter"] for entry in curve[1:] if "ms_per_iter" in entry]
    return statistics.median(times) if times else None


def parse_log(log: str) -> dict[str, Any]:
    """Everything above as one JSON-ready record."""
    curve = parse_curve(log)
    heldout = parse_heldout(log)
    return {
        "curve": curve,
        "heldout": {
            mode: {**losses, "loss": heldout_loss(losses)} for mode, losses in heldout.items()
        },
        "train_routing": parse_train_routing(log),
        "eval_routing": parse_eval_routing(log),
        "ms_per_iter": steady_step_ms(curve),
    }
