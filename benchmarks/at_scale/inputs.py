"""The project's measured results that the model reuses, read where they are published.

- ``docs/results/perf_layer.json``: the CPU layer benchmark (the validation target) and its
  routing rates; ``perf_router.json``: rectified / vanilla router time; ``perf_syncs.json``: host
  syncs per layer call per mode; ``perf_bytes.json``: counted all-to-all bytes (the tests check
  :func:`benchmarks.at_scale.layer_model.a2a_bytes_per_rank` against them).
- ``docs/results/quality.md`` / ``quality_upcycle.md``: held-out losses and routing rates of the
  quality benchmark's runs. Their run cache (``benchmarks/quality/runs/``) is not part of the
  repository, so the published tables are parsed; a missing or reshaped table raises
  :class:`InputError` naming the file, instead of silently pricing nothing.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "docs" / "results"


class InputError(ValueError):
    """A published result the model needs is missing or not in the expected shape."""


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: {exc}") from exc


# ---- benchmarks/perf results ---------------------------------------------------------------


def router_ratio(
    perf_router: dict[str, Any], experts: int, topk: int, hidden: int
) -> tuple[float, str]:
    """Rectified / vanilla router time of the measured setting nearest to (``experts``,
    ``topk``; ``hidden`` breaks ties) at capacity factor 1.0, and a note naming it."""
    rows = [r for r in perf_router["rows"] if r["capacity_factor"] == 1.0]
    if not rows:
        raise InputError("perf_router.json has no capacity-factor-1.0 row")

    def distance(row: dict[str, Any]) -> tuple[float, float]:
        routing = abs(math.log2(row["experts"] / experts)) + abs(row["topk"] - topk)
        return routing, abs(math.log2(row["hidden"] / hidden))

    best = min(rows, key=distance)
    note = f"router E={best['experts']} k={best['topk']} H={best['hidden']} T={best['tokens']}"
    return float(best["ratio"]), note


def router_per_token_s(perf_router: dict[str, Any], experts: int, gemm_flops: float) -> float:
    """Vanilla router time per token outside its gating GEMM, on the machine that measured
    ``perf_router.json`` (the row with ``experts`` experts and the fewest other differences;
    the gating GEMM priced at ``gemm_flops`` FLOP/s is taken out)."""
    rows = [
        r for r in perf_router["rows"] if r["experts"] == experts and r["capacity_factor"] == 1.0
    ]
    if not rows:
        raise InputError(f"perf_router.json has no row with {experts} experts")
    row = min(rows, key=lambda r: abs(r["hidden"] - 1024))
    gating = 6.0 * row["hidden"] * row["experts"] * row["tokens"] / gemm_flops
    return max(0.0, row["vanilla_ms"] / 1e3 - gating) / row["tokens"]


@dataclass(frozen=True)
class SyncCounts:
    """Host syncs per layer call (forward+backward) by mode, from ``perf_syncs.json``."""

    padded: int
    padded_rectified: int
    dropless: int
    source: str


def sync_counts(perf_syncs: dict[str, Any]) -> SyncCounts:
    """The EP > 1, tensor-parallel-1 rows: padded vanilla, padded IR+FR, unpadded vanilla."""
    rows = {r["pad"]: r for r in perf_syncs["rows"] if r["tp"] == 1 and r["ep"] > 1}
    if set(rows) != {True, False}:
        raise InputError("perf_syncs.json lacks the tp 1, ep > 1 rows with and without padding")
    return SyncCounts(
        padded=rows[True]["modes"]["none"]["total"],
        padded_rectified=rows[True]["modes"]["ir+fr"]["total"],
        dropless=rows[False]["modes"]["none"]["total"],
        source="perf_syncs.json (tp 1, ep 2; counted by rule on CPU)",
    )


# ---- the quality benchmark's published tables ----------------------------------------------

_LOSS = re.compile(r"^\s*([0-9.]+)\s*±\s*([0-9.]+)")


def markdown_tables(text: str) -> dict[str, list[dict[str, str]]]:
    """The first table under every ``## `` heading, as rows keyed by the header cells."""
    tables: dict[str, list[dict[str, str]]] = {}
    heading, lines = None, text.splitlines()
    for index, line in enumerate(lines):
        if line.startswith("## "):
            heading = line[3:].strip()
        elif heading and heading not in tables and line.startswith("|"):
            header = _cells(line)
            rows = []
            for row_line in lines[index + 2 :]:
                if not row_line.startswith("|"):
                    break
                rows.append(dict(zip(header, _cells(row_line), strict=False)))
            tables[heading] = rows
    return tables


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def _number(cell: str | None) -> float | None:
    if cell is None:
        return None
    match = re.match(r"^\s*(-?[0-9.]+)", cell)
    return float(match.group(1)) if match else None


@dataclass
class QualityGroup:
    """One (variant, capacity) group of runs: held-out loss over seeds and training rates (%)."""

    loss: float | None = None
    loss_std: float | None = None
    dropped: float | None = None
    padded: float | None = None
    filled_in: float | None = None
    rectified: float | None = None


@dataclass
class QualityResults:
    """Parsed quality report: groups keyed by (variant, capacity as written: "1", "0.5",
    "dropless"), and the setting the rates were measured at."""

    source: str
    groups: dict[tuple[str, str], QualityGroup]
    experts: int
    ep: int
    tokens_per_call: int
    seeds: int
    notes: list[str] = field(default_factory=list)

    def get(self, key: tuple[str, str] | None) -> QualityGroup | None:
        return self.groups.get(key) if key else None


def _flag(text: str, flag: str, path: Path) -> int:
    match = re.search(rf"{flag}[ =](\d+)", text)
    if not match:
        raise InputError(f"{path}: no {flag} in its command line")
    return int(match.group(1))


def read_quality(path: Path) -> QualityResults:
    """Parse a ``benchmarks/quality`` report (grid at capacity 1.0 + capacity sweep)."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise InputError(f"{path}: {exc}") from exc
    tables = markdown_tables(text)
    grid = next((rows for head, rows in tables.items() if head.startswith("1.")), None)
    sweep = next((rows for head, rows in tables.items() if head.startswith("2.")), None)
    if grid is None or not grid or "variant" not in grid[0]:
        raise InputError(f"{path}: no '## 1.' grid table with a 'variant' column")
    groups: dict[tuple[str, str], QualityGroup] = {}
    loss_column = next(c for c in grid[0] if c.startswith("held-out loss"))
    for row in grid:
        loss = _LOSS.match(row[loss_column])
        groups[(row["variant"], "1")] = QualityGroup(
            loss=float(loss.group(1)) if loss else None,
            loss_std=float(loss.group(2)) if loss else None,
            dropped=_number(row.get("dropped %")),
            padded=_number(row.get("padded %")),
            filled_in=_number(row.get("filled-in %")),
            rectified=_number(row.get("rectified %")),
        )
    for row in sweep or []:
        cf = row["capacity factor"]
        for variant in ("Top-1", "Top-1+IR", "Top-1+FR"):
            loss = _LOSS.match(row.get(variant, ""))
            if not loss:
                continue
            group = groups.setdefault((variant, cf), QualityGroup())
            group.loss, group.loss_std = float(loss.group(1)), float(loss.group(2))
            if variant == "Top-1" and group.dropped is None:
                group.dropped = _number(row.get("Top-1 dropped %"))
                group.padded = _number(row.get("Top-1 padded %"))
    seeds = re.search(r"seeds ([0-9, ]+)", text)
    return QualityResults(
        source=path.name,
        groups=groups,
        experts=_flag(text, "--num-experts", path),
        ep=_flag(text, "--expert-model-parallel-size", path),
        tokens_per_call=_flag(text, "--micro-batch-size", path) * _flag(text, "--seq-length", path),
        seeds=len(seeds.group(1).split(",")) if seeds else 0,
    )
