"""Machine parameters of the cost model: every number a stated assumption, in one dataclass.

Why one dataclass: a prediction is only as good as its machine numbers, and a reader must be
able to see (and change) all of them at once. :func:`h100` is the default cluster of the report
(nominal datasheet figures and a nominal compute efficiency: no GPU check has run for this
project); :func:`benchmarks.at_scale.calibrate.cpu_cluster` builds the same dataclass from this
machine's measured GEMM rate and gloo bandwidth, so that the *same* formulas can be checked
against the CPU layer benchmark.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Cluster:
    """A homogeneous cluster: ``nodes`` x ``gpus_per_node`` devices (CPU: processes).

    Bandwidths are per device and per direction (an all-to-all sends and receives at once).
    ``router_per_token_s`` is the router's non-GEMM time per token where it grows with the
    tokens (the CPU); ``per_call_overhead_s`` a fixed time per layer call (0 on GPUs, calibrated
    on the CPU); ``rectify_overhead_s`` what the rectified layer's own bookkeeping (the IR side
    batch's small operations) adds per call. ``link_efficiency`` scales both links (the fraction
    of nominal bandwidth an all-to-all reaches); ``compute_efficiency`` scales ``peak_flops`` for
    every GEMM (experts, gating, attention); ``mem_bw`` prices the memory-bound passes (permute,
    activation, the IR copy).
    """

    name: str
    nodes: int
    gpus_per_node: int
    peak_flops: float
    compute_efficiency: float
    efficiency_source: str
    intra_bw: float
    inter_bw: float
    link_efficiency: float
    a2a_latency_intra_s: float
    a2a_latency_inter_s: float
    mem_bw: float
    sync_s: float
    router_fixed_s: float
    router_per_token_s: float = 0.0
    per_call_overhead_s: float = 0.0
    rectify_overhead_s: float = 0.0
    act_bytes: int = 2
    prob_bytes: int = 4

    @property
    def gpus(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def flops(self) -> float:
        """Achieved FLOP/s per device for every GEMM."""
        return self.peak_flops * self.compute_efficiency

    @property
    def intra_bytes_per_s(self) -> float:
        return self.intra_bw * self.link_efficiency

    @property
    def inter_bytes_per_s(self) -> float:
        return self.inter_bw * self.link_efficiency

    def with_(self, **changes: Any) -> Cluster:
        return dataclasses.replace(self, **changes)

    def describe(self) -> list[tuple[str, str, str]]:
        """(parameter, value, where it comes from) rows for the report."""
        return [
            ("devices", f"{self.nodes} node(s) x {self.gpus_per_node}", "layout"),
            ("peak dense FLOP/s per device", f"{self.peak_flops / 1e12:,.1f} T", "datasheet"),
            ("compute efficiency (fraction of peak)", f"{self.compute_efficiency}",
             self.efficiency_source),
            ("intra-node bandwidth per device, per direction", f"{self.intra_bw / 1e9:,.0f} GB/s",
             "NVLink 4: 900 GB/s bidirectional = 450 GB/s each way"),
            ("inter-node bandwidth per device, per direction", f"{self.inter_bw / 1e9:,.0f} GB/s",
             "8 x 400 Gb/s InfiniBand per node = 1 NIC (50 GB/s) per GPU"),
            ("all-to-all link efficiency", f"{self.link_efficiency}", "nominal"),
            ("all-to-all latency per call (intra / inter)",
             f"{self.a2a_latency_intra_s * 1e6:.0f} / {self.a2a_latency_inter_s * 1e6:.0f} us",
             "nominal"),
            ("memory bandwidth per device", f"{self.mem_bw / 1e12:.2f} TB/s", "HBM3 datasheet"),
            ("cost of one host sync", f"{self.sync_s * 1e6:.0f} us", "nominal"),
            ("vanilla router fwd+bwd, non-GEMM part", f"{self.router_fixed_s * 1e3:.2f} ms",
             "nominal (launch-bound: ~30 small kernels)"),
            ("rectified layer's extra bookkeeping per call",
             f"{self.rectify_overhead_s * 1e3:.2f} ms",
             "nominal (~20 more small kernels: IR side batch, fwd+bwd)"),
            ("activations / router probs on the wire", f"{self.act_bytes} / {self.prob_bytes} B",
             "bf16 tokens, fp32 probs"),
        ]  # fmt: skip


def h100(nodes: int, compute_efficiency: float = 0.5) -> Cluster:
    """``nodes`` x 8 H100 SXM (989 TFLOP/s bf16 dense, NVLink 4, 8 x 400 Gb/s IB per node).

    Efficiency 0.5 is nominal: the project's GPU check (``scripts/gpu_check.sh``) would measure
    the expert GEMMs' TFLOP/s, but no GPU was available to any session that wrote this code.
    """
    return Cluster(
        name=f"{nodes} x 8 H100 SXM",
        nodes=nodes,
        gpus_per_node=8,
        peak_flops=989e12,
        compute_efficiency=compute_efficiency,
        efficiency_source="nominal: no GPU check has run",
        intra_bw=450e9,
        inter_bw=50e9,
        link_efficiency=0.8,
        a2a_latency_intra_s=20e-6,
        a2a_latency_inter_s=50e-6,
        mem_bw=3.35e12,
        sync_s=30e-6,
        router_fixed_s=0.25e-3,
        rectify_overhead_s=0.15e-3,
    )
