"""JSON results -> ``perf.md`` (headline, targets, per-part sections) and PNG plots, next to
the JSON.

Pure post-processing: it reads ``perf_<part>.json`` files and never measures, so the report can
be rebuilt (``python -m benchmarks.perf --report-only``) and tested without running anything.
Tables are in ``tables``, plots in ``plots``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from benchmarks.perf.plots import LAYER_TARGET, plot_bytes, plot_ratio_by_axis, plot_ratio_vs_hidden
from benchmarks.perf.tables import base_row, part_markdown, spread

PARTS = ("router", "layer", "iteration", "bytes", "syncs")
PART_TITLES = {
    "router": "Router forward+backward: RectifyRouter (IR+FR) / TopKRouter",
    "layer": "One MoE layer forward+backward: RectifyMoELayer (IR+FR) / MoELayer",
    "iteration": "Full training iteration: MoE GPT with IR+FR / with megatron's routing",
    "bytes": "EP all-to-all bytes sent to other ranks",
    "syncs": "Host synchronisations per MoE layer forward+backward",
}


# ---- headline -------------------------------------------------------------------------------


def headline(results: dict[str, dict[str, Any]]) -> list[str]:
    """The summary lines: base-case ratios, the layer target, the byte accounting."""
    lines = []
    for part in ("router", "layer", "iteration"):
        if part in results and (row := base_row(results[part])):
            rates = ""
            if "dropped_pct" in row:
                rates = (
                    f"; {row['dropped_pct']:.1f} % of top-k requests dropped, "
                    f"{row['rectified_pct']:.1f} % of tokens computed by IR"
                )
            lines.append(
                f"- **{part}**: rectified / vanilla = **{row['ratio']:.2f}** "
                f"(q1-q3 {spread(row)}) at the base case {_case_words(results[part])}{rates}"
            )
    if "layer" in results:
        lines.append(layer_target_line(results["layer"]))
    if "bytes" in results:
        lines.extend(bytes_headline(results["bytes"]["rows"]["iteration"]))
    return lines


def _case_words(result: dict[str, Any]) -> str:
    base = result["sweep"]["base"]
    skip = {"ffn_mult", "heads", "vocab", "vanilla_dropless"}
    words = [f"{k} {v}" for k, v in base.items() if k not in skip and v is not None]
    return "(" + ", ".join(words) + ")"


def layer_target_line(result: dict[str, Any]) -> str:
    rows = result["rows"]
    met = [r for r in rows if r["ratio"] <= LAYER_TARGET]
    row = base_row(result)
    verdict = "met" if row and row["ratio"] <= LAYER_TARGET else "NOT met"
    return (
        f"- layer target rectified / vanilla <= {LAYER_TARGET}: **{verdict}** at the base case; "
        f"{len(met)} of {len(rows)} swept layer settings are within it"
    )


def bytes_headline(row: dict[str, Any]) -> list[str]:
    modes = row["modes"]
    vanilla = modes["none"]["payload_bytes"]
    rectified = modes["ir+fr"]["payload_bytes"]
    requests = row["ranks"] * row.get("micro_batch", 0) * row.get("seq_length", 0)
    requests *= row.get("layers", 0) * row.get("topk", 0)
    dropped = modes["ir+fr"].get("dropped")
    context = f", {100 * dropped / requests:.0f} % of top-k requests dropped" if requests else ""
    lines = [
        f"- **EP all-to-all bytes per iteration** (all ranks, forward+backward{context}): "
        f"vanilla {vanilla:,}, IR+FR {rectified:,} (extra **{rectified - vanilla:,}**, asserted 0)"
    ]
    if "redispatch" in modes:
        baseline = modes["redispatch"]["payload_bytes"]
        lines[0] += (
            f", re-dispatch baseline {baseline:,} (**{baseline / vanilla:.2f}x** vanilla, "
            f"+{modes['redispatch']['metadata_bytes']:,} metadata bytes)"
        )
    return lines


# ---- the document ---------------------------------------------------------------------------


def load_results(out_dir: Path) -> dict[str, dict[str, Any]]:
    """Every ``perf_<part>.json`` present in ``out_dir``."""
    results = {}
    for part in PARTS:
        path = out_dir / f"perf_{part}.json"
        if path.exists():
            results[part] = json.loads(path.read_text())
    return results


def _provenance(result: dict[str, Any]) -> str:
    m = result["machine"]
    text = (
        f"Command: `{result['command']}` - {m['date']} - {m['device']}, {m['cpu']} "
        f"({m['logical_cpus']} logical CPUs), torch {m['torch']}, megatron-core "
        f"{m['megatron_core']}"
    )
    if result["part"] not in ("bytes", "syncs"):
        text += f" - {result['warmup']} warm-up rounds, then at least {result['repeats']} timed"
        text += f" repeats (more within {result.get('budget_s', 0):g} s per setting)"
    text += f" - wall time {result['wall_s']:.0f} s"
    if "load_average" in m:  # other processes' load on a shared machine moves the noise
        before = result.get("load_average_before", "?")
        text += f" - 1-minute load average before / after: {before} / {m['load_average']}"
    return text + "."


def render(results: dict[str, dict[str, Any]], images: list[Path]) -> str:
    lines = [
        "# Cost of the Rectify-Router: performance results",
        "",
        "Generated by `make bench-perf` (`python -m benchmarks.perf`, code in `benchmarks/perf/`)"
        " from the `perf_*.json` files next to this page; do not edit by hand.",
        "",
        "Every time ratio is rectified (IR+FR) / vanilla megatron-core routing, **measured in "
        "the same run**: both variants are built in the same processes from the same weights, "
        "run on the same tokens, and are timed alternately (order swapped every repeat). A "
        "repeat's time is the slowest rank's; *ratio* is the median of the per-repeat ratios "
        "and q1-q3 their quartiles (the noise); the ms columns are median times. On CPU, every "
        "rank is one gloo process with one thread under the CPU emulation: the figures bound "
        "the cost of the routing logic and the extra IR work, not GPU throughput. The machine "
        "is shared, so each section states the load average around its run.",
        "",
        "## Headline",
        "",
        *headline(results),
        "",
    ]
    lines += [f"![{image.stem}]({image.name})\n" for image in images]
    for part in PARTS:
        if part in results:
            lines += [f"## {PART_TITLES[part]}", "", _provenance(results[part]), ""]
            lines += [part_notes(results[part]), "", part_markdown(results[part]), ""]
    return "\n".join(lines)


def part_notes(result: dict[str, Any]) -> str:
    """What each part measures (setup details the tables do not show)."""
    notes = {
        "router": "One router call on T tokens (no EP dependence), same weights and input for "
        "both routers, `--moe-rectify ir+fr --moe-rectify-ir-trigger ignore_kth`, fill-in "
        "candidates `next`, aux loss off, top-1 with `--moe-router-pre-softmax`. The loss sums "
        "the gate weights and the IR weights, so the backward covers the gating GEMM and every "
        "differentiable routing op.",
        "layer": "Megatron's local spec (`SequentialMLP` experts; the TE grouped-GEMM spec with "
        "`--te`), alltoall dispatcher, `--moe-pad-expert-input-to-capacity`, aux loss off; "
        "forward + backward of `<output, random upstream>`. Tokens/s per rank; TFLOP/s (GPU) are "
        "model FLOPs (k experts per token + gating, x3), the same work credited to both.",
        "iteration": "megatron-core's `GPTModel` (every layer MoE, learned positions, byte-level "
        "vocabulary 256, data = Python's standard library source), megatron's DDP, Adam "
        "optimizer and pipeline schedule (one micro-batch), aux loss 0.01, capacity padding. "
        "Both models start from the same weights and step through the same batches; their "
        "weights then evolve separately. Routing rates: over the timed iterations, averaged "
        "over layers and ranks (a small byte-level model routes unevenly early in training, so "
        "many tokens are dropped: IR computes all of them).",
        "bytes": "Bytes counted by wrapping `torch.distributed.all_to_all_single` (forward and "
        "the mirrored backward all-to-alls) and summing, per call on the EP group, the rows each "
        "rank sends to *other* ranks; every mode from the same weights and tokens. The "
        "benchmark asserts IR, FR and IR+FR == vanilla bytes with padding, IR == vanilla without "
        "padding, re-dispatch >= vanilla. The re-dispatch baseline (comparison only, "
        "`benchmarks/perf/redispatch.py`) sends each token that lost a top-k choice to its "
        "(k+1)-th choice in a second all-to-all round (no padding, no capacity). Without "
        "padding, FR adds the filled-in tokens' bytes (rows with pad = no).",
        "syncs": "Operations that make the host wait for the GPU, per MoE layer call (forward "
        "and backward), counted on rank 0 after one warm-up call, every mode from the same "
        "weights and tokens; `tp` is tensor = expert-tensor parallelism (sequence parallel). "
        "On CPU they are counted by rule (`.item()`, `.tolist()`, `nonzero`, boolean-mask "
        "indexing, `bincount`, explicit `synchronize`, ...: `benchmarks/perf/syncs.py`), on a "
        "GPU with `torch.cuda.set_sync_debug_mode`. `ir static` / `ir+fr static`: static IR "
        "(`--moe-rectify-ir-capacity-factor 0.25`, a fixed-size IR batch). Targets: FR and "
        "static IR add 0 syncs to megatron's path; dynamic IR (a variable-sized IR batch) stays "
        "at its measured count, 4 per layer call (6 with expert-TP).",
    }
    return notes[result["part"]]


def write_report(out_dir: Path, name: str = "perf.md") -> list[Path]:
    """Plots + markdown from the JSON in ``out_dir``; returns the files written. Without
    matplotlib (the lent GPU machine's image has none) the markdown comes without plots."""
    results = load_results(out_dir)
    images: list[Path] = []
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: report without plots")
    else:
        matplotlib.use("Agg")
        images = [
            path
            for path in (
                plot_ratio_vs_hidden(results, out_dir),
                plot_ratio_by_axis(results, out_dir),
                plot_bytes(results, out_dir),
            )
            if path is not None
        ]
    report = out_dir / name
    report.write_text(render(results, images) + "\n")
    return [report, *images]
