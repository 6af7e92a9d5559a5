"""Shared plumbing of the cost benchmarks: devices, interleaved timing, launching the ranks.

Why interleaved timing: on a shared machine (the 2-core development VM, a GPU node with
neighbours) the speed drifts within seconds. Timing vanilla and rectified alternately, in the same
processes, with the order swapped every repeat, puts both under the same drift, so their *ratio*
is meaningful even when the absolute times wander. A repeat's time is that of the slowest rank
(an MoE step is as slow as its slowest EP rank); the headline is the median of the per-repeat
ratios and their quartiles show the noise.
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

SEED = 1234
VARIANTS = ("vanilla", "rectified")


def reseed(offset: int = 0) -> None:
    """Seed torch and megatron's model-parallel RNGs, so that a case builds the same weights
    whatever ran before it in the process."""
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    torch.manual_seed(SEED + offset)
    model_parallel_cuda_manual_seed(SEED + offset)


def on_gpu() -> bool:
    """True on CUDA machines (the CPU emulation keeps ``is_available()`` False)."""
    return torch.cuda.is_available()


def device() -> torch.device:
    """This rank's device: its GPU under torchrun, the CPU otherwise."""
    return torch.device("cuda", torch.cuda.current_device()) if on_gpu() else torch.device("cpu")


def synchronize() -> None:
    """Wait for queued GPU work, so that a host timer measures it."""
    if on_gpu():
        torch.cuda.synchronize()


def _distributed_world() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


def timed_call(fn: Callable[[], Any]) -> float:
    """Seconds one call of ``fn`` takes on this rank, all ranks starting together.

    On a GPU: CUDA events around the call on the current stream, which is idle when the start
    event is recorded (everything queued before was waited for), so the span also holds the
    time the GPU waited for the host (launches, host syncs) - what the step costs; the device
    is synchronised again after, so the next call starts idle too. On CPU: a host timer."""
    if _distributed_world() > 1:
        torch.distributed.barrier()
    synchronize()
    if on_gpu():
        start_event = torch.cuda.Event(enable_timing=True)
        end_event = torch.cuda.Event(enable_timing=True)
        start_event.record()
        fn()
        end_event.record()
        synchronize()
        return start_event.elapsed_time(end_event) / 1e3
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def slowest_rank(samples: dict[str, list[float]]) -> dict[str, list[float]]:
    """Per repeat, the maximum over ranks (one all-reduce for all samples, after timing)."""
    if _distributed_world() == 1:
        return samples
    names = list(samples)
    flat = torch.tensor([t for n in names for t in samples[n]], dtype=torch.float64)
    flat = flat.to(device())
    torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.MAX)
    values = flat.cpu().tolist()
    out, offset = {}, 0
    for name in names:
        out[name] = values[offset : offset + len(samples[name])]
        offset += len(samples[name])
    return out


def _one_round(variants: dict[str, Callable[[], Any]], index: int) -> dict[str, float]:
    """Each variant once; the order flips every round (A B, B A, ...) so that neither variant
    always runs right after the other's caches, allocations or collectives."""
    names = list(variants)
    return {name: timed_call(variants[name]) for name in (names[:: -1 if index % 2 else 1])}


def repeats_for_budget(repeats: int, budget_s: float, round_s: float, max_repeats: int) -> int:
    """At least ``repeats``; more when a round is short, to fill ``budget_s`` seconds.

    Cheap settings then get many samples (the noise of a shared machine averages out) and
    expensive ones keep the minimum. Every rank must agree (each call holds collectives), so the
    slowest rank's round time decides.
    """
    if budget_s <= 0 or round_s <= 0:
        return repeats
    if _distributed_world() > 1:
        slowest = torch.tensor([round_s], dtype=torch.float64, device=device())
        torch.distributed.all_reduce(slowest, op=torch.distributed.ReduceOp.MAX)
        round_s = float(slowest.item())
    return max(repeats, min(max_repeats, int(budget_s / round_s)))


def interleaved(
    variants: dict[str, Callable[[], Any]],
    repeats: int,
    warmup: int,
    budget_s: float = 0.0,
    max_repeats: int = 200,
    before_timing: Callable[[], Any] | None = None,
) -> dict[str, list[float]]:
    """Time every variant alternately, after ``warmup`` untimed rounds, for ``repeats`` rounds
    (more within ``budget_s``, see :func:`repeats_for_budget`); ``before_timing`` runs between
    the warm-up and the timed rounds (e.g. to reset statistics). Returns the slowest rank's
    seconds per variant and round."""
    last_round: dict[str, float] = {}
    for index in range(warmup):
        last_round = _one_round(variants, index)
    repeats = repeats_for_budget(repeats, budget_s, sum(last_round.values()), max_repeats)
    if before_timing is not None:
        before_timing()
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for index in range(warmup, warmup + repeats):
        for name, elapsed in _one_round(variants, index).items():
            samples[name].append(elapsed)
    return slowest_rank(samples)


def summarize(samples: dict[str, list[float]]) -> dict[str, float]:
    """Median times (ms) and the ratio rectified / vanilla: the median of the per-repeat
    ratios, with their quartiles.

    Why per-repeat ratios: the two calls of a repeat run back to back, so a burst of load from
    elsewhere on the machine hits both; the ratio of the two *medians* mixes calls from different
    moments and, on a shared machine, was seen to land outside the per-repeat quartiles.
    """
    vanilla, rectified = samples["vanilla"], samples["rectified"]
    paired = [r / v for v, r in zip(vanilla, rectified, strict=True)]
    q1, _, q3 = (
        statistics.quantiles(paired, n=4, method="inclusive") if len(paired) > 1 else paired * 3
    )
    return {
        "vanilla_ms": 1e3 * statistics.median(vanilla),
        "rectified_ms": 1e3 * statistics.median(rectified),
        "ratio": statistics.median(paired),
        "ratio_q1": q1,
        "ratio_q3": q3,
        "repeats": len(paired),
    }


def peak_memory_gib(fn: Callable[[], Any]) -> float | None:
    """Peak GPU memory allocated during one more call of ``fn``; on CPU None, without calling
    ``fn`` (the process's memory is not the model's, and the call would only cost time)."""
    if not on_gpu():
        return None
    synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    synchronize()
    return torch.cuda.max_memory_allocated() / 2**30


# ---- launching ranks ----------------------------------------------------------------------


def launched_by_torchrun() -> bool:
    """True in a process started by torchrun (GPU runs); the CPU path spawns gloo ranks."""
    return "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_WORLD_SIZE" in os.environ


def torchrun_world() -> tuple[int, int]:
    """(rank, world size) of a torchrun launch; joins the NCCL group on first use."""
    if not torch.distributed.is_initialized():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        torch.distributed.init_process_group("nccl" if on_gpu() else "gloo")
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def available_world() -> int | None:
    """Processes a part may use: the torchrun world, or None (CPU: one process per EP rank)."""
    return torchrun_world()[1] if launched_by_torchrun() else None


def launch(fn: Callable[..., Any], ep: int, *, timeout_s: float = 3600.0, **kwargs: Any) -> list:
    """Run ``fn(rank, world_size, **kwargs)`` on every rank with expert parallelism ``ep``.

    CPU: ``ep`` gloo processes (CPU emulation). torchrun: every launched process, megatron's
    parallel state re-initialised for ``ep`` (the rest of the world is expert data parallel).
    Returns the per-rank results, indexed by rank.
    """
    if launched_by_torchrun():
        return _launch_in_torchrun(fn, ep, **kwargs)
    from megatron.rectify.dev.multiprocess import run_distributed

    return run_distributed(
        fn, ep, expert_model_parallel_size=ep, timeout_s=timeout_s, seed=SEED, **kwargs
    )


def _launch_in_torchrun(fn: Callable[..., Any], ep: int, **kwargs: Any) -> list:
    from megatron.core import parallel_state

    rank, world = torchrun_world()
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(expert_model_parallel_size=ep)
    reseed()
    result = fn(rank, world, **kwargs)
    gathered: list[Any] = [None] * world
    torch.distributed.all_gather_object(gathered, result)
    return gathered


#: Routing rates that differ per rank (each routes its own tokens): averaged in the report.
RATE_KEYS = ("dropped_pct", "padded_pct", "filled_in_pct", "rectified_pct", "lost_pct")


def average_rates(per_rank: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Rank 0's rows with the routing rates replaced by their mean over ranks."""
    rows = []
    for index, row in enumerate(per_rank[0]):
        row = dict(row)
        for key in RATE_KEYS:
            if key in row:
                row[key] = sum(r[index][key] for r in per_rank) / len(per_rank)
        rows.append(row)
    return rows


def _measure_each_case(
    rank: int,
    world_size: int,
    measure: Callable[..., dict[str, Any]],
    label: str,
    cases: list[Any],
    **options: Any,
) -> list[dict[str, Any]]:
    """Rank body of :func:`run_per_ep`: ``measure(case, **options)`` for every case in turn."""
    rows = []
    for case in cases:
        row = measure(case, **options)
        if rank == 0:
            print(f"{label} {case}: ratio {row['ratio']:.3f}", flush=True)
        rows.append(row)
    return rows


def run_per_ep(
    measure: Callable[..., dict[str, Any]], label: str, cases: list[Any], **options: Any
) -> list[dict[str, Any]]:
    """Every case (each with an ``ep`` field), one launch per EP size since a launch fixes the
    expert-parallel group; timings from rank 0 (already the slowest rank's), routing rates
    averaged over ranks. ``measure`` must be a module-level function (it crosses processes)."""
    rows = []
    for ep in sorted({case.ep for case in cases}):
        group = [case for case in cases if case.ep == ep]
        per_rank = launch(
            _measure_each_case, ep, measure=measure, label=label, cases=group, **options
        )
        rows.extend(average_rates(per_rank))
    return rows


def is_reporting_process() -> bool:
    """Only one process prints and writes files (rank 0 under torchrun, the parent on CPU)."""
    return not launched_by_torchrun() or torchrun_world()[0] == 0


def machine_info() -> dict[str, Any]:
    """What the report states about where the numbers come from."""
    from importlib.metadata import version

    info: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "load_average": round(os.getloadavg()[0], 2),  # others' work on a shared machine
        "python": platform.python_version(),
        "torch": torch.__version__,
        "megatron_core": version("megatron-core"),  # the wheel (``__version__`` adds a git hash)
        "device": "cpu (gloo, CPU emulation, 1 thread per rank)",
    }
    if on_gpu():
        info["device"] = f"{torch.cuda.get_device_name()} x{_distributed_world()} (NCCL)"
    return info


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
