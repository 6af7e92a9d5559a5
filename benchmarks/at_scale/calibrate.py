"""This machine's parameters, measured in seconds: GEMM rate, memory bandwidth, gloo all-to-all.

Why: the cost model is checked against the CPU layer benchmark (``benchmarks/perf``'s layer
part), which runs one gloo process per EP rank, one thread each. The calibration measures the
model's machine parameters under the same conditions: P processes (1, 2 and 4) started by the
same harness (:func:`megatron.rectify.dev.multiprocess.run_distributed`), each timing, *at the
same time as the others*, the six GEMMs of an expert MLP forward+backward (so that P processes
sharing the cores, as EP = 4 does on 2 cores, show up as a lower rate per process), a large copy
(memory bandwidth), and ``all_to_all_single`` at several sizes (latency and bandwidth, fitted).
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from benchmarks.at_scale.cluster import Cluster

PROCESSES = (1, 2, 4)
#: The CPU layer benchmark's base case: hidden 256, FFN 1024, 512 rows per expert at EP 2.
GEMM_SHAPE = (512, 256, 1024)
#: Diagnostic only (one process): the rate at the other hidden sizes the benchmark sweeps.
DIAGNOSTIC_HIDDEN = (128, 256, 512, 1024)
A2A_ROWS = (16, 64, 256, 1024, 4096)  # rows per peer, hidden 256, fp32
A2A_HIDDEN = 256


def _timed(fn: Any, repeats: int) -> float:
    """Median seconds of ``repeats`` calls after one warm-up call."""
    fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def mlp_gemm_rate(rows: int, hidden: int, ffn: int, seconds: float) -> float:
    """FLOP/s of the six GEMMs of a (non-gated) expert MLP forward + backward, sustained.

    Timed over ``seconds`` of back-to-back calls, not as the median of short calls: on a
    shared machine the scheduler lets a process that just woke up run at full speed for a
    while, and the layer benchmark, which runs for minutes, gets only its fair share."""
    import torch

    x, dy = torch.randn(rows, hidden), torch.randn(rows, hidden)
    w1, w2 = torch.randn(hidden, ffn), torch.randn(ffn, hidden)

    def six() -> None:
        h = x @ w1
        _ = h @ w2
        dh = dy @ w2.T
        _ = h.T @ dy
        _ = dh @ w1.T
        _ = x.T @ dh

    six()
    calls, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds or calls == 0:
        six()
        calls += 1
    return 12.0 * rows * hidden * ffn * calls / elapsed


def copy_bandwidth(mib: int = 32, repeats: int = 10) -> float:
    """Bytes/s read + written by ``Tensor.copy_`` of a ``mib`` MiB tensor."""
    import torch

    src = torch.randn(mib * 2**18)
    dst = torch.empty_like(src)
    return 2.0 * src.numel() * 4 / _timed(lambda: dst.copy_(src), repeats)


def _barrier() -> None:
    import torch

    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.barrier()


def _rank_body(rank: int, world_size: int, repeats: int, gemm_s: float) -> dict[str, Any]:
    """Rank body: every measurement starts on all ranks together (barrier)."""
    import torch

    _barrier()
    gemm = mlp_gemm_rate(*GEMM_SHAPE, seconds=gemm_s)
    _barrier()
    memory = copy_bandwidth()
    a2a = []
    if world_size > 1:
        for rows in A2A_ROWS:
            send = torch.randn(world_size * rows, A2A_HIDDEN)
            recv = torch.empty_like(send)

            def call(send: Any = send, recv: Any = recv) -> None:
                torch.distributed.all_to_all_single(recv, send)

            _barrier()
            seconds = _timed(call, 2 * repeats)  # short calls: more samples
            a2a.append(((world_size - 1) * rows * A2A_HIDDEN * 4, seconds))
    diagnostic = {}
    if world_size == 1:
        for hidden in DIAGNOSTIC_HIDDEN:
            diagnostic[hidden] = mlp_gemm_rate(GEMM_SHAPE[0], hidden, 4 * hidden, seconds=0.5)
    return {"gemm_flops": gemm, "mem_bw": memory, "a2a": a2a, "diagnostic": diagnostic}


def fit_latency_bandwidth(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares ``seconds = latency + bytes / bandwidth`` -> (latency, bandwidth).

    The latency is clamped at 0 (a negative intercept is noise around a tiny latency). If noise
    makes the slope negative (bigger messages measured faster), the line is fitted through the
    origin instead: no latency, a positive bandwidth."""
    n = len(points)
    if n < 2:
        raise ValueError("need at least two sizes to fit latency and bandwidth")
    mean_x = sum(x for x, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    sxx = sum((x - mean_x) ** 2 for x, _ in points)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / sxx
    if slope <= 0:
        return 0.0, sum(x * x for x, _ in points) / sum(x * y for x, y in points)
    return max(0.0, mean_y - slope * mean_x), 1.0 / slope


@dataclass
class Calibration:
    """Measured per process count P: GEMM FLOP/s and copy bytes/s per process (slowest rank),
    gloo all-to-all latency (s per call) and bandwidth (bytes sent to others / s)."""

    gemm_flops: dict[int, float]
    mem_bw: dict[int, float]
    a2a_latency_s: dict[int, float]
    a2a_bw: dict[int, float]
    gemm_by_hidden: dict[int, float]
    wall_s: float
    load_before: float
    load_after: float
    cpu: str = ""
    a2a_points: dict[int, list[tuple[float, float]]] = field(default_factory=dict)

    def contention(self, processes: int) -> float:
        """How much slower one process computes with ``processes`` of them running."""
        return self.gemm_flops[1] / self.gemm_flops[processes]

    def as_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Calibration:
        """Inverse of :meth:`as_json` (JSON turns the int keys into strings)."""
        keyed = ("gemm_flops", "mem_bw", "a2a_latency_s", "a2a_bw", "gemm_by_hidden", "a2a_points")
        fixed = {k: {int(p): v for p, v in data[k].items()} for k in keyed if k in data}
        return cls(**{**data, **fixed})


def run(
    repeats: int = 8, gemm_s: float = 3.0, processes: tuple[int, ...] = PROCESSES
) -> Calibration:
    """Measure everything (about 30-40 s on 2 cores)."""
    from benchmarks.perf.common import machine_info
    from megatron.rectify.dev.multiprocess import run_distributed

    start, load_before = time.perf_counter(), os.getloadavg()[0]
    cal = Calibration({}, {}, {}, {}, {}, 0.0, load_before, 0.0, cpu=machine_info()["cpu"])
    for p in processes:
        per_rank = run_distributed(
            _rank_body,
            p,
            expert_model_parallel_size=p,
            timeout_s=300,
            repeats=repeats,
            gemm_s=gemm_s,
        )
        cal.gemm_flops[p] = min(r["gemm_flops"] for r in per_rank)
        cal.mem_bw[p] = min(r["mem_bw"] for r in per_rank)
        if p > 1:
            # every rank's time per size; the slowest rank's is what a collective costs
            points = [
                (size, max(r["a2a"][i][1] for r in per_rank))
                for i, (size, _) in enumerate(per_rank[0]["a2a"])
            ]
            cal.a2a_points[p] = points
            cal.a2a_latency_s[p], cal.a2a_bw[p] = fit_latency_bandwidth(points)
        if per_rank[0]["diagnostic"]:
            cal.gemm_by_hidden = dict(per_rank[0]["diagnostic"])
    cal.wall_s = time.perf_counter() - start
    cal.load_after = os.getloadavg()[0]
    return cal


def cpu_cluster(
    cal: Calibration,
    processes: int,
    router_per_token_s: float = 0.0,
    overhead_one_process_s: float = 0.0,
    rectify_one_process_s: float = 0.0,
) -> Cluster:
    """This machine as a :class:`Cluster` of ``processes`` gloo ranks (fp32, one node).

    ``overhead_one_process_s`` (every layer call) and ``rectify_one_process_s`` (the rectified
    layer's own bookkeeping) are fixed per-call costs as one uncontended process would pay them;
    with P processes they are slowed by the same contention as the GEMMs."""
    single = processes == 1
    return Cluster(
        name=f"this machine, {processes} gloo process(es)",
        nodes=1,
        gpus_per_node=processes,
        peak_flops=cal.gemm_flops[processes],
        compute_efficiency=1.0,
        efficiency_source="measured (MLP GEMMs, all processes at once)",
        intra_bw=float("inf") if single else cal.a2a_bw[processes],
        inter_bw=float("inf") if single else cal.a2a_bw[processes],
        link_efficiency=1.0,
        a2a_latency_intra_s=0.0 if single else cal.a2a_latency_s[processes],
        a2a_latency_inter_s=0.0 if single else cal.a2a_latency_s[processes],
        mem_bw=cal.mem_bw[processes],
        sync_s=0.0,
        router_fixed_s=0.0,
        router_per_token_s=router_per_token_s * cal.contention(processes),
        per_call_overhead_s=overhead_one_process_s * cal.contention(processes),
        rectify_overhead_s=rectify_one_process_s * cal.contention(processes),
        act_bytes=4,
        prob_bytes=4,
    )
