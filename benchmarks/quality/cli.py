"""``python -m benchmarks.quality``: train the paper's routing variants, write the report.

    python -m benchmarks.quality                      # CPU default: every experiment, 3 seeds
    python -m benchmarks.quality --quick              # smoke test: 2 tiny runs, report in runs/
    python -m benchmarks.quality --gpus 8 --preset gpu --train-iters 3000
    python -m benchmarks.quality --variants Top-1,Top-1+FR+IR --experiments grid --seeds 1 2 3 4 5
    python -m benchmarks.quality --recipe upcycle     # dense model first, then upcycled MoEs
    python -m benchmarks.quality --data-path my_text_document --tokenizer-type ByteLevel
    python -m benchmarks.quality --report-only        # rebuild the report from finished runs

``--data-path`` (with ``--tokenizer-type`` and the tokenizer's files, as for
``pretrain_gpt_rectify.py``) trains on your corpus instead of the embedded one; it is checked
before the first run, and the report's header names it with its token counts. Any flag this
script does not know goes to ``pretrain_gpt_rectify.py`` verbatim; both are part of every run's
cache key. Finished runs are reused (``--force`` retrains), so an interrupted benchmark
continues where it stopped.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.metadata
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.quality.data import add_data_args, data_flags, data_problem, describe_data
from benchmarks.quality.plan import (
    EXPERIMENTS,
    RunSpec,
    Settings,
    dense_spec,
    experiment_specs,
)
from benchmarks.quality.report import write_report
from benchmarks.quality.runner import (
    LAUNCHERS,
    REPO,
    RunFailed,
    execute,
    load_result,
    prepare_fork_launcher,
    run_dir,
)
from benchmarks.quality.stats import group_runs, target_check

DEFAULT_OUT = REPO / "benchmarks" / "quality" / "runs"
DEFAULT_REPORT = REPO / "docs" / "results"
DEFAULT_CAPACITIES = "0.5,0.75,1.0,1.5,dropless"
#: Model sizes; individual flags override them.
PRESETS: dict[str, dict[str, Any]] = {
    "cpu": {},  # Settings' defaults
    "gpu": {
        "num_layers": 8,
        "hidden_size": 512,
        "num_attention_heads": 8,
        "seq_length": 1024,
        "micro_batch_size": 8,
        "global_batch_size": 64,
        "train_iters": 2000,
        "dense_iters": 2000,
        "eval_iters": 50,
        "lr": 1e-3,
        "min_lr": 1e-4,
        "warmup_iters": 100,
    },
    "quick": {
        "hidden_size": 64,
        "seq_length": 64,
        "micro_batch_size": 4,
        "global_batch_size": 8,
        "num_experts": 4,
        "train_iters": 10,
        "dense_iters": 10,
        "eval_iters": 2,
        "warmup_iters": 2,
    },
}
_SIZE_FLAGS = (
    "num_layers",
    "hidden_size",
    "num_attention_heads",
    "seq_length",
    "micro_batch_size",
    "global_batch_size",
    "num_experts",
    "train_iters",
    "dense_iters",
    "eval_iters",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.quality",
        description=__doc__.splitlines()[0],
        allow_abbrev=False,  # unknown flags go to megatron: never guess a prefix
    )
    parser.add_argument("--quick", action="store_true", help="smoke test: tiny model, 1 seed")
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None)
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default: 1 2 3")
    parser.add_argument(
        "--experiments",
        default=None,
        help=f"comma-separated subset of {','.join(EXPERIMENTS)} (default: all)",
    )
    parser.add_argument(
        "--variants", default=None, help="comma-separated paper names, e.g. Top-1,Top-1+FR+IR"
    )
    parser.add_argument("--capacities", default=DEFAULT_CAPACITIES, help="capacity sweep")
    parser.add_argument(
        "--ir-budgets",
        default="",
        help="comma-separated static-IR budgets (--moe-rectify-ir-capacity-factor): each IR "
        "variant of the plan is also trained with each, e.g. 'Top-1+FR+IR (IR budget 0.25)'",
    )
    parser.add_argument("--recipe", choices=("scratch", "upcycle"), default="scratch")
    for name in _SIZE_FLAGS:
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--gpus", type=int, default=0, help="GPUs per run (bf16, torchrun)")
    parser.add_argument(
        "--nproc",
        type=int,
        default=None,
        help="CPU processes (gloo ranks) per run without --gpus; default 2. With 4 and "
        "--num-experts 4 --expert-parallel 4 every rank holds one expert (the paper's layout)",
    )
    parser.add_argument("--expert-parallel", type=int, default=None, help="default: all ranks")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="run directories")
    parser.add_argument("--report-dir", type=Path, default=None, help="default: docs/results")
    parser.add_argument(
        "--report-name",
        default=None,
        help="the report's file stem (NAME.md, NAME_*.png); default: quality, or "
        "quality_upcycle for --recipe upcycle. Give one to keep a separate experiment's report "
        "from replacing the main one",
    )
    parser.add_argument("--force", action="store_true", help="retrain finished runs")
    parser.add_argument("--report-only", action="store_true", help="no training")
    parser.add_argument("--dry-run", action="store_true", help="list the runs and stop")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per run")
    parser.add_argument(
        "--launcher",
        choices=LAUNCHERS,
        default=None,
        help="default: fork on CPU (ranks forked from pre-imported megatron), torchrun on GPUs",
    )
    add_data_args(parser)
    return parser


def settings_from(args: argparse.Namespace, extra: list[str]) -> Settings:
    """Preset, then explicit flags, then the layout (CPU: 2 processes; GPUs: one per GPU)."""
    preset = args.preset or ("quick" if args.quick else "gpu" if args.gpus else "cpu")
    values: dict[str, Any] = dict(PRESETS[preset])
    values.update({name: getattr(args, name) for name in _SIZE_FLAGS if getattr(args, name)})
    if args.lr:
        values["lr"], values["min_lr"] = args.lr, args.lr / 10
    nproc = args.gpus or args.nproc or 2
    values.update(
        nproc=nproc,
        expert_parallel=args.expert_parallel or nproc,
        gpus=bool(args.gpus),
        extra_args=(*data_flags(args), *extra),
    )
    return Settings(**values)


def layout_problem(settings: Settings) -> str | None:
    """A process layout megatron would refuse at every run's start-up, as one line."""
    if settings.nproc < 1:
        return f"--nproc {settings.nproc}: give at least 1 process."
    if settings.nproc % settings.expert_parallel or settings.num_experts % settings.expert_parallel:
        return (
            f"--expert-parallel {settings.expert_parallel} must divide the processes "
            f"({settings.nproc}) and --num-experts ({settings.num_experts})."
        )
    if settings.global_batch_size % (settings.micro_batch_size * settings.nproc):
        return (
            f"--global-batch-size {settings.global_batch_size} is not a multiple of "
            f"--micro-batch-size {settings.micro_batch_size} x {settings.nproc} data-parallel "
            "ranks: lower --micro-batch-size."
        )
    return None


def parse_capacities(text: str) -> list[float | None]:
    return [None if item == "dropless" else float(item) for item in text.split(",") if item]


def plan(args: argparse.Namespace) -> list[RunSpec]:
    experiments = args.experiments.split(",") if args.experiments else list(EXPERIMENTS)
    variants = args.variants.split(",") if args.variants else None
    if args.quick and not args.experiments and not args.variants:
        experiments, variants = ["grid"], ["Top-1", "Top-1+FR+IR"]
    seeds = args.seeds or ([1] if args.quick else [1, 2, 3])
    ir_budgets = [float(item) for item in args.ir_budgets.split(",") if item]
    return experiment_specs(
        experiments, seeds, variants, parse_capacities(args.capacities), args.recipe, ir_budgets
    )


def run_all(
    specs: list[RunSpec], settings: Settings, args: argparse.Namespace
) -> tuple[list[dict[str, Any]], list[str]]:
    """Train (or reuse) every run in order; a failed run is reported, not fatal."""
    records, failures = [], []
    trained_s: list[float] = []
    to_train = [
        s for s in specs if args.force or load_result(run_dir(s, settings, args.out)) is None
    ]
    if to_train and (args.launcher or ("torchrun" if settings.gpus else "fork")) == "fork":
        print("importing torch + megatron once (the fork launcher) ...", flush=True)
        prepare_fork_launcher()
    for number, spec in enumerate(specs, 1):
        dense = _dense_dir(spec, settings, args.out)
        prefix = f"[{number}/{len(specs)}] {spec.slug}"
        print(f"{prefix} ...", end="", flush=True)
        try:
            record = execute(
                spec, settings, args.out, dense, args.force, args.timeout, args.launcher
            )
        except RunFailed as error:
            print(f" FAILED\n{error}", flush=True)
            failures.append(spec.slug)
            continue
        record["run_dir"] = str(run_dir(spec, settings, args.out))
        records.append(record)
        if not record["cached"]:
            trained_s.append(record["wall_s"])
        left = sum(
            1 for later in specs[number:] if load_result(run_dir(later, settings, args.out)) is None
        )
        eta = f", ~{left * sum(trained_s) / len(trained_s) / 60:.0f} min left" if trained_s else ""
        how = "cached" if record["cached"] else f"{record['wall_s']:.0f} s"
        loss = record["heldout"]["as trained"]["loss"]
        print(f" held-out loss {loss:.4f} ({how}{eta})", flush=True)
    return records, failures


def _dense_dir(spec: RunSpec, settings: Settings, out: Path) -> Path | None:
    if spec.recipe != "upcycle" or spec.dense:
        return None
    return run_dir(dense_spec(spec.recipe), settings, out)


def collect(specs: list[RunSpec], settings: Settings, out: Path) -> list[dict[str, Any]]:
    """Finished records of ``specs`` (for ``--report-only``)."""
    records = []
    for spec in specs:
        record = load_result(run_dir(spec, settings, out))
        if record is not None:
            record["run_dir"] = str(run_dir(spec, settings, out))
            record["cached"] = True
            records.append(record)
    return records


def machine() -> str:
    """CPU model and core count, or the GPU, for the report."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores ({cpu})"


def software() -> str:
    def version(name: str) -> str:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    return (
        f"Python {platform.python_version()}, torch {version('torch')}, "
        f"megatron-core {version('megatron-core')}"
    )


def training_span(records: list[dict[str, Any]]) -> tuple[str, str, float]:
    """First run's start, last run's finish (UTC) and the seconds between them, from the
    records (each keeps its finish time and wall time), so a report regenerated later from the
    cache still shows when and how long the sweep ran."""
    finished = [
        datetime.datetime.fromisoformat(record["finished"]).timestamp() for record in records
    ]
    started = [end - record["wall_s"] for end, record in zip(finished, records, strict=True)]
    first, last = min(started), max(finished)

    def utc(stamp: float) -> str:
        return datetime.datetime.fromtimestamp(stamp, datetime.UTC).strftime("%Y-%m-%d %H:%M")

    return utc(first), utc(last), last - first


def meta_for(
    args: argparse.Namespace,
    settings: Settings,
    records: list[dict[str, Any]],
    failures: list[str],
    started: float,
    argv: list[str],
) -> dict[str, Any]:
    if "--mock-data" in settings.extra_args:
        data = "megatron's mock data (`--mock-data`)"
    else:
        data = describe_data(args)
    gpu = f"; {args.gpus} GPU(s)" if args.gpus else "; no GPU (CPU emulation, gloo)"
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine() + gpu,
        "software": software(),
        "command": shlex.join(["python", "-m", "benchmarks.quality", *argv]),
        "num_runs": len(records),
        "num_trained": sum(not record["cached"] for record in records),
        "seeds": sorted({record["spec"]["seed"] for record in records}),
        "invocation_s": time.time() - started,
        "sum_run_s": sum(record["wall_s"] for record in records),
        "span": training_span(records),
        "settings": dataclasses.asdict(settings),
        "recipe": args.recipe,
        "data": data,
        "failures": failures,
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    started = time.time()
    args, extra = build_parser().parse_known_args(argv)
    problem = data_problem(args)
    if problem:  # before any run: a bad corpus would fail every run of the sweep in turn
        print(f"python -m benchmarks.quality: error: {problem}", file=sys.stderr)
        return 2
    settings = settings_from(args, extra)
    problem = layout_problem(settings)
    if problem:
        print(f"python -m benchmarks.quality: error: {problem}", file=sys.stderr)
        return 2
    specs = plan(args)
    args.out.mkdir(parents=True, exist_ok=True)
    report_dir = args.report_dir or (args.out / "quick-report" if args.quick else DEFAULT_REPORT)
    if args.dry_run:
        for spec in specs:
            state = "done" if load_result(run_dir(spec, settings, args.out)) else "to train"
            print(f"{spec.slug:40s} {run_dir(spec, settings, args.out).name} {state}")
        return 0
    if args.report_only:
        records, failures = collect(specs, settings, args.out), []
    else:
        records, failures = run_all(specs, settings, args)
    if not records:
        print("no finished runs to report")
        return 1
    meta = meta_for(args, settings, records, failures, started, argv)
    path = write_report(
        records,
        report_dir,
        meta,
        parse_capacities(args.capacities),
        args.recipe,
        args.report_name,
    )
    check = target_check(group_runs(records), args.recipe)
    print(f"report: {path}")
    if check["available"]:
        print(
            f"Top-1 {check['vanilla'].text()} vs Top-1+FR+IR {check['rectified'].text()} at cf "
            f"1.0: gap {check['gap']:.4f}, 2 x spread {2 * check['spread']:.4f} -> "
            f"{'target holds' if check['holds'] else 'target does not hold'}"
        )
        control = check["control"]
        if control["available"]:
            print(
                f"vs the gate-scaling control Top-1 (gate 1) {control['vanilla'].text()}: gap "
                f"{control['gap']:.4f}, 2 x spread {2 * control['spread']:.4f} -> "
                f"{'holds' if control['holds'] else 'does not hold'}"
            )
    return 1 if failures else 0
