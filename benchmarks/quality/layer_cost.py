"""The measured cost of the quality model's MoE layer, Top-1 vs Top-2, vanilla vs FR+IR.

``python -m benchmarks.quality.layer_cost`` times one MoE layer forward + backward with the
cost benchmark's machinery (``benchmarks.perf.layer``: the same weights for both routings of a
case, vanilla and rectified calls interleaved so that both see the same machine drift) at the
quality study's CPU sizes: hidden 128, 8 experts on EP 2, 8 x 128 = 1,024 tokens per rank and
micro-batch, capacity factor 1.0 with padding, SwiGLU experts of ffn 320 (the quality model's
``--swiglu`` without ``--ffn-hidden-size``: megatron takes 2/3 of 4 x hidden, rounded down to
a multiple of 64). Two cases, Top-1 and Top-2, give four layers: Top-1, Top-1+FR+IR
(the case's rectified call), Top-2 and Top-2+FR+IR. The compute-matched question of the paper,
"Top-1+FR+IR near Top-2 quality at Top-1 cost", needs Top-1+FR+IR's and Top-2's time side by
side: they come from different cases (timed one after the other, not interleaved), so the
cases are measured ``--rounds`` times alternately and each round is reported.

Writes ``docs/results/quality_layer_cost.json`` (rows of ``benchmarks.perf.layer``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.perf.sweeps import LayerCase

REPO = Path(__file__).resolve().parents[2]
DEFAULT_OUT = REPO / "docs" / "results" / "quality_layer_cost.json"


def quality_cases(tokens: int = 1024, hidden: int = 128, experts: int = 8) -> list[LayerCase]:
    """Top-1 and Top-2 at the quality study's sizes (``plan.Settings`` defaults, EP 2)."""
    return [
        LayerCase(
            ep=2,
            tokens=tokens,
            hidden=hidden,
            experts=experts,
            topk=k,
            capacity_factor=1.0,
            ffn_size=int(4 * hidden * 2 / 3 / 64) * 64,  # megatron's SwiGLU default
        )
        for k in (1, 2)
    ]


def measure_swiglu(case: LayerCase, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """``benchmarks.perf.layer.measure`` with SwiGLU experts (the quality model's
    ``--swiglu``: a gated first GEMM of twice the width), the perf benchmark's GeLU otherwise.
    Module-level: it runs in the spawned ranks."""
    from benchmarks.perf import layer

    original = layer.layer_config

    def gated(*config_args: Any, **config_kwargs: Any):
        config = original(*config_args, **config_kwargs)
        config.gated_linear_unit = True
        config.activation_func = torch.nn.functional.silu
        return config

    layer.layer_config = gated
    try:
        return layer.measure(case, *args, **kwargs)
    finally:
        layer.layer_config = original


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.quality.layer_cost")
    parser.add_argument("--rounds", type=int, default=2, help="alternate Top-1/Top-2 launches")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--budget", type=float, default=10.0, help="seconds of extra repeats")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)

    from benchmarks.perf.common import machine_info, run_per_ep

    started = time.time()
    rows = []
    for round_number in range(1, args.rounds + 1):
        for case in quality_cases():
            (row,) = run_per_ep(
                measure_swiglu,
                "layer",
                [case],
                repeats=args.repeats,
                warmup=args.warmup,
                budget_s=args.budget,
            )
            row["round"] = round_number
            row["experts_activation"] = "swiglu"
            rows.append(row)
            print(
                f"round {round_number} top-{case.topk}: vanilla {row['vanilla_ms']:.1f} ms, "
                f"FR+IR {row['rectified_ms']:.1f} ms (ratio {row['ratio']:.3f})",
                flush=True,
            )
    document = {
        "part": "layer (quality model sizes)",
        "command": " ".join(["python -m benchmarks.quality.layer_cost", *argv]),
        "machine": machine_info(),
        "wall_s": time.time() - started,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "budget_s": args.budget,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(document, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
