"""Smoke tests of the cost benchmarks (``benchmarks/perf``), fast enough for every test run.

The expensive parts are not timed here; what can silently go wrong is checked instead:
the EP all-to-all byte accounting against closed-form counts on a real 2-process run, the timing
parts end to end on tiny cases, the report from synthetic results, the sweeps, and the GPU
script's benchmark command against the driver's command line.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # benchmarks/ is not installed; rank processes import it too
    sys.path.insert(0, str(REPO))

from benchmarks.perf import a2a_bytes, report, run, sweeps, tables  # noqa: E402
from benchmarks.perf.sweeps import IterationCase, LayerCase  # noqa: E402

# EP=2, 4 experts (2 per rank), top-1, 64 tokens per rank, capacity factor 1: this seed drops
# tokens AND leaves padding slots, so IR, FR and the re-dispatch baseline all have work.
CASE = LayerCase(ep=2, tokens=64, hidden=16, experts=4, topk=1, capacity_factor=1.0)
FP32 = 4


@pytest.fixture(scope="module")
def byte_rows() -> list[dict]:
    return a2a_bytes.run_layer([CASE, dataclasses.replace(CASE, pad=False)])


def _padded_vanilla_bytes_per_rank(case: LayerCase) -> int:
    """Closed form: with padding each rank sends capacity rows per expert of the other rank:
    tokens (H) + gate weight (1) in the dispatch, outputs (H) in the combine; x2 backward."""
    capacity = math.ceil(case.topk * case.capacity_factor * case.tokens / case.experts)
    rows_to_others = (case.ep - 1) * (case.experts // case.ep) * capacity
    return 2 * rows_to_others * (2 * case.hidden + 1) * FP32


@pytest.mark.multiprocess
def test_rectified_modes_send_exactly_the_vanilla_bytes(byte_rows: list[dict]) -> None:
    modes = byte_rows[0]["modes"]
    expected = _padded_vanilla_bytes_per_rank(CASE)
    assert modes["none"]["payload_per_rank"] == [expected, expected]
    for mode in ("ir", "fr", "ir+fr"):
        assert modes[mode]["payload_per_rank"] == modes["none"]["payload_per_rank"], mode
    assert modes["ir+fr"]["dropped"] > 0 and modes["ir+fr"]["rectified"] > 0
    assert modes["ir+fr"]["filled_in"] > 0  # FR used padding slots, and still no extra byte


@pytest.mark.multiprocess
def test_redispatch_baseline_pays_for_every_remote_token(byte_rows: list[dict]) -> None:
    for row in byte_rows:
        modes = row["modes"]
        baseline = modes["redispatch"]
        remote = baseline["redispatched_remote"]
        assert baseline["redispatched_tokens"] == modes["ir"]["rectified"] > 0
        assert remote > 0 and baseline["payload_bytes"] > modes["none"]["payload_bytes"]
        # round 2 = token (H) + weight (1) out, output (H) back; x2 backward; counts = metadata
        extra = baseline["payload_bytes"] - modes["none"]["payload_bytes"]
        assert extra == 2 * remote * (2 * CASE.hidden + 1) * FP32
        assert baseline["metadata_bytes"] == CASE.ep * (CASE.experts // CASE.ep) * 8


@pytest.mark.multiprocess
def test_without_padding_ir_still_sends_the_vanilla_bytes(byte_rows: list[dict]) -> None:
    modes = byte_rows[1]["modes"]
    assert modes["ir"]["payload_per_rank"] == modes["none"]["payload_per_rank"]
    assert modes["fr"]["payload_bytes"] >= modes["none"]["payload_bytes"]


def test_the_check_rejects_extra_rectified_bytes() -> None:
    row = {"pad": True, "modes": {m: {"payload_per_rank": [10, 10]} for m in a2a_bytes.MODES}}
    a2a_bytes.check(row)
    row["modes"]["ir+fr"]["payload_per_rank"] = [10, 11]
    with pytest.raises(a2a_bytes.ByteAccountingError, match="ir\\+fr"):
        a2a_bytes.check(row)


@pytest.mark.multiprocess
def test_timed_parts_return_interleaved_ratios() -> None:
    from benchmarks.perf import iteration, layer

    layer_case = LayerCase(ep=2, tokens=64, hidden=16, experts=4, topk=1, capacity_factor=1.0)
    iteration_case = IterationCase(1, 1, 32, 4, 1, 1.0, seq_length=16, micro_batch=2)
    rows = layer.run([layer_case], repeats=2, warmup=0)
    rows += iteration.run([iteration_case], repeats=2, warmup=0)
    for row in rows:
        assert row["repeats"] == 2 and row["vanilla_ms"] > 0 and row["rectified_ms"] > 0
        assert 0 < row["ratio_q1"] <= row["ratio"] <= row["ratio_q3"]  # per-repeat ratios
        assert row["rectified_pct"] >= 0


def _fake_result(part: str, sweep: sweeps.Sweep, ratio: float) -> dict:
    rows = []
    for i, case in enumerate(sweep.cases):
        value = ratio + 0.01 * i
        rows.append(
            {
                **dataclasses.asdict(case),
                "vanilla_ms": 10.0,
                "rectified_ms": 10.0 * value,
                "ratio": value,
                "ratio_q1": value - 0.02,
                "ratio_q3": value + 0.02,
                "repeats": 5,
                "vanilla_tokens_per_s": 1000.0,
                "rectified_tokens_per_s": 1000.0 / value,
                "dropped_pct": 3.0,
                "filled_in_pct": 3.0,
                "rectified_pct": 3.0,
            }
        )
    return _document(part, sweep, rows)


def _document(part: str, sweep: sweeps.Sweep, rows: object) -> dict:
    machine = {
        "date": "2026-01-01 00:00 UTC",
        "cpu": "test cpu",
        "logical_cpus": 2,
        "torch": "x",
        "megatron_core": "y",
        "device": "cpu (gloo)",
    }
    return {
        "part": part,
        "command": f"python -m benchmarks.perf --parts {part}",
        "machine": machine,
        "wall_s": 1.0,
        "repeats": 5,
        "warmup": 1,
        "sweep": sweep.as_json(),
        "rows": rows,
    }


def _fake_bytes_row(pad: bool) -> dict:
    modes = {
        mode: {"payload_bytes": 100, "metadata_bytes": 0, "payload_per_rank": [50, 50]}
        for mode in a2a_bytes.MODES
    }
    for mode in ("ir", "fr", "ir+fr"):
        modes[mode].update(dropped=3, rectified=3 if "ir" in mode else 0, filled_in=2)
    modes["redispatch"].update(
        payload_bytes=130, metadata_bytes=32, redispatched_tokens=3, redispatched_remote=2
    )
    return {**dataclasses.asdict(CASE), "pad": pad, "ranks": 2, "modes": modes}


def test_report_renders_tables_headline_and_plots(tmp_path: Path) -> None:
    import json

    byte_rows = [_fake_bytes_row(True), _fake_bytes_row(False)]

    results = {
        "router": _fake_result("router", sweeps.router_sweep("default"), 1.1),
        "layer": _fake_result("layer", sweeps.layer_sweep("default"), 1.12),
        "iteration": _fake_result("iteration", sweeps.iteration_sweep("default"), 1.05),
        "bytes": _document(
            "bytes", sweeps.bytes_sweep("quick"), {"layer": byte_rows, "iteration": byte_rows[0]}
        ),
    }
    for part, result in results.items():
        (tmp_path / f"perf_{part}.json").write_text(json.dumps(result))
    written = report.write_report(tmp_path)
    names = {path.name for path in written}
    assert {
        "perf.md",
        "perf_ratio_vs_hidden.png",
        "perf_ratio_by_axis.png",
        "perf_bytes.png",
    } <= names
    text = (tmp_path / "perf.md").read_text()
    assert "rectified / vanilla = **1.12**" in text  # the layer's base case
    assert "**met** at the base case" in text
    assert "extra **0**, asserted 0" in text
    assert "python -m benchmarks.perf --parts layer" in text and "2026-01-01" in text
    assert all((tmp_path / name).stat().st_size > 1000 for name in names if name.endswith(".png"))


@pytest.mark.parametrize("preset", sweeps.PRESETS)
def test_every_preset_sweeps_runnable_cases(preset: str) -> None:
    for make in (sweeps.router_sweep, sweeps.layer_sweep, sweeps.iteration_sweep):
        sweep = make(preset)
        assert sweep.cases[0] == sweep.base and len(set(sweep.cases)) == len(sweep.cases)
        assert all(sweeps.fits(case, None) for case in sweep.cases)
        for axis, values in sweep.axes.items():
            result = {
                "sweep": sweep.as_json(),
                "rows": [dataclasses.asdict(c) for c in sweep.cases],
            }
            found = [row[axis] for row in tables.axis_rows(result, axis)]
            assert sorted(set(values) | {getattr(sweep.base, axis)}) == found


def test_gpu_check_runs_the_driver_with_valid_arguments() -> None:
    script = REPO / "scripts" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)], check=False).returncode == 0
    env = {**os.environ, "GPU_CHECK_DRY_RUN": "1", "GPU_CHECK_NGPU": "4", "GPU_CHECK_TE": "1"}
    out = subprocess.run(
        ["bash", str(script), "out"], cwd=REPO, env=env, capture_output=True, text=True, check=True
    ).stdout
    words = shlex.split(out.strip())
    assert words[1:6] == ["-m", "torch.distributed.run", "--nproc-per-node", "4", "-m"]
    assert words[6] == "benchmarks.perf"
    args = run.parse_args(words[7:])
    assert args.preset == "gpu" and args.bf16 and args.te and args.out == Path("out/perf")
