"""Smoke tests of the cost benchmarks (``benchmarks/perf``), single process.

The expensive parts are not timed here; what can silently go wrong is checked instead: the byte
check, the report from synthetic results (also the one-H200 preset's, and without matplotlib), the
sweeps. The GPU script's commands are checked in tests/unit/test_gpu_check_plan.py. The byte
accounting on a real 2-process run and the timing parts end to end are in
tests/distributed/test_bench_perf_distributed.py.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # benchmarks/ is not installed; rank processes import it too
    sys.path.insert(0, str(REPO))

from benchmarks.perf import a2a_bytes, report, sweeps, tables  # noqa: E402
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


def test_h200_layer_report_shows_the_real_ffn_and_the_dropless_reference(tmp_path: Path) -> None:
    """The one-H200 sweep (scripts/gpu_check.sh): FFN 14336 is not 4 x hidden, and the dropless
    row says that its vanilla layer had no capacity; GPU columns (TFLOP/s, memory) present."""
    import json

    result = _fake_result("layer", sweeps.layer_sweep("h200", world=1), 1.1)
    result["machine"]["device"] = "NVIDIA H200 x1 (NCCL)"
    for row in result["rows"]:
        row.update(vanilla_tflops=300.0, rectified_tflops=270.0)
        row.update(vanilla_peak_gib=9.5, rectified_peak_gib=9.9)
    (tmp_path / "perf_layer.json").write_text(json.dumps(result))
    report.write_report(tmp_path)
    table = [line for line in (tmp_path / "perf.md").read_text().splitlines() if line[:1] == "|"]
    header, rows = table[0], table[2:]
    assert "vanilla routing" in header and "vanilla TFLOP/s/GPU" in header
    assert len(rows) == len(result["rows"]) == 5
    assert all("| 14,336 |" in row for row in rows)
    assert sum("| dropless |" in row for row in rows) == 1
    assert "vanilla_dropless" in next(row for row in rows if "| dropless |" in row)


def test_report_without_matplotlib_has_tables_and_no_plots(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lent GPU machine's image has no matplotlib: the report must still be written."""
    import json

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    result = _fake_result("router", sweeps.router_sweep("h200"), 1.05)
    (tmp_path / "perf_router.json").write_text(json.dumps(result))
    written = report.write_report(tmp_path)
    assert [path.name for path in written] == ["perf.md"]
    text = (tmp_path / "perf.md").read_text()
    assert "rectified / vanilla = **1.05**" in text and "![" not in text


def test_dropless_vanilla_layer_has_no_capacity_but_the_rectified_one_has() -> None:
    from benchmarks.perf import layer

    case = sweeps.LayerCase(
        ep=1, tokens=64, hidden=16, experts=4, topk=1, capacity_factor=0.5, vanilla_dropless=True
    )
    vanilla, rectified = layer.layer_config(case, "none"), layer.layer_config(case, "ir+fr")
    assert vanilla.moe_expert_capacity_factor is None
    assert not vanilla.moe_pad_expert_input_to_capacity
    assert rectified.moe_expert_capacity_factor == 0.5
    assert rectified.moe_pad_expert_input_to_capacity
    plain = layer.layer_config(dataclasses.replace(case, vanilla_dropless=False), "none")
    assert plain.moe_expert_capacity_factor == 0.5
