"""JSON results -> ``perf.md`` (tables, headline, targets) and PNG plots, next to the JSON.

Pure post-processing: it reads ``perf_<part>.json`` files and never measures, so the report can
be rebuilt (``python -m benchmarks.perf --report-only``) and tested without running anything.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

PARTS = ("router", "layer", "iteration", "bytes")
LAYER_TARGET = 1.15  # rectified / vanilla MoE layer cost on CPU (issue target)
MODE_NAMES = {
    "none": "vanilla top-k",
    "ir": "IR",
    "fr": "FR",
    "ir+fr": "IR+FR",
    "redispatch": "re-dispatch to next choice (baseline)",
}
PART_TITLES = {
    "router": "Router forward+backward: RectifyRouter (IR+FR) / TopKRouter",
    "layer": "One MoE layer forward+backward: RectifyMoELayer (IR+FR) / MoELayer",
    "iteration": "Full training iteration: MoE GPT with IR+FR / with megatron's routing",
    "bytes": "EP all-to-all bytes sent to other ranks",
}

Column = tuple[str, Callable[[dict[str, Any]], Any]]


# ---- formatting -----------------------------------------------------------------------------


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 10 else f"{value:,.1f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[Column]) -> str:
    """A markdown table; numbers right-aligned."""
    header = "| " + " | ".join(name for name, _ in columns) + " |"
    rule = "|" + "|".join("---:" for _ in columns) + "|"
    body = ["| " + " | ".join(_fmt(get(row)) for _, get in columns) + " |" for row in rows]
    return "\n".join([header, rule, *body])


def _key(name: str, digits: int | None = None) -> Callable[[dict[str, Any]], Any]:
    def get(row: dict[str, Any]) -> Any:
        value = row.get(name)
        if digits is None or value is None:
            return value
        return int(round(value)) if digits == 0 else round(value, digits)

    return get


def _ratio(row: dict[str, Any]) -> str:
    return f"**{row['ratio']:.2f}**"


def _spread(row: dict[str, Any]) -> str:
    return f"{row['ratio_q1']:.2f}-{row['ratio_q3']:.2f}"


def _is_gpu(result: dict[str, Any]) -> bool:
    return not result["machine"]["device"].startswith("cpu")


# ---- which rows belong to which axis --------------------------------------------------------


def axis_rows(result: dict[str, Any], axis: str) -> list[dict[str, Any]]:
    """Rows of ``result`` that differ from the base case in ``axis`` only, sorted by it."""
    base = result["sweep"]["base"]
    others = [k for k in base if k != axis]
    rows = [r for r in result["rows"] if all(r.get(k) == base[k] for k in others)]
    return sorted(rows, key=lambda r: r[axis])


def base_row(result: dict[str, Any]) -> dict[str, Any] | None:
    base = result["sweep"]["base"]
    return next((r for r in result["rows"] if all(r.get(k) == v for k, v in base.items())), None)


def ordered_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Base case first, then each swept axis's rows by value (the order the plots read)."""
    base = base_row(result)
    rows = [base] if base else []
    for axis in result["sweep"]["axes"]:
        rows += [r for r in axis_rows(result, axis) if r is not base and r not in rows]
    return rows + [r for r in result["rows"] if r not in rows]


def _axis_label(result: dict[str, Any], row: dict[str, Any]) -> str:
    """Which swept axis a row belongs to ("base" for the base case)."""
    base = result["sweep"]["base"]
    changed = [k for k in base if row.get(k) != base[k]]
    return "base" if not changed else ", ".join(changed)


# ---- part tables ----------------------------------------------------------------------------

_RATES: list[Column] = [
    ("dropped %", _key("dropped_pct", 1)),
    ("filled-in %", _key("filled_in_pct", 1)),
    ("rectified %", _key("rectified_pct", 1)),
]


def _timing_columns(result: dict[str, Any], per: str) -> list[Column]:
    columns: list[Column] = [
        ("vanilla ms", _key("vanilla_ms", 1)),
        ("rectified ms", _key("rectified_ms", 1)),
        ("ratio", _ratio),
        ("ratio q1-q3", _spread),
        ("repeats", _key("repeats")),
        *_RATES,
        (f"vanilla tokens/s {per}", _key("vanilla_tokens_per_s", 0)),
        (f"rectified tokens/s {per}", _key("rectified_tokens_per_s", 0)),
    ]
    if _is_gpu(result) and result["part"] != "router":
        columns += [
            ("vanilla TFLOP/s/GPU", _key("vanilla_tflops", 1)),
            ("rectified TFLOP/s/GPU", _key("rectified_tflops", 1)),
            ("vanilla peak GiB", _key("vanilla_peak_gib", 2)),
            ("rectified peak GiB", _key("rectified_peak_gib", 2)),
        ]
    return columns


def router_table(result: dict[str, Any]) -> str:
    columns: list[Column] = [
        ("swept", lambda r: _axis_label(result, r)),
        ("tokens", _key("tokens")),
        ("hidden", _key("hidden")),
        ("experts", _key("experts")),
        ("top-k", _key("topk")),
        ("capacity", _key("capacity_factor")),
        *_timing_columns(result, "(device)"),
    ]
    return markdown_table(ordered_rows(result), columns)


def layer_table(result: dict[str, Any]) -> str:
    columns: list[Column] = [
        ("swept", lambda r: _axis_label(result, r)),
        ("EP", _key("ep")),
        ("tokens/rank", _key("tokens")),
        ("hidden", _key("hidden")),
        ("FFN", lambda r: r["ffn_mult"] * r["hidden"]),
        ("experts", _key("experts")),
        ("top-k", _key("topk")),
        ("capacity", _key("capacity_factor")),
        ("pad", _key("pad")),
        *_timing_columns(result, "per rank"),
    ]
    return markdown_table(ordered_rows(result), columns)


def iteration_table(result: dict[str, Any]) -> str:
    columns: list[Column] = [
        ("swept", lambda r: _axis_label(result, r)),
        ("EP", _key("ep")),
        ("layers", _key("layers")),
        ("hidden", _key("hidden")),
        ("experts", _key("experts")),
        ("top-k", _key("topk")),
        ("capacity", _key("capacity_factor")),
        ("batch x seq / rank", lambda r: f"{r['micro_batch']}x{r['seq_length']}"),
        *_timing_columns(result, "per rank"),
    ]
    return markdown_table(ordered_rows(result), columns)


def _bytes_vs_vanilla(row: dict[str, Any], mode: str) -> str:
    sent, vanilla = row["modes"][mode]["payload_bytes"], row["modes"]["none"]["payload_bytes"]
    return f"{sent / vanilla:.3f}" if vanilla else "n/a"


def bytes_iteration_table(row: dict[str, Any]) -> str:
    vanilla = row["modes"]["none"]["payload_bytes"]
    rows = [{"mode": mode, **row["modes"][mode]} for mode in row["modes"]]
    columns: list[Column] = [
        ("routing", lambda r: MODE_NAMES.get(r["mode"], r["mode"])),
        ("bytes / iteration (all ranks)", _key("payload_bytes")),
        ("vs vanilla", lambda r: _bytes_vs_vanilla(row, r["mode"])),
        ("extra bytes", lambda r: r["payload_bytes"] - vanilla),
        ("metadata bytes", _key("metadata_bytes")),
        ("top-k requests dropped", lambda r: r.get("dropped")),
        ("rectified (IR)", lambda r: r.get("rectified")),
        ("filled-in (FR)", lambda r: r.get("filled_in")),
        ("re-dispatched (to another rank)", _redispatched),
    ]
    return markdown_table(rows, columns)


def _redispatched(row: dict[str, Any]) -> str | None:
    if "redispatched_tokens" not in row:
        return None
    return f"{row['redispatched_tokens']:,} ({row['redispatched_remote']:,})"


def bytes_layer_table(rows: list[dict[str, Any]]) -> str:
    def sent(mode: str) -> Callable[[dict[str, Any]], Any]:
        return lambda r: r["modes"][mode]["payload_bytes"]

    columns: list[Column] = [
        ("EP", _key("ep")),
        ("top-k", _key("topk")),
        ("capacity", _key("capacity_factor")),
        ("pad", _key("pad")),
        ("vanilla", sent("none")),
        ("IR", sent("ir")),
        ("FR", sent("fr")),
        ("IR+FR", sent("ir+fr")),
        ("IR+FR extra", lambda r: sent("ir+fr")(r) - sent("none")(r)),
        ("re-dispatch", sent("redispatch")),
        ("re-dispatch / vanilla", lambda r: _bytes_vs_vanilla(r, "redispatch")),
        ("dropped requests", lambda r: r["modes"]["ir+fr"].get("dropped")),
        ("re-dispatched (remote)", lambda r: _redispatched(r["modes"]["redispatch"])),
    ]
    return markdown_table(rows, columns)


def part_markdown(result: dict[str, Any]) -> str:
    """The tables of one part (also printed by the driver right after measuring)."""
    part = result["part"]
    if part == "router":
        return router_table(result)
    if part == "layer":
        return layer_table(result)
    if part == "iteration":
        return iteration_table(result)
    rows = result["rows"]
    return (
        f"Per training iteration (the iteration part's base model after "
        f"{rows['iteration'].get('trained', 0)} training iterations, forward+backward, every "
        "MoE layer):\n\n" + bytes_iteration_table(rows["iteration"]) + "\n\nOne MoE layer "
        "forward+backward, bytes summed over the EP ranks:\n\n" + bytes_layer_table(rows["layer"])
    )


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
                f"(q1-q3 {_spread(row)}) at the base case {_case_words(results[part])}{rates}"
            )
    if "layer" in results:
        lines.append(layer_target_line(results["layer"]))
    if "bytes" in results:
        lines.extend(bytes_headline(results["bytes"]["rows"]["iteration"]))
    return lines


def _case_words(result: dict[str, Any]) -> str:
    base = result["sweep"]["base"]
    skip = {"ffn_mult", "heads", "vocab"}
    return "(" + ", ".join(f"{k} {v}" for k, v in base.items() if k not in skip) + ")"


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


# ---- plots ----------------------------------------------------------------------------------

AXES = ("hidden", "experts", "topk", "capacity_factor", "ep")
PART_COLORS = {"router": "C0", "layer": "C1", "iteration": "C2"}
AXIS_LABELS = {
    "hidden": "hidden size",
    "experts": "experts",
    "topk": "top-k",
    "capacity_factor": "capacity factor",
    "ep": "expert-parallel size",
}


def _plot_axis(ax: Any, results: dict[str, dict[str, Any]], axis: str) -> bool:
    xs: set[Any] = set()
    for part in ("router", "layer", "iteration"):
        if part not in results or axis not in results[part]["sweep"]["axes"]:
            continue
        rows = axis_rows(results[part], axis)
        if len(rows) < 2:
            continue
        x = [r[axis] for r in rows]
        y = [r["ratio"] for r in rows]
        # the ratio of medians may lie outside q1-q3 of the per-repeat ratios: clamp the bars
        err = [
            [max(0.0, r["ratio"] - r["ratio_q1"]) for r in rows],
            [max(0.0, r["ratio_q3"] - r["ratio"]) for r in rows],
        ]
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=part, color=PART_COLORS[part])
        xs.update(x)
    if xs:
        _style_axis(ax, axis, sorted(xs))
    return bool(xs)


def _style_axis(ax: Any, axis: str, xs: list[Any]) -> None:
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.axhline(
        LAYER_TARGET,
        color="red",
        linestyle="--",
        linewidth=0.8,
        label=f"layer target {LAYER_TARGET}",
    )
    ax.set_xlabel(AXIS_LABELS[axis])
    ax.set_ylabel("rectified / vanilla time")
    if axis in ("hidden", "experts", "ep"):
        ax.set_xscale("log", base=2)
    if axis != "capacity_factor":  # integer settings: label exactly the measured ones
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.minorticks_off()
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)


def plot_ratio_vs_hidden(results: dict[str, dict[str, Any]], out_dir: Path) -> Path | None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    drawn = _plot_axis(ax, results, "hidden")
    path = out_dir / "perf_ratio_vs_hidden.png"
    if drawn:
        ax.set_title("Cost ratio vs hidden size (median, q1-q3)")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    plt.close(fig)
    return path if drawn else None


def plot_ratio_by_axis(results: dict[str, dict[str, Any]], out_dir: Path) -> Path | None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    drawn = [_plot_axis(ax, results, axis) for ax, axis in zip(axes.flat, AXES[1:], strict=True)]
    path = out_dir / "perf_ratio_by_axis.png"
    if any(drawn):
        fig.suptitle("Cost ratio rectified / vanilla per swept axis (median, q1-q3)")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    plt.close(fig)
    return path if any(drawn) else None


def plot_bytes(results: dict[str, dict[str, Any]], out_dir: Path) -> Path | None:
    import matplotlib.pyplot as plt

    if "bytes" not in results:
        return None
    modes = results["bytes"]["rows"]["iteration"]["modes"]
    vanilla = modes["none"]["payload_bytes"]
    names = [MODE_NAMES[m].replace(" (baseline)", "\n(baseline)") for m in modes]
    values = [modes[m]["payload_bytes"] / vanilla for m in modes]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    bars = ax.bar(names, values, color=["grey", "C0", "C1", "C2", "C3"][: len(values)])
    ax.bar_label(bars, fmt="%.3f")
    ax.set_ylim(0, 1.15 * max(values))
    ax.set_ylabel("bytes / vanilla bytes")
    ax.set_title("EP all-to-all bytes to other ranks per training iteration")
    ax.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    path = out_dir / "perf_bytes.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


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
    if result["part"] != "bytes":
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
    }
    return notes[result["part"]]


def write_report(out_dir: Path, name: str = "perf.md") -> list[Path]:
    """Plots + markdown from the JSON in ``out_dir``; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    results = load_results(out_dir)
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
