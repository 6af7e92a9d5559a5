"""Driver: run the cost sweeps, write JSON results, regenerate the report and plots.

    python -m benchmarks.perf                          # = make bench-perf (default preset, CPU)
    python -m benchmarks.perf --parts router           # = make bench-router
    python -m benchmarks.perf --parts layer            # = make bench-layer
    python -m benchmarks.perf --parts syncs            # host syncs per layer call (counts)
    python -m benchmarks.perf --preset full            # bigger CPU sweep (~30 minutes)
    python -m benchmarks.perf --report-only            # plots + markdown from the JSON files
    torchrun --nproc-per-node 8 -m benchmarks.perf --preset gpu --bf16 --out gpu_check_out/perf
    torchrun --standalone --nproc-per-node 1 -m benchmarks.perf --preset h200 --bf16
        --parts router layer syncs --out gpu_check_out/perf   # one H200: scripts/gpu_check.sh

Each part writes ``<out>/perf_<part>.json`` (rows, sweep, command, machine, date, wall time) and
the report ``<out>/perf.md`` with ``<out>/perf_*.png`` is rebuilt from every part's JSON found in
``<out>``, so running one part refreshes its section and keeps the others.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.perf import sweeps
from benchmarks.perf.common import (
    available_world,
    is_reporting_process,
    launched_by_torchrun,
    machine_info,
)
from benchmarks.perf.report import PARTS

DEFAULT_OUT = Path(__file__).resolve().parents[2] / "docs" / "results"
#: (minimum timed repeats, untimed warm-up rounds, seconds a setting may fill with more
#: repeats) per preset and part: cheap settings get more samples, see ``repeats_for_budget``.
REPEATS = {
    "quick": {"router": (3, 1, 0), "layer": (3, 1, 0), "iteration": (3, 1, 0)},
    "default": {"router": (20, 3, 5), "layer": (20, 3, 15), "iteration": (15, 10, 12)},
    "full": {"router": (30, 5, 15), "layer": (30, 5, 40), "iteration": (20, 10, 40)},
    "gpu": {"router": (30, 5, 5), "layer": (30, 5, 10), "iteration": (20, 10, 20)},
    # One lent H200, minutes counted (scripts/gpu_check.sh): a layer round is ~0.1-0.3 s, so
    # 3 + 10 rounds are the floor and 6 s per setting the fill.
    "h200": {"router": (20, 3, 3), "layer": (10, 3, 6), "iteration": (10, 5, 10)},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.perf", description=__doc__)
    parser.add_argument("--preset", choices=sweeps.PRESETS, default="default")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--repeats", type=int, help="minimum timed repeats (default: per preset)")
    parser.add_argument("--warmup", type=int, help="untimed warm-up rounds (default: per preset)")
    parser.add_argument(
        "--budget", type=float, help="seconds a setting may fill with more repeats (0: none)"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results + report folder")
    parser.add_argument("--bf16", action="store_true", help="bf16 params and activations (GPUs)")
    parser.add_argument("--te", action="store_true", help="Transformer-Engine spec, grouped GEMM")
    parser.add_argument(
        "--router-threads", type=int, help="torch threads of the one-process router part"
    )
    parser.add_argument("--report-only", action="store_true", help="only rebuild the report")
    return parser.parse_args(argv)


def command_line() -> str:
    """How this run was started, for the report."""
    args = " ".join(sys.argv[1:])
    world = available_world()
    prefix = f"torchrun --nproc-per-node {world} -m" if world else "python -m"
    return f"{prefix} benchmarks.perf {args}".strip()


def run_part(part: str, args: argparse.Namespace) -> dict[str, Any]:
    """Measure one part; returns its JSON document."""
    from benchmarks.perf import a2a_bytes, iteration, layer, router, syncs

    repeats, warmup, budget_s = REPEATS[args.preset].get(part, (0, 0, 0))
    repeats, warmup = args.repeats or repeats, args.warmup if args.warmup is not None else warmup
    budget_s = args.budget if args.budget is not None else budget_s
    world = available_world()
    precision = {"bf16": args.bf16, "te": args.te}
    load_before = round(os.getloadavg()[0], 2)
    start = time.perf_counter()
    if part == "router":
        sweep = sweeps.router_sweep(args.preset, world)
        rows = router.run(sweep.cases, repeats, warmup, args.router_threads, args.bf16, budget_s)
    elif part == "layer":
        sweep = sweeps.layer_sweep(args.preset, world)
        cases = [c for c in sweep.cases if sweeps.fits(c, world)]
        rows = layer.run(cases, repeats, warmup, budget_s=budget_s, **precision)
    elif part == "syncs":
        sweep = sweeps.syncs_sweep(args.preset, world)
        rows = syncs.run(sweep.cases)
    elif part == "iteration":
        sweep = sweeps.iteration_sweep(args.preset, world)
        cases = [c for c in sweep.cases if sweeps.fits(c, world)]
        rows = iteration.run(cases, repeats, warmup, budget_s=budget_s, **precision)
    else:
        sweep = sweeps.bytes_sweep(args.preset, world)
        cases = [c for c in sweep.cases if sweeps.fits(c, world)]
        iteration_case = sweeps.iteration_sweep(args.preset, world).base
        trained = REPEATS[args.preset]["iteration"][1]  # routing as in the timed iterations
        rows = {
            "layer": a2a_bytes.run_layer(cases, **precision),
            "iteration": a2a_bytes.run_iteration(iteration_case, trained, **precision),
        }
    return {
        "part": part,
        "preset": args.preset,
        "command": command_line(),
        "machine": machine_info(),
        "wall_s": time.perf_counter() - start,
        "load_average_before": load_before,
        "repeats": repeats,
        "warmup": warmup,
        "budget_s": budget_s,
        **precision,
        "sweep": sweep.as_json(),
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> None:
    from benchmarks.perf import report, tables

    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    if not args.report_only:
        for part in args.parts:
            result = run_part(part, args)
            if is_reporting_process():
                path = args.out / f"perf_{part}.json"
                path.write_text(json.dumps(result, indent=1) + "\n")
                print(f"\n## {part} ({result['wall_s']:.0f} s) -> {path}")
                print(tables.part_markdown(result), flush=True)
    if is_reporting_process():
        written = report.write_report(args.out)
        print(f"\nreport: {', '.join(str(p) for p in written)}")
        print(f"wall time: {time.perf_counter() - start:.0f} s")
    if launched_by_torchrun():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
