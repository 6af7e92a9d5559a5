"""The cost model: one MoE layer forward+backward, and a training step, on the slowest EP rank.

Every term, per EP rank (device), for a layer whose router sees ``T`` tokens:

- **expert GEMMs**: rows x FLOPs per row (:func:`expert_flops_per_row`) / achieved FLOP/s. Rows:
  with capacity and padding every local expert runs ``EP * C`` slots whatever the routing, i.e.
  ``E * C`` rows per rank; IR adds the rank's own rectified tokens (never sent, computed locally),
  and the slowest rank's IR load sets the pace; dropless runs the rank's actual load, the hottest
  rank's.
- **EP all-to-all**: per remote row, the dispatch sends the token (H activations) and its gate
  probability, the combine sends the output back (H), the backward mirrors both: the same
  ``(rows_out + rows_in) * (2 H a + p)`` bytes that ``benchmarks/perf``'s counter measures
  (:func:`a2a_bytes_per_rank`; checked against ``docs/results/perf_bytes.json`` in the tests).
  Remote peers split into the same node (NVLink) and other nodes (InfiniBand); NCCL drives both
  at once, so the time is the slower of the two, plus a latency per call. IR tokens stay on their
  GPU: no bytes. With padding FR rides in padding slots: no bytes either.
- **router**: the gating GEMM plus a fixed (launch-bound) part, times the rectified / vanilla
  ratio measured by ``benchmarks/perf``'s router part when rectification is on.
- **memory-bound passes** (permute, unpermute, activation; the IR interleave copy) at the memory
  bandwidth, and **host syncs** (counted by ``benchmarks/perf``'s syncs part) at a fixed cost.
- a **fixed per-call overhead** (0 on GPUs; on the CPU calibrated once, see :mod:`.validate`), and
  for the rectified layer the fixed cost of its own bookkeeping (the IR side batch's small
  operations; nominal on GPUs, calibrated on the CPU).

Nothing overlaps (megatron's default: no expert-parallel communication overlap).
"""

from __future__ import annotations

from dataclasses import dataclass

from benchmarks.at_scale.cluster import Cluster
from benchmarks.at_scale.routing_load import capacity

#: ``all_to_all_single`` calls per layer forward+backward in megatron-core 0.19's alltoall
#: dispatcher: tokens and probs (dispatch), outputs (combine); the backward mirrors all three.
A2A_CALLS = 6


def expert_flops_per_row(hidden: int, ffn: int, gated: bool) -> float:
    """FLOPs of one token through one expert MLP, forward + backward (backward = 2 x forward).

    Forward: fc1 ``H -> F`` (``H -> 2F`` gated: gate and up projections) and fc2 ``F -> H``,
    2 FLOPs per multiply-add."""
    forward = 2 * hidden * ffn * (3 if gated else 2)
    return 3.0 * forward


def gating_flops_per_token(hidden: int, experts: int) -> float:
    """The router's ``H -> E`` logits GEMM, forward + backward."""
    return 3.0 * 2 * hidden * experts


def attention_flops_per_token(
    hidden: int, heads: int, kv_heads: int, seq: int, causal: bool = True
) -> float:
    """Self-attention of one layer per token, forward + backward: QKV and output projections
    (grouped-query: ``kv_heads`` key/value heads) and the score / value products over ``seq``
    positions (half of them under a causal mask)."""
    kv_dim = kv_heads * (hidden // heads)
    projections = 2 * hidden * (hidden + 2 * kv_dim) + 2 * hidden * hidden
    core = 2 * 2 * seq * hidden * (0.5 if causal else 1.0)
    return 3.0 * (projections + core)


def output_layer_flops_per_token(hidden: int, vocab: int) -> float:
    return 3.0 * 2 * hidden * vocab


def elementwise_elems_per_row(hidden: int, ffn: int, gated: bool) -> int:
    """Elements one expert row moves through memory outside the GEMMs, forward + backward:
    permute and unpermute (4 passes, each reads and writes H) and the activation (forward reads
    the fc1 output, 2F gated, and writes F; backward reads both and writes the fc1 gradient)."""
    fc1_out = 2 * ffn if gated else ffn
    return 8 * hidden + 3 * fc1_out + 2 * ffn


def wire_bytes_per_row(hidden: int, act_bytes: int, prob_bytes: int) -> int:
    """Bytes per remote row sent *or* received, forward + backward: the dispatch moves H
    activations + 1 probability, the combine H activations; the backward mirrors each."""
    return 2 * hidden * act_bytes + prob_bytes


def a2a_bytes_per_rank(
    rows_out: float, rows_in: float, hidden: int, act_bytes: int, prob_bytes: int
) -> float:
    """Bytes one rank sends to other ranks in one layer forward+backward (what
    ``benchmarks.perf.a2a_bytes.AllToAllCounter`` counts): forward it sends its rows out
    (dispatch) and the rows it received back (combine); backward the other way round."""
    return (rows_out + rows_in) * wire_bytes_per_row(hidden, act_bytes, prob_bytes)


def padded_remote_rows(
    tokens: int, topk: int, capacity_factor: float, experts: int, ep: int
) -> int:
    """Rows a rank sends to (and receives from) other ranks with padding: ``C`` per expert of
    every other rank, whatever the routing."""
    return (ep - 1) * (experts // ep) * capacity(tokens, topk, capacity_factor, experts)


def remote_split(ep: int, ep_per_node: int) -> tuple[float, float]:
    """(intra-node, inter-node) fractions of a rank's remote peers (uniform traffic)."""
    if ep <= 1:
        return 0.0, 0.0
    intra = (ep_per_node - 1) / (ep - 1)
    return intra, 1.0 - intra


@dataclass(frozen=True)
class LayerShape:
    """What the layer model needs to know about one MoE layer on one EP layout."""

    hidden: int
    ffn: int
    experts: int
    topk: int
    tokens: int
    ep: int
    ep_per_node: int
    gated: bool = True


@dataclass(frozen=True)
class Routing:
    """One mode's routing on one layout.

    ``capacity_factor`` None = dropless. ``ir_frac``: IR-computed tokens / T (mean over ranks);
    ``ir_max_over_mean`` and ``rank_load_max_over_mean``: the slowest rank's share
    (:mod:`.routing_load`); ``rectified``: the rectified router runs (IR and/or FR);
    ``router_ratio``: rectified / vanilla router time; ``syncs``: host syncs per layer call.
    """

    capacity_factor: float | None
    ir_frac: float = 0.0
    ir_max_over_mean: float = 1.0
    rank_load_max_over_mean: float = 1.0
    rectified: bool = False
    router_ratio: float = 1.0
    syncs: int = 1

    @property
    def dropless(self) -> bool:
        return self.capacity_factor is None


@dataclass(frozen=True)
class LayerTime:
    """Seconds per layer forward+backward on the slowest rank, by term, and what they price."""

    gemm_s: float
    a2a_intra_s: float
    a2a_inter_s: float
    a2a_latency_s: float
    router_s: float
    memory_s: float
    rectify_copy_s: float
    rectify_overhead_s: float
    sync_s: float
    overhead_s: float
    expert_rows: float
    bytes_intra: float
    bytes_inter: float

    @property
    def a2a_s(self) -> float:
        return max(self.a2a_intra_s, self.a2a_inter_s) + self.a2a_latency_s

    @property
    def total_s(self) -> float:
        return (
            self.gemm_s
            + self.a2a_s
            + self.router_s
            + self.memory_s
            + self.rectify_copy_s
            + self.rectify_overhead_s
            + self.sync_s
            + self.overhead_s
        )


def expert_rows(shape: LayerShape, routing: Routing) -> tuple[float, float]:
    """(rows the slowest rank computes, rows it sends to / receives from others at most)."""
    ep_share = (shape.ep - 1) / shape.ep if shape.ep > 1 else 0.0
    if routing.dropless:
        hottest = shape.topk * shape.tokens * routing.rank_load_max_over_mean
        return hottest, hottest * ep_share
    slots = shape.experts * capacity(
        shape.tokens, shape.topk, routing.capacity_factor, shape.experts
    )
    ir_rows = routing.ir_frac * shape.tokens * routing.ir_max_over_mean
    remote = padded_remote_rows(
        shape.tokens, shape.topk, routing.capacity_factor, shape.experts, shape.ep
    )
    return slots + ir_rows, float(remote)


def layer_time(shape: LayerShape, routing: Routing, cluster: Cluster) -> LayerTime:
    """One MoE layer forward+backward on the slowest EP rank (see the module docstring)."""
    rows, remote = expert_rows(shape, routing)
    gemm = rows * expert_flops_per_row(shape.hidden, shape.ffn, shape.gated) / cluster.flops
    # the busiest rank moves `remote` rows out and in (padded: exactly; dropless: the hottest
    # rank receives them), in each of the forward and backward
    wire = a2a_bytes_per_rank(remote, remote, shape.hidden, cluster.act_bytes, cluster.prob_bytes)
    intra, inter = remote_split(shape.ep, shape.ep_per_node)
    calls = A2A_CALLS + (1 if routing.dropless else 0)  # dropless: + the counts all-gather
    crosses_nodes = shape.ep > shape.ep_per_node
    latency = cluster.a2a_latency_inter_s if crosses_nodes else cluster.a2a_latency_intra_s
    router = (
        shape.tokens * gating_flops_per_token(shape.hidden, shape.experts) / cluster.flops
        + cluster.router_fixed_s
        + shape.tokens * cluster.router_per_token_s
    )
    if routing.rectified:
        router *= routing.router_ratio
    elems = elementwise_elems_per_row(shape.hidden, shape.ffn, shape.gated)
    # the IR side batch is interleaved with the received tokens: one more copy of every row
    # (and of its gradient), read + write
    copy = 4 * shape.hidden * rows if routing.ir_frac > 0 else 0.0
    return LayerTime(
        gemm_s=gemm,
        a2a_intra_s=wire * intra / cluster.intra_bytes_per_s,
        a2a_inter_s=wire * inter / cluster.inter_bytes_per_s if inter else 0.0,
        a2a_latency_s=calls * latency if shape.ep > 1 else 0.0,
        router_s=router,
        memory_s=rows * elems * cluster.act_bytes / cluster.mem_bw,
        rectify_copy_s=copy * cluster.act_bytes / cluster.mem_bw,
        rectify_overhead_s=cluster.rectify_overhead_s if routing.rectified else 0.0,
        sync_s=routing.syncs * cluster.sync_s,
        overhead_s=cluster.per_call_overhead_s,
        expert_rows=rows,
        bytes_intra=wire * intra,
        bytes_inter=wire * inter,
    )


@dataclass(frozen=True)
class StepTime:
    """One training micro-batch step per GPU: every layer's attention + MoE layer, the output
    layer; the optimizer, data-parallel gradient reduction and pipeline bubbles are left out
    (they cost every routing mode the same)."""

    layer: LayerTime
    attention_s: float
    output_layer_s: float
    layers: int
    tokens: int

    @property
    def total_s(self) -> float:
        return self.layers * (self.layer.total_s + self.attention_s) + self.output_layer_s

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.total_s

    @property
    def moe_share(self) -> float:
        return self.layers * self.layer.total_s / self.total_s


def step_time(
    shape: LayerShape,
    routing: Routing,
    cluster: Cluster,
    layers: int,
    heads: int,
    kv_heads: int,
    seq: int,
    vocab: int,
) -> StepTime:
    layer = layer_time(shape, routing, cluster)
    attention = attention_flops_per_token(shape.hidden, heads, kv_heads, seq) * shape.tokens
    head = output_layer_flops_per_token(shape.hidden, vocab) * shape.tokens
    return StepTime(
        layer=layer,
        attention_s=attention / cluster.flops,
        output_layer_s=head / cluster.flops,
        layers=layers,
        tokens=shape.tokens,
    )
