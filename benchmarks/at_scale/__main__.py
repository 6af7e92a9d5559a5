"""``python -m benchmarks.at_scale``: calibrate this machine, validate, predict, write the report.

Steps: (1) re-time three cases of the CPU layer benchmark now (``--no-remeasure`` skips it),
(2) calibrate this machine (GEMM rate, copy bandwidth, gloo all-to-all; < 1 minute), (3) check
the model against ``perf_layer.json`` and the re-timed cases, (4) price every layout and mode
on the H100 cluster, (5) write ``at-scale.json``, ``at-scale.md`` and ``at-scale.png`` into
``--out``. ``--report-only`` rebuilds the markdown and the plot from the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.at_scale import calibrate, validate
from benchmarks.at_scale.cluster import h100
from benchmarks.at_scale.inputs import RESULTS, read_json, read_quality, sync_counts
from benchmarks.at_scale.models import LAYOUTS, Layout
from benchmarks.at_scale.predict import predict_all
from benchmarks.at_scale.routing_load import fit_cv

JSON_NAME, REPORT_NAME, PLOT_NAME = "at-scale.json", "at-scale.md", "at-scale.png"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.at_scale", description=__doc__)
    parser.add_argument("--out", type=Path, default=RESULTS, help="output folder (docs/results)")
    parser.add_argument(
        "--results",
        type=Path,
        default=RESULTS,
        help="where the perf_*.json and quality*.md inputs are (docs/results)",
    )
    parser.add_argument(
        "--efficiency",
        type=float,
        default=0.5,
        help="GPU compute efficiency, fraction of peak (nominal 0.5)",
    )
    parser.add_argument(
        "--no-remeasure",
        action="store_true",
        help="skip re-timing three layer-benchmark cases on this machine",
    )
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="rebuild at-scale.md and at-scale.png from at-scale.json",
    )
    args = parser.parse_args(argv)  # fmt: skip
    if not 0 < args.efficiency <= 1:
        parser.error(f"--efficiency {args.efficiency}: must be in (0, 1]")
    return args


def layout_json(layout: Layout) -> dict[str, Any]:
    m = layout.model
    return {
        "name": layout.name, "model": m.name, "hidden": m.hidden, "ffn": m.ffn,
        "experts": m.experts, "layers": m.layers, "heads": m.heads, "kv_heads": m.kv_heads,
        "vocab": m.vocab, "seq": m.seq, "gated": m.gated, "nodes": layout.nodes, "ep": layout.ep,
        "ep_per_node": layout.ep_per_node, "topk": layout.topk, "tokens": layout.tokens,
        "note": layout.note,
    }  # fmt: skip


def collect(args: argparse.Namespace, command: str) -> dict[str, Any]:
    """Everything the report shows, measured and predicted."""
    from benchmarks.perf.common import machine_info

    start = time.perf_counter()
    perf_layer = read_json(args.results / "perf_layer.json")
    perf_router = read_json(args.results / "perf_router.json")
    syncs = sync_counts(read_json(args.results / "perf_syncs.json"))
    quality = read_quality(args.results / "quality.md")
    upcycle = read_quality(args.results / "quality_upcycle.md")

    load_before = os.getloadavg()[0]
    remeasured = None if args.no_remeasure else validate.remeasure()
    load_after = os.getloadavg()[0]
    cal = calibrate.run()
    validation = {
        "perf_layer": {
            **validate.validate(perf_layer["rows"], cal, perf_router),
            "machine": perf_layer["machine"],
            "load_before": perf_layer.get("load_average_before"),
            "command": perf_layer.get("command"),
        }
    }
    if remeasured is not None:
        validation["remeasured"] = {
            **validate.validate(remeasured, cal, perf_router),
            "load_before": load_before,
            "load_after": load_after,
        }

    base = next(r for r in perf_layer["rows"] if validate.is_row(r, validate.CALIBRATION_ROW))
    balanced_cv = fit_cv(
        base["dropped_pct"] / 100, base["experts"], base["ep"], base["tokens"], base["topk"],
        base["capacity_factor"],
    )  # fmt: skip
    predictions = predict_all(
        LAYOUTS,
        lambda layout: h100(layout.nodes, args.efficiency),
        quality,
        upcycle,
        balanced_cv,
        perf_router,
        syncs,
    )
    return {
        "command": command,
        "machine": machine_info(),
        "cluster": [list(row) for row in h100(1, args.efficiency).describe()],
        "efficiency": args.efficiency,
        "calibration": cal.as_json(),
        "validation": validation,
        "balanced_cv": balanced_cv,
        "balanced_source": (
            f"perf_layer.json base case: {base['dropped_pct']:.2f} % dropped at capacity 1.0 "
            f"(E {base['experts']}, EP {base['ep']}, T {base['tokens']}, random router)"
        ),
        "quality": {
            "scratch": {
                "source": quality.source,
                "experts": quality.experts,
                "ep": quality.ep,
                "tokens_per_call": quality.tokens_per_call,
                "seeds": quality.seeds,
            },
            "upcycle": {"source": upcycle.source, "seeds": upcycle.seeds},
        },  # fmt: skip
        "syncs": {
            "padded": syncs.padded,
            "padded_rectified": syncs.padded_rectified,
            "dropless": syncs.dropless,
            "source": syncs.source,
        },  # fmt: skip
        "layouts": [layout_json(layout) for layout in LAYOUTS],
        "predictions": predictions,
        "wall_s": time.perf_counter() - start,
    }


def main(argv: list[str] | None = None) -> None:
    from benchmarks.at_scale import plots, report
    from megatron.rectify.atomic import write_text_atomically

    args = parse_args(argv)
    json_path = args.out / JSON_NAME
    if args.report_only:
        data = read_json(json_path)
    else:
        command = "python -m benchmarks.at_scale " + shlex.join(
            sys.argv[1:] if argv is None else argv
        )
        data = collect(args, command.strip())
        args.out.mkdir(parents=True, exist_ok=True)
        write_text_atomically(json_path, json.dumps(data, indent=1) + "\n")
    plots.loss_vs_throughput(data, args.out / PLOT_NAME)
    write_text_atomically(args.out / REPORT_NAME, report.render(data, PLOT_NAME) + "\n")
    print(f"wrote {args.out / REPORT_NAME} (command wall time {data['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
