"""What is priced: model sizes, parallel layouts, routing modes.

Layouts put the expert-parallel (EP) group on the cluster; everything not in EP (data, tensor,
pipeline parallelism) is outside the model: it costs every routing mode the same. Modes are the
settings the quality benchmark trained (``docs/results/quality.md``), so that a measured held-out
loss can stand beside each predicted throughput.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MoEModel:
    """A decoder whose every FFN is an MoE layer (``ffn`` = one expert's hidden width)."""

    name: str
    hidden: int
    ffn: int
    experts: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    seq: int
    gated: bool = True


MIXTRAL_8X7B = MoEModel("Mixtral-8x7B", 4096, 14336, 8, 32, 32, 8, 32000, 4096)
LLAMA2_7B_8E = MoEModel("Llama-2-7B upcycled, 8 experts", 4096, 11008, 8, 32, 32, 32, 32000, 4096)
LLAMA2_7B_32E = MoEModel(
    "Llama-2-7B upcycled, 32 experts", 4096, 11008, 32, 32, 32, 32, 32000, 4096
)
#: DeepSeekMoE-16B-like sizes (64 routed experts of width 1408, top-6), without its 2 shared
#: experts (they cost every mode the same).
FINE_64E = MoEModel("fine-grained 64 experts", 2048, 1408, 64, 28, 16, 16, 102400, 4096)


@dataclass(frozen=True)
class Layout:
    """``model`` on ``nodes`` x 8 GPUs, EP group of ``ep`` ranks, ``ep_per_node`` of them per node.

    ``tokens`` is what one GPU routes per micro-batch (one router call).
    """

    name: str
    model: MoEModel
    nodes: int
    ep: int
    ep_per_node: int
    topk: int
    tokens: int = 4096
    note: str = ""

    def __post_init__(self) -> None:
        if self.model.experts % self.ep:
            raise ValueError(
                f"{self.name}: {self.model.experts} experts do not split over EP {self.ep}"
            )
        if self.ep % self.ep_per_node:
            raise ValueError(f"{self.name}: EP {self.ep} is not a multiple of {self.ep_per_node}")


LAYOUTS = (
    Layout("Mixtral-8x7B, 2 nodes, EP 8 in a node", MIXTRAL_8X7B, 2, 8, 8, 2,
           note="EP <= 8 with 8 experts (megatron needs experts % EP == 0); EP in a node, the "
           "2nd node is data parallel; on 8 nodes with EP in a node every number is the same"),
    Layout("Mixtral-8x7B, 8 nodes, EP 8 across nodes", MIXTRAL_8X7B, 8, 8, 1, 2,
           note="one EP rank per node, as when tensor parallelism fills each node (megatron "
           "orders TP innermost): every all-to-all byte crosses InfiniBand"),
    Layout("paper: Llama-2-7B 8 experts, 1 node, EP 8", LLAMA2_7B_8E, 1, 8, 8, 1,
           note="one expert per GPU, as in the paper"),
    Layout("paper: Llama-2-7B 32 experts, 4 nodes, EP 32", LLAMA2_7B_32E, 4, 32, 8, 1,
           note="one expert per GPU over 4 nodes"),
    Layout("64 experts top-6, 1 node, EP 8", FINE_64E, 1, 8, 8, 6,
           note="8 experts per GPU, all-to-all on NVLink only"),
    Layout("64 experts top-6, 2 nodes, EP 16", FINE_64E, 2, 16, 8, 6,
           note="4 experts per GPU, half of the remote bytes cross nodes"),
    Layout("64 experts top-6, 8 nodes, EP 64", FINE_64E, 8, 64, 8, 6,
           note="one expert per GPU, 56 of 63 remote peers in other nodes"),
)  # fmt: skip


@dataclass(frozen=True)
class Mode:
    """A routing setting. ``capacity_factor`` None is dropless (no capacity, no padding).

    ``quality`` names the quality benchmark's run group whose held-out loss and routing rates
    belong to this mode: (variant, capacity factor as written in quality.md); ``rates_from`` is
    the group whose dropped / rectified % are used when ``quality`` has none recorded.
    """

    label: str
    topk: int
    capacity_factor: float | None
    ir: bool = False
    fr: bool = False
    quality: tuple[str, str] | None = None
    rates_from: tuple[str, str] | None = None

    @property
    def dropless(self) -> bool:
        return self.capacity_factor is None

    @property
    def rectify(self) -> str:
        return "+".join(name for name, on in (("ir", self.ir), ("fr", self.fr)) if on) or "none"


def modes_for(topk: int) -> list[Mode]:
    """The modes priced for a layout whose model routes ``topk`` experts natively.

    Top-1 / Top-2 layouts get the quality benchmark's settings (each with a measured loss): the
    five capacity / rectification choices at Top-1, and Top-2 with and without FR+IR. Other
    ``topk`` (the fine-grained top-6 model) get the same five choices at their own top-k, with the
    Top-1 groups' routing rates (no top-6 quality run exists, so no loss either).
    """
    if topk in (1, 2):
        return [
            Mode("Top-1 cf 1.0", 1, 1.0, quality=("Top-1", "1")),
            Mode("Top-1 cf 0.5", 1, 0.5, quality=("Top-1", "0.5")),
            Mode("Top-1 cf 0.5 + IR", 1, 0.5, ir=True, quality=("Top-1+IR", "0.5"),
                 rates_from=("Top-1", "0.5")),
            Mode("Top-1 cf 1.0 + FR+IR", 1, 1.0, ir=True, fr=True, quality=("Top-1+FR+IR", "1")),
            Mode("Top-1 dropless", 1, None, quality=("Top-1", "dropless"),
                 rates_from=("Top-1", "1")),
            Mode("Top-2 cf 1.0", 2, 1.0, quality=("Top-2", "1")),
            Mode("Top-2 cf 1.0 + FR+IR", 2, 1.0, ir=True, fr=True, quality=("Top-2+FR+IR", "1")),
        ]  # fmt: skip
    k = topk
    return [
        Mode(f"Top-{k} cf 1.0", k, 1.0, rates_from=("Top-1", "1")),
        Mode(f"Top-{k} cf 0.5", k, 0.5, rates_from=("Top-1", "0.5")),
        Mode(f"Top-{k} cf 0.5 + IR", k, 0.5, ir=True, rates_from=("Top-1", "0.5")),
        Mode(f"Top-{k} cf 1.0 + FR+IR", k, 1.0, ir=True, fr=True, rates_from=("Top-1+FR+IR", "1")),
        Mode(f"Top-{k} dropless", k, None, rates_from=("Top-1", "1")),
    ]
