"""``docs/results/at-scale.md`` from ``at-scale.json``: headline, assumptions, validation, tables.

Everything on the page is computed from the JSON (the headline's numbers too), so that
``python -m benchmarks.at_scale --report-only`` after a change of wording, or a rerun on another
machine, never leaves a stale number behind.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

BASE_MODE = "Top-1 cf 1.0"
FR_IR = "Top-1 cf 1.0 + FR+IR"
HALF, HALF_IR = "Top-1 cf 0.5", "Top-1 cf 0.5 + IR"
DROPLESS = "Top-1 dropless"
TOP2, TOP2_FR_IR = "Top-2 cf 1.0", "Top-2 cf 1.0 + FR+IR"


# ---- small helpers -------------------------------------------------------------------------


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---:|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def pct(x: float | None, digits: int = 0) -> str:
    if x is None:
        return "—"
    text = f"{100 * x:+.{digits}f}"
    return ("0" if float(text) == 0 else text) + " %"


def num(x: float | None, digits: int = 1) -> str:
    return "—" if x is None else f"{x:,.{digits}f}"


def find(data: dict[str, Any], layout: str, mode: str, scenario: str = "measured") -> dict | None:
    for row in data["predictions"]:
        if (row["layout"], row["mode"], row["scenario"]) == (layout, mode, scenario):
            return row
    return None


def speed(data: dict[str, Any], layout: str, mode: str, scenario: str) -> float | None:
    row = find(data, layout, mode, scenario)
    return row["tokens_per_s"] if row else None


def loss_layouts(data: dict[str, Any]) -> list[str]:
    with_loss = {r["layout"] for r in data["predictions"] if r["loss"] is not None}
    return [lay["name"] for lay in data["layouts"] if lay["name"] in with_loss]


def span(values: list[float], fmt: Callable[[float], str]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "—"
    low, high = min(values), max(values)
    return fmt(low) if fmt(low) == fmt(high) else f"{fmt(low)} to {fmt(high)}"


def ratios(data: dict[str, Any], layouts: list[str], a: str, b: str) -> list[float]:
    """speed(a) / speed(b) - 1 per layout and scenario (where both exist)."""
    out = []
    for layout in layouts:
        for scenario in ("measured", "balanced"):
            sa, sb = speed(data, layout, a, scenario), speed(data, layout, b, scenario)
            if sa and sb:
                out.append(sa / sb - 1)
    return out


def pareto(data: dict[str, Any], layout: str, scenario: str) -> list[str]:
    """Modes no other mode beats on both loss (lower) and throughput (higher)."""
    rows = [
        r
        for r in data["predictions"]
        if r["layout"] == layout and r["scenario"] == scenario and r["loss"] is not None
    ]

    def beaten(r: dict[str, Any]) -> bool:
        return any(
            o["loss"] <= r["loss"]
            and o["tokens_per_s"] >= r["tokens_per_s"]
            and (o["loss"] < r["loss"] or o["tokens_per_s"] > r["tokens_per_s"])
            for o in rows
        )

    front = [r for r in rows if not beaten(r)]
    return [r["mode"] for r in sorted(front, key=lambda r: -r["tokens_per_s"])]


def loss_of(data: dict[str, Any], mode: str) -> str:
    for row in data["predictions"]:
        if row["mode"] == mode and row["loss"] is not None:
            return f"{row['loss']:.3f}"
    return "—"


# ---- sections ------------------------------------------------------------------------------


def more(values: list[float]) -> str:
    """Relative increases as 'N % more' or 'N-M % more' (all of ``values`` are >= 0 here;
    a decrease reads 'less')."""
    if not values:
        return "—"
    low, high = min(values), max(values)
    word = "more" if low >= 0 else "less" if high <= 0 else "more or less"
    a, b = sorted((round(abs(100 * low)), round(abs(100 * high))))
    return f"{a} % {word}" if a == b else f"{a}-{b} % {word}"


def time_ratios(data: dict[str, Any], layouts: list[str], a: str, b: str) -> list[float]:
    """Time per token of ``a`` / of ``b`` - 1, per layout and scenario."""
    return [1 / (1 + r) - 1 for r in ratios(data, layouts, a, b)]


def dominated(data: dict[str, Any], layouts: list[str]) -> dict[str, tuple[int, set[str]]]:
    """Mode -> (in how many (layout, scenario) cases another mode has a lower loss and more
    throughput, the modes that do)."""
    out: dict[str, tuple[int, set[str]]] = {}
    for layout in layouts:
        for scenario in ("measured", "balanced"):
            rows = [
                r
                for r in data["predictions"]
                if (r["layout"], r["scenario"]) == (layout, scenario) and r["loss"] is not None
            ]
            for r in rows:
                by = {
                    o["mode"]
                    for o in rows
                    if o["loss"] < r["loss"] and o["tokens_per_s"] > r["tokens_per_s"]
                }
                if by:
                    count, modes = out.get(r["mode"], (0, set()))
                    out[r["mode"]] = (count + 1, modes | by)
    return out


def _loss(data: dict[str, Any], mode: str) -> float | None:
    return next((r["loss"] for r in data["predictions"] if r["mode"] == mode and r["loss"]), None)


def headline(data: dict[str, Any]) -> list[str]:
    lays = loss_layouts(data)
    cases = len(lays) * 2
    in_node = [lay["name"] for lay in data["layouts"] if lay["ep"] == lay["ep_per_node"]]
    fine = [lay["name"] for lay in data["layouts"] if lay["name"] not in lays]
    lines = []

    fr_cost = time_ratios(data, lays, FR_IR, BASE_MODE)
    top2_cost = time_ratios(data, lays, TOP2, BASE_MODE)
    share = [a / b for a, b in zip(fr_cost, top2_cost, strict=True) if b > 0]
    l1, lfr, l2 = _loss(data, BASE_MODE), _loss(data, FR_IR), _loss(data, TOP2)
    closed = (l1 - lfr) / (l1 - l2) if None not in (l1, lfr, l2) and l1 != l2 else None
    fronts_with_fr = sum(
        FR_IR in pareto(data, lay, sc) for lay in lays for sc in ("measured", "balanced")
    )
    gap = (
        f"closes {100 * closed:.0f} % of the Top-1 to Top-2 loss gap" if closed is not None else ""
    )
    top2_over_fr = time_ratios(data, lays, TOP2, FR_IR)
    lines.append(
        f"- **{FR_IR}** (the paper's recipe) takes {more(fr_cost)} time per token than vanilla "
        f"{BASE_MODE} over the {len(lays)} layouts with a measured loss (both router scenarios): "
        f"{span(share, lambda x: f'{100 * x:.0f} %')} of what switching to vanilla {TOP2} costs "
        f"({more(top2_cost)}). In the small CPU runs it {gap} (held-out loss {num(l1, 3)} Top-1, "
        f"{num(lfr, 3)} Top-1+FR+IR, {num(l2, 3)} Top-2; upcycled runs: "
        f"{num(_upcycle(data, BASE_MODE), 3)} -> {num(_upcycle(data, FR_IR), 3)}), and no "
        "priced mode beats it on both loss and "
        f"throughput ({fronts_with_fr} of {cases} cases). Going on to vanilla {TOP2} from there "
        f"buys {num(lfr - l2 if lfr and l2 else None, 3)} of loss (less than two seed standard "
        f"deviations) for {more(top2_over_fr)} time per token. "
        + (
            f"**Answer: Top-1 at capacity 1.0 with FR+IR: the lowest loss of every setting "
            f"cheaper than Top-2, for at most {max(fr_cost):.0%} more time per token than vanilla "
            "Top-1**, as far as the small models' ranking carries over to a large one."
            if fronts_with_fr == cases and best_cheaper_than_top2(data, lays) == FR_IR
            else f"Another mode beats it on both counts in {cases - fronts_with_fr} case(s), or "
            "has a lower loss at a lower cost than Top-2: see the tables."
        )
        + f" Only vanilla {HALF} is much cheaper ({more(ratios(data, lays, HALF, FR_IR))} tokens "
        f"per GPU-hour than FR+IR) at a loss of {num(_loss(data, HALF), 3)}; whether that many "
        "more tokens would make up the difference, runs at equal tokens cannot tell."
    )
    t2 = time_ratios(data, lays, TOP2_FR_IR, TOP2)
    lines.append(
        f"- **{TOP2_FR_IR}** has the lowest loss ({num(_loss(data, TOP2_FR_IR), 3)}, vs "
        f"{num(l2, 3)} for vanilla Top-2) and takes {more(t2)} time per token than vanilla "
        f"{TOP2}: the choice when quality matters more than GPU-hours."
    )
    half_in = ratios(data, [x for x in lays if x in in_node], HALF_IR, BASE_MODE)
    half_out = ratios(data, [x for x in lays if x not in in_node], HALF_IR, BASE_MODE)
    lines.append(
        f"- **{HALF_IR}** vs vanilla {BASE_MODE}: {span(half_in, pct)} tokens per GPU-hour with "
        f"the all-to-all inside a node, {span(half_out, pct)} when it crosses nodes. Capacity 0.5 "
        "halves the all-to-all bytes, but IR computes every dropped token on its own GPU, which "
        "brings the expert rows back to about capacity 1.0's; so it wins only where the bytes are "
        f"expensive. Loss {num(_loss(data, HALF_IR), 3)}: better than vanilla Top-1, short of "
        "Top-1+FR+IR."
    )
    drop = {sc: [] for sc in ("measured", "balanced")}
    for layout in lays:
        for sc in drop:
            a, b = speed(data, layout, DROPLESS, sc), speed(data, layout, BASE_MODE, sc)
            if a and b:
                drop[sc].append(a / b - 1)
    lines.append(
        f"- **{DROPLESS}** vs {BASE_MODE}: {span(drop['measured'], pct)} tokens per GPU-hour with "
        "the small models' uneven routing (the hottest GPU computes and receives several times "
        f"its share), {span(drop['balanced'], pct)} with a balanced router; its small-model loss "
        f"({num(_loss(data, DROPLESS), 3)}) is the worst measured."
    )
    beaten = dominated(data, lays)
    parts = []
    for mode, (count, by) in sorted(beaten.items(), key=lambda item: -item[1][0]):
        parts.append(f"{mode} in {count} of {cases} cases (by {', '.join(sorted(by))})")
    lines.append(
        "- Beaten on both loss and predicted throughput by another mode: "
        + ("; ".join(parts) if parts else "none")
        + ". Loss differences under about 0.05 are within two seed standard deviations, and "
        "throughput margins of a few percent are within what this model can tell apart."
    )
    mix = [lay["name"] for lay in data["layouts"] if lay["model"].startswith("Mixtral")]
    if len(mix) == 2:
        a, b = (find(data, mix[0], TOP2), find(data, mix[1], TOP2))
        if a and b:
            lines.append(
                f"- Crossing nodes: Mixtral's EP 8 spread over 8 nodes instead of one node makes "
                f"the all-to-all {b['a2a_ms'] / a['a2a_ms']:.0f}x slower ({a['a2a_ms']:.2f} -> "
                f"{b['a2a_ms']:.2f} ms per layer at Top-2) and costs "
                f"{100 * (1 - b['tokens_per_s'] / a['tokens_per_s']):.0f} % of the tokens/s per "
                "GPU; IR adds no bytes, so a rectified mode pays the same extra all-to-all time as "
                "its vanilla counterpart."
            )
    if fine:
        k6 = next(m["topk"] for m in data["layouts"] if m["name"] == fine[0])
        fr6 = ratios(data, fine, FR_IR.replace("Top-1", f"Top-{k6}"), f"Top-{k6} cf 1.0")
        hf6 = ratios(data, fine, HALF_IR.replace("Top-1", f"Top-{k6}"), f"Top-{k6} cf 1.0")
        a2a = [find(data, name, f"Top-{k6} cf 1.0") for name in fine]
        fine_eps = ", ".join(str(lay["ep"]) for lay in data["layouts"] if lay["name"] in fine)
        lines.append(
            f"- Fine-grained 64 experts, top-{k6} (no quality run: throughput only): cf 1.0 + "
            f"FR+IR {span(fr6, pct)} and cf 0.5 + IR {span(hf6, pct)} tokens per GPU-hour vs "
            f"vanilla cf 1.0 over EP {fine_eps}. "
            f"IR computes a token once however many of its {k6} choices it lost, so at capacity "
            "0.5 it is cheap next to the slots it replaces, and what that does to quality is not "
            "measured. The all-to-all is "
            + ", ".join(f"{100 * r['a2a_ms'] / r['layer_ms']:.0f} %" for r in a2a if r)
            + " of the vanilla layer: the layout, not the routing mode, decides most of the cost."
        )
    lines.append(
        "- **Uncertain**: the compute efficiency (0.5, nominal: no GPU has run), how evenly a "
        "large trained router spreads tokens (the two scenarios bracket it; dropless and IR move "
        "most), and the losses, which come from 2-layer CPU models trained for 150 iterations: "
        "they rank the modes, they do not predict a large model's loss. Losses are compared at "
        "equal tokens; how much a faster mode would win back by training on more tokens in the "
        "same GPU-hours is not modelled."
    )
    return lines


def best_cheaper_than_top2(data: dict[str, Any], layouts: list[str]) -> str | None:
    """The mode with the lowest loss among those faster than vanilla Top-2 in every layout and
    scenario."""
    candidates = []
    for row in data["predictions"]:
        if row["layout"] != layouts[0] or row["scenario"] != "measured" or row["loss"] is None:
            continue
        faster = all(
            (speed(data, lay, row["mode"], sc) or 0) > (speed(data, lay, TOP2, sc) or float("inf"))
            for lay in layouts
            for sc in ("measured", "balanced")
        )
        if faster:
            candidates.append((row["loss"], row["mode"]))
    return min(candidates)[1] if candidates else None


def _upcycle(data: dict[str, Any], mode: str) -> float | None:
    return next(
        (r["upcycle_loss"] for r in data["predictions"] if r["mode"] == mode and r["upcycle_loss"]),
        None,
    )


def cluster_section(data: dict[str, Any]) -> str:
    rows = [(name, value, source) for name, value, source in data["cluster"]]
    return table(["parameter", "value", "source"], rows)


def calibration_section(data: dict[str, Any]) -> str:
    cal = data["calibration"]
    rows = []
    for p in sorted(cal["gemm_flops"], key=int):
        rows.append(
            [
                p,
                num(cal["gemm_flops"][p] / 1e9),
                num(cal["mem_bw"][p] / 1e9),
                num(1e3 * cal["a2a_latency_s"][p], 2) if p in cal["a2a_latency_s"] else "—",
                num(cal["a2a_bw"][p] / 1e9, 2) if p in cal["a2a_bw"] else "—",
            ]
        )
    by_hidden = ", ".join(
        f"H {h}: {v / 1e9:.0f}"
        for h, v in sorted(cal["gemm_by_hidden"].items(), key=lambda i: int(i[0]))
    )
    return (
        table(
            [
                "processes",
                "GEMM GFLOP/s per process",
                "copy GB/s per process",
                "all-to-all latency ms",
                "all-to-all GB/s (sent to others)",
            ],
            rows,
        )  # fmt: skip
        + f"\n\nCalibration: {cal['wall_s']:.0f} s on {cal['cpu']}, 1-minute load average "
        f"{cal['load_before']:.1f} before / {cal['load_after']:.1f} after (2 cores shared with "
        f"other work). One process's MLP GEMM rate by hidden size (GFLOP/s, FFN = 4 H, 512 rows): "
        f"{by_hidden}."
    )


def validation_table(result: dict[str, Any]) -> str:
    rows = []
    for r in result["rows"]:
        case = (
            f"EP {r['ep']}, H {r['hidden']}, E {r['experts']}, k {r['topk']}, "
            f"cf {r['capacity_factor']:g}"
        )
        if r["calibration_row"]:
            case += " (calibrates the overheads)"
        q = (
            f" ({r['measured_ratio_q1']:.2f}-{r['measured_ratio_q3']:.2f})"
            if r.get("measured_ratio_q1") is not None
            else ""
        )
        rows.append(
            [
                case,
                num(r["vanilla_measured_ms"]),
                f"{num(r['vanilla_pure_ms'])} ({pct(r['vanilla_pure_error'])})",
                f"{num(r['vanilla_ms'])} ({pct(r['vanilla_error'])})",
                num(r["rectified_measured_ms"]),
                f"{num(r['rectified_pure_ms'])} ({pct(r['rectified_pure_error'])})",
                f"{num(r['rectified_ms'])} ({pct(r['rectified_error'])})",
                (f"{r['measured_ratio']:.2f}{q}" + (" noisy" if noisy(r) else ""))
                if r.get("measured_ratio")
                else "—",
                f"{r['predicted_ratio']:.2f}",
                num(r["rectified_pct"]),
            ]
        )
    return table(
        ["case", "vanilla measured ms", "predicted, no overhead (error)",
         "predicted + overhead (error)", "rectified measured ms", "predicted, no overhead (error)",
         "predicted + overhead (error)", "measured ratio (q1-q3)", "predicted ratio",
         "rectified % (measured)"],
        rows,
    )  # fmt: skip


#: A measured ratio whose quartiles span more than this (q3 / q1 - 1) is marked noisy: the
#: machine's load changed during its repeats.
NOISY_SPREAD = 0.3


def noisy(row: dict[str, Any]) -> bool:
    q1, q3 = row.get("measured_ratio_q1"), row.get("measured_ratio_q3")
    return bool(q1 and q3 and q3 / q1 - 1 > NOISY_SPREAD)


def error_summary(result: dict[str, Any]) -> dict[str, float]:
    """Mean |error| over the predicted values (the calibration row's are fitted, so left out;
    without the overheads every value is a prediction), and over the predicted ratios."""
    fitted, pure, ratio, steady = [], [], [], []
    for r in result["rows"]:
        for variant in ("vanilla", "rectified"):
            pure.append(abs(r[f"{variant}_pure_error"]))
            if not r["calibration_row"]:
                fitted.append(abs(r[f"{variant}_error"]))
        if r.get("measured_ratio") and not r["calibration_row"]:
            ratio.append(r["predicted_ratio"] / r["measured_ratio"] - 1)
            if not noisy(r):
                steady.append(ratio[-1])

    def mean(xs: list[float]) -> float:
        return sum(xs) / len(xs) if xs else float("nan")

    return {
        "pure": mean(pure),
        "fitted": mean(fitted),
        "ratio": mean([abs(x) for x in ratio]),
        "ratio_signed": mean(ratio),
        "ratio_steady": mean([abs(x) for x in steady]),
        "ratio_steady_signed": mean(steady),
        "n": len(fitted),
        "n_ratio": len(ratio),
        "n_steady": len(steady),
    }


def ratio_text(s: dict[str, float]) -> str:
    text = f"{100 * s['ratio']:.0f} % on the {s['n_ratio']} predicted rectified / vanilla ratios"
    if s["n_steady"] < s["n_ratio"]:
        text += (
            f" ({100 * s['ratio_steady']:.0f} % on the {s['n_steady']} not marked noisy)"
            if s["n_steady"]
            else " (all of them marked noisy)"
        )
    return text


def _fitted(result: dict[str, Any]) -> str:
    return (
        f"{1e3 * result['overhead_one_process_s']:.1f} ms per call, plus "
        f"{1e3 * result.get('rectify_overhead_one_process_s', 0.0):.1f} ms for the rectified path "
        "(for one uncontended process; scaled by the GEMM slowdown with more processes)"
    )


def _case(case: dict[str, Any]) -> str:
    return (
        f"EP {case['ep']}, H {case['hidden']}, E {case['experts']}, k {case['topk']}, "
        f"cf {case['capacity_factor']:g}"
    )


def validation_section(data: dict[str, Any]) -> str:
    val = data["validation"]
    source = val["perf_layer"]
    s = error_summary(source)
    machine = source["machine"]
    parts = [
        f"**Against `perf_layer.json`** (`{source.get('command')}`, {machine['date']}, "
        f"{machine['cpu']}, load average {source.get('load_before')} before / "
        f"{machine.get('load_average')} after; every EP > 1 row). Overheads fitted on the EP 2 "
        f"base row's vanilla and rectified times: {_fitted(source)}. Mean |error|: "
        f"{100 * s['pure']:.0f} % without the overheads (all values), {100 * s['fitted']:.0f} % "
        f"with them over the {s['n']} predicted values, **{ratio_text(s)}**.\n\n"
        + validation_table(source)
    ]
    if "remeasured" in val:
        r = val["remeasured"]
        s = error_summary(r)
        parts.append(
            "**Against the same cases re-timed in this run, on this machine** "
            "(`benchmarks.perf.layer`, at least 10 interleaved repeats, right before the "
            f"calibration; load average {r['load_before']:.1f} before / {r['load_after']:.1f} "
            f"after). Overheads fitted on the EP 2 base row: {_fitted(r)}. Mean |error|: "
            f"{100 * s['pure']:.0f} % without them, **{100 * s['fitted']:.0f} % with them** "
            f"({s['n']} predicted values), {ratio_text(s)}.\n\n" + validation_table(r)
        )
    parts.append(discussion(data))
    return "\n\n".join(parts)


def discussion(data: dict[str, Any]) -> str:
    """Why the absolute errors are what they are, from the numbers (nothing hard-coded)."""
    source, cal = data["validation"]["perf_layer"], data["calibration"]
    c = source.get("consistency", {})
    lines = ["What the check shows, and why the absolute errors are large:", ""]
    where = (
        f"on another machine ({source['machine']['cpu']}; this one: {cal['cpu']})"
        if source["machine"]["cpu"] != cal["cpu"]
        else "on this machine, at another time"
    )
    lines.append(
        f"- `perf_layer.json` was measured {where}, at a 1-minute load average of "
        f"{source.get('load_before')} to {source['machine'].get('load_average')} on "
        f"{data['machine']['logical_cpus']} cores: other jobs took a share of the CPU that changed "
        "from row to row, which no model of the layer can know."
    )
    if c:
        text = (
            "- Its rows disagree with each other: the measured time per expert-GEMM FLOP goes "
            f"from {c['ps_per_flop_low']:.0f} ps ({_case(c['ps_per_flop_low_case'])}) to "
            f"{c['ps_per_flop_high']:.0f} ps ({_case(c['ps_per_flop_high_case'])}), "
            f"{c['ps_per_flop_high'] / c['ps_per_flop_low']:.1f}x"
        )
        if "ep1_ms" in c:
            text += (
                f"; and EP 1 took {c['ep1_ms']:.0f} ms where EP 2 took {c['ep2_ms']:.0f} ms for "
                "the same work per rank"
            )
        lines.append(text + ". A model that fits one row misses the others by about that much.")
    gemm = {int(p): v for p, v in cal["gemm_flops"].items()}
    if 1 in gemm and 4 in gemm:
        lines.append(
            f"- This machine's own rate moved with its load: one process computed "
            f"{gemm[1] / 1e9:.0f} GFLOP/s alone and {gemm[4] / 1e9:.0f} GFLOP/s with four running "
            f"(the calibration's load average: {cal['load_before']:.1f} to "
            f"{cal['load_after']:.1f})."
        )
    lines.append(
        "- The pure model leaves out what is not a GEMM, a copy or a transfer: Python, autograd "
        "and megatron's dispatcher bookkeeping, a few hundred small operations per call, and the "
        "rectified path's own (the IR side batch). That is what the two fixed overheads stand "
        "for; fitted on one row, they carry that row's share of the machine's load into every "
        "other prediction."
    )
    negative = [
        name
        for name, result in (
            ("perf_layer.json", source),
            ("re-timed", data["validation"].get("remeasured")),
        )
        if result
        and min(result["overhead_one_process_s"], result.get("rectify_overhead_one_process_s", 0))
        < 0
    ]
    if negative:
        lines.append(
            f"- A fitted overhead came out negative ({', '.join(negative)}): the calibration saw a "
            "slower machine (more load from other jobs) than the calibrating row did, and the "
            "constant corrects for that difference in load rather than measuring Python's share."
        )
    for result, name in ((data["validation"].get("remeasured"), "re-timed"), (source, "")):
        if result is None:
            continue
        s = error_summary(result)
        predicted = [r for r in result["rows"] if not r["calibration_row"] and not noisy(r)]
        heavy = max(predicted, key=lambda r: r.get("rectified_pct") or 0, default=None)
        if heavy is None or not heavy.get("measured_ratio"):
            continue
        key = "ratio_steady" if s["n_steady"] else "ratio"
        direction = "under" if s[f"{key}_signed"] < 0 else "over"
        lines.append(
            "- The rectified / vanilla ratio is measured interleaved, in the same processes, so "
            "the load hits both variants alike. Predicted ratios "
            f"({name + ' rows, ' if name else ''}calibration row"
            f"{', rows marked noisy' if s['n_steady'] else ''} left out) are off by "
            f"{100 * s[key]:.0f} % on average, {direction}estimating. Where IR computes the "
            f"most ({_case(heavy)}: {heavy['rectified_pct']:.0f} % of the tokens) the model gives "
            f"{heavy['predicted_ratio']:.2f} against a measured {heavy['measured_ratio']:.2f}. "
            "The model prices IR as GEMM rows, one extra copy and a fixed bookkeeping cost; on "
            "the CPU the IR side batch also costs Python-side indexing that grows with the IR "
            "tokens, which it does not price (on a GPU those operations are small kernels and the "
            "host syncs it does price). This ratio, one mode's cost against another's, is what "
            "the at-scale predictions rest on."
        )
        break
    lines.append(
        "- On a GPU none of the CPU's overheads apply in this form, and the GEMM efficiency is the "
        "big unknown: the GPU check (`scripts/gpu_check.sh`, `docs/results/gpu.md`: model TFLOP/s "
        "of a Mixtral-sized layer on one H200) would replace the nominal value."
    )
    return "\n".join(lines)


def layout_section(data: dict[str, Any], layout: dict[str, Any]) -> str:
    name = layout["name"]
    base = {s: speed(data, name, _base_mode(layout), s) for s in ("measured", "balanced")}
    rows = []
    for r in data["predictions"]:
        if r["layout"] != name or r["scenario"] != "measured":
            continue
        bal = find(data, name, r["mode"], "balanced")
        if r["capacity_factor"] is None:
            slowest = f"{r['load_max_over_mean']:.2f} (load)"
        elif r["ir_pct"] > 0:
            slowest = f"{r['ir_max_over_mean']:.2f} (IR)"
        else:
            slowest = "—"
        loss = "—" if r["loss"] is None else f"{r['loss']:.3f} ± {r['loss_std']:.3f}"
        up = (
            "—"
            if r["upcycle_loss"] is None
            else f"{r['upcycle_loss']:.3f} ± {r['upcycle_loss_std']:.3f}"
        )
        rows.append(
            [
                r["mode"],
                num(r["dropped_pct"]),
                num(r["ir_pct"]),
                slowest,
                num(r["expert_rows"], 0),
                f"{num(r['a2a_mb_intra'], 0)} / {num(r['a2a_mb_inter'], 0)}",
                num(r["gemm_ms"], 2),
                num(r["a2a_ms"], 2),
                num(r["router_ms"] + r["other_ms"], 2),
                num(r["layer_ms"], 2),
                f"**{num(r['tokens_per_s'], 0)}** "
                f"({pct(r['tokens_per_s'] / base['measured'] - 1)})",
                f"{num(bal['tokens_per_s'], 0)} ({pct(bal['tokens_per_s'] / base['balanced'] - 1)})"
                if bal
                else "—",
                loss,
                up,
            ]
        )
    header = [
        "mode", "dropped %", "IR % of tokens", "slowest rank / mean", "expert rows per GPU",
        "all-to-all MB per GPU NVLink / IB", "GEMM ms", "all-to-all ms", "router + other ms",
        "MoE layer ms", "tokens/s per GPU (vs first row)", "balanced router: tokens/s per GPU",
        "held-out loss, scratch", "held-out loss, upcycled",
    ]  # fmt: skip
    m = layout
    sizes = (
        f"{m['model']}: hidden {m['hidden']}, expert FFN {m['ffn']} (gated), "
        f"{m['experts']} experts, "
        f"{m['layers']} layers, {m['heads']} heads / {m['kv_heads']} KV heads, vocabulary "
        f"{m['vocab']:,}, sequence {m['seq']}; {m['nodes']} node(s), EP {m['ep']} with "
        f"{m['ep_per_node']} EP rank(s) per node, {m['tokens']} tokens per GPU per micro-batch. "
        f"{m['note']}."
    )
    return f"### {name}\n\n{sizes}\n\n" + table(header, rows)


def _base_mode(layout: dict[str, Any]) -> str:
    k = 1 if layout["topk"] in (1, 2) else layout["topk"]
    return f"Top-{k} cf 1.0"


def sources_section(data: dict[str, Any]) -> str:
    seen: dict[tuple[str, str], dict[str, Any]] = {}
    for r in data["predictions"]:
        if r["scenario"] == "measured":
            seen.setdefault((r["mode"], r["rates_source"]), r)
    rows = [
        [mode, source, f"{r['cv']:.2f}", f"{r['router_ratio']:.2f}", r["syncs"]]
        for (mode, source), r in seen.items()
    ]
    q = data["quality"]["scratch"]
    return (
        f"Small-CPU-model routing (`{q['source']}`: {q['experts']} experts, EP {q['ep']}, "
        f"{q['tokens_per_call']} tokens per router call, training rates over every iteration, "
        f"{q['seeds']} seeds). The popularity CV is fitted so that the load model drops the "
        f"measured fraction at that setting; it then gives the slowest rank's share at the "
        f"priced layout. Balanced router: CV {data['balanced_cv']:.3f}, fitted to the "
        f"{data['balanced_source']}. Router ratio: rectified / vanilla router time from "
        f"`perf_router.json` (nearest experts / top-k / hidden); host syncs per layer call from "
        f"{data['syncs']['source']}.\n\n"
        + table(["mode", "rates from", "popularity CV", "router ratio", "host syncs"], rows)
    )


METHOD = """Per GPU, for one MoE layer forward+backward on the slowest EP rank (code:
`benchmarks/at_scale/layer_model.py`; nothing overlaps, megatron's default):

- **expert GEMMs**: rows x 18 H F FLOPs (gated: 3 GEMMs forward, backward 2x forward) at peak x
  efficiency. With a capacity and padding every local expert computes `EP * C` slots whatever
  the routing (`C = ceil(k cf T / E)`, megatron's `get_capacity`): `E * C` rows per GPU. IR adds
  the GPU's own rectified tokens (one row each), and the slowest GPU's IR load sets the pace.
  Dropless computes the actual load: the hottest GPU's.
- **all-to-all**: `(rows out + rows in) x (2 H x 2 B + 4 B)` per GPU (tokens and fp32 gate
  probabilities out, outputs back, mirrored in the backward) - the byte count of
  `benchmarks/perf`'s counter (`perf_bytes.json`, checked in `tests/unit/test_at_scale.py`).
  Remote peers in the same node go over NVLink, the others over InfiniBand; the time is the slower
  of the two plus 6 calls' latency. IR tokens never travel; FR rides in padding slots.
- **router**: gating GEMM + a fixed part, times the measured rectified / vanilla router ratio;
  **host syncs** per layer call as counted by `benchmarks/perf --parts syncs` ({syncs});
  **memory-bound passes** (permute, unpermute, activation, IR's interleave copy) at HBM bandwidth.
- **training step** (tokens/s per GPU): layers x (MoE layer + attention) + output layer, all at
  the same efficiency; optimizer, data-parallel gradient reduction and pipeline bubbles are left
  out (the same for every mode, so they only dilute the differences).

Two router scenarios bracket what is least known, how evenly tokens land: **small-CPU-model
routing** (each mode's own measured dropped / rectified % from `quality.md`, 8 experts, 150
iterations: uneven, pessimistic) and a **balanced router** (fitted to the CPU layer benchmark's
random router: little more than sampling noise, optimistic). Per-expert popularity is log-normal
with one CV, the same on every rank, plus multinomial sampling per rank
(`benchmarks/at_scale/routing_load.py`)."""


LIMITS = """- Compute efficiency 0.5 is nominal and the same for every GEMM; small expert GEMMs (the
  fine-grained model, capacity 0.5) run below large ones on a real GPU, which would make
  capacity 0.5 and IR's extra rows look slightly better here than they are.
- No communication / computation overlap (megatron can overlap the EP all-to-all with
  `--overlap-moe-expert-parallel-comm`; then the bytes matter less and the GEMMs more).
- Ranks differ only by sampling noise: different documents on different ranks would spread the
  IR load more (a 2x heavier IR rank at capacity 1.0 + FR+IR adds about one IR share again to
  the slowest GPU's expert rows).
- IR's host syncs are priced at the nominal cost per sync (about 0.1 ms per layer call in
  all); the static IR mode (`--moe-rectify-ir-capacity-factor`, no extra sync, a fixed IR
  buffer per expert) is not priced here.
- Top-k requests of a token are drawn independently in the load model; the top-6 rows borrow the
  Top-1 runs' dropped fractions (no top-6 quality run).
- Losses are equal-token losses of 2-layer, hidden-128 models trained for 150 iterations on CPU:
  they rank the modes; they are not the loss of the priced model."""


def sync_text(data: dict[str, Any]) -> str:
    s = data["syncs"]
    if "padded" not in s:
        return "see the source table"
    return f"{s['padded']} padded, {s['padded_rectified']} with IR+FR, {s['dropless']} dropless"


def render(data: dict[str, Any], plot_name: str) -> str:
    machine = data["machine"]
    parts = [
        "# At-scale cost model: which capacity and routing mode gives the best model per GPU-hour",
        f"Generated by `{data['command']}` (code in `benchmarks/at_scale/`) from `at-scale.json` "
        "next to this page; do not edit by hand (`--report-only` rebuilds it from the JSON).",
        f"Run {machine['date']} on {machine['cpu']} ({machine['logical_cpus']} logical CPUs), "
        f"torch "
        f"{machine['torch']}, megatron-core {machine['megatron_core']}; wall time "
        f"{data['wall_s']:.0f} s (re-timing the layer benchmark, calibration, predictions). "
        "Predictions are for the H100 cluster below: **nothing here was measured on a GPU**.",
        "## Headline",
        "\n".join(headline(data)),
        f"![loss vs predicted throughput]({plot_name})",
        "## What is priced",
        METHOD.format(syncs=sync_text(data)),
        "## Cluster (stated assumptions)",
        cluster_section(data),
        "## Validation: the model against the CPU layer benchmark",
        "The same formulas with this machine's measured parameters (fp32, non-gated experts, one "
        "gloo process per EP rank, `benchmarks/at_scale/calibrate.py`):",
        calibration_section(data),
        validation_section(data),
        "## Predictions",
        "Per layout, one row per mode, with small-CPU-model routing; the balanced-router column "
        "repeats the throughput with a balanced router. *slowest rank / mean*: the slowest GPU's "
        "IR rows (IR) or expert rows (dropless) over the mean. Held-out losses: `quality.md` "
        "(scratch) and `quality_upcycle.md` (upcycled from a dense model), mean ± std over 3 "
        "seeds, the run group with the same top-k, capacity and rectification (8 experts, "
        "2-layer CPU model: they rank modes only).",
        *[layout_section(data, layout) for layout in data["layouts"]],
        "## Where the routing numbers come from",
        sources_section(data),
        "## Limits",
        LIMITS,
    ]
    return "\n\n".join(parts)
