"""Smoke tests of the cost benchmarks (``benchmarks/perf``), single process.

The expensive parts are not timed here; what can silently go wrong is checked instead: the byte
check, the report from synthetic results, the sweeps, and the GPU script's benchmark command
against the driver's command line. The byte accounting on a real 2-process run and the timing
parts end to end are in tests/distributed/test_bench_perf_distributed.py.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # benchmarks/ is not installed; rank processes import it too
    sys.path.insert(0, str(REPO))

from benchmarks.perf import a2a_bytes, report, run, sweeps, tables  # noqa: E402
from benchmarks.perf.sweeps import LayerCase  # noqa: E402

CASE = LayerCase(ep=2, tokens=64, hidden=16, experts=4, topk=1, capacity_factor=1.0)


def test_the_check_rejects_extra_rectified_bytes() -> None:
    row = {"pad": True, "modes": {m: {"payload_per_rank": [10, 10]} for m in a2a_bytes.MODES}}
    a2a_bytes.check(row)
    row["modes"]["ir+fr"]["payload_per_rank"] = [10, 11]
    with pytest.raises(a2a_bytes.ByteAccountingError, match="ir\\+fr"):
        a2a_bytes.check(row)


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
