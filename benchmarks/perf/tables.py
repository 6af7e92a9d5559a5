"""Markdown tables of the perf results: row selection (base case, swept axes), formatting,
and one table per part (``part_markdown``, also printed by the driver right after measuring)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

MODE_NAMES = {
    "none": "vanilla top-k",
    "ir": "IR",
    "fr": "FR",
    "ir+fr": "IR+FR",
    "redispatch": "re-dispatch to next choice (baseline)",
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


def spread(row: dict[str, Any]) -> str:
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
        ("ratio q1-q3", spread),
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
        ("FFN", lambda r: r.get("ffn_size") or r["ffn_mult"] * r["hidden"]),
        ("experts", _key("experts")),
        ("top-k", _key("topk")),
        ("capacity", _key("capacity_factor")),
        ("pad", _key("pad")),
    ]
    if any(r.get("vanilla_dropless") for r in result["rows"]):  # the vanilla's own routing
        columns.append(
            ("vanilla routing", lambda r: "dropless" if r.get("vanilla_dropless") else "same")
        )
    columns += _timing_columns(result, "per rank")
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


#: The dynamic and the static (``--moe-rectify-ir-capacity-factor``) modes of the syncs part.
_DYNAMIC_SYNC_MODES = ("none", "fr", "ir", "ir+fr")
_STATIC_SYNC_MODES = ("ir static", "ir+fr static")


def _sync_sites(row: dict[str, Any], modes: tuple[str, ...] = ("fr", "ir", "ir+fr")) -> str:
    """Where ``modes``' extra syncs come from (sites absent from megatron's)."""
    vanilla = {(s["phase"], s["site"], s["kind"]) for s in row["modes"]["none"]["sites"]}
    extra: dict[str, int] = {}
    for mode in modes:
        if mode not in row["modes"]:  # a result from before the static modes
            return "—"
        for s in row["modes"][mode]["sites"]:
            if (s["phase"], s["site"], s["kind"]) not in vanilla:
                key = f"{s['site'].rsplit('/', 1)[-1]} {s['kind']}"
                extra[key] = max(extra.get(key, 0), s["count"])
    return "; ".join(f"{k} x{n}" for k, n in sorted(extra.items())) or "-"


def syncs_table(rows: list[dict[str, Any]]) -> str:
    """Host syncs per layer call: forward / backward per mode, megatron's and ours."""

    def mode(name: str) -> Callable[[dict[str, Any]], Any]:
        def cell(row: dict[str, Any]) -> str:
            m = row["modes"].get(name)
            if m is None:
                return "—"
            return f"{m['forward']} / {m['backward']} (mc {m['megatron']}, ours {m['rectify']})"

        return cell

    columns: list[Column] = [
        ("tp", _key("tp")),
        ("ep", _key("ep")),
        ("pad", lambda r: "yes" if r["pad"] else "no"),
        *[(f"{name} fwd / bwd", mode(name)) for name in _DYNAMIC_SYNC_MODES + _STATIC_SYNC_MODES],
        ("extra vs none (site, kind, max count)", _sync_sites),
        ("static IR: extra vs none", lambda r: _sync_sites(r, _STATIC_SYNC_MODES)),
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
    if part == "syncs":
        return syncs_table(result["rows"])
    rows = result["rows"]
    return (
        f"Per training iteration (the iteration part's base model after "
        f"{rows['iteration'].get('trained', 0)} training iterations, forward+backward, every "
        "MoE layer):\n\n" + bytes_iteration_table(rows["iteration"]) + "\n\nOne MoE layer "
        "forward+backward, bytes summed over the EP ranks:\n\n" + bytes_layer_table(rows["layer"])
    )
