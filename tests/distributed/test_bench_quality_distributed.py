"""The quality benchmark (benchmarks/quality) end to end on tiny runs (gloo ranks). The log
parser, statistics, plan and report checks are in tests/unit/test_bench_quality.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def _orphaned_python_helpers() -> set[int]:
    """PIDs of multiprocessing helpers whose parent is gone (re-parented to init)."""
    found = set()
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (proc / "cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            continue
        if ppid == 1 and b"multiprocessing" in cmdline:
            found.add(int(proc.name))
    return found


@pytest.mark.slow
@pytest.mark.multiprocess
def test_quick_run_trains_parses_evaluates_rectified_and_caches(tmp_path: Path) -> None:
    """One tiny vanilla Top-1 run (2 gloo ranks) with inference-only IR+FR, then the same
    command again: the second invocation must reuse the run without training."""
    command = [
        sys.executable,
        "-m",
        "benchmarks.quality",
        "--quick",
        "--experiments",
        "grid,inference",
        "--variants",
        "Top-1",
        "--capacities",
        "1.0",
        "--out",
        str(tmp_path / "runs"),
        "--report-dir",
        str(tmp_path / "report"),
    ]
    first = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    (result,) = (tmp_path / "runs").glob("top-1_cf1_lb_s1_*/result.json")
    record = json.loads(result.read_text())
    assert set(record["heldout"]) == {"as trained", "ir", "fr", "ir+fr"}
    assert all(0 < mode["loss"] < 10 for mode in record["heldout"].values())
    vanilla = record["eval_routing"]["as trained"]["mean"]
    rectified = record["eval_routing"]["ir+fr"]["mean"]
    # 256 tokens per rank, 4 experts, capacity 1.0: every dropped token leaves one slot empty
    assert vanilla["dropped_pct"] > 0
    assert vanilla["padded_pct"] == pytest.approx(vanilla["dropped_pct"], abs=0.01)
    assert vanilla["lost_pct"] == pytest.approx(vanilla["dropped_pct"], abs=0.01)
    assert rectified["lost_pct"] == 0 and rectified["filled_in_pct"] > 0
    assert record["train_routing"]["mean"]["dropped_pct"] > 0  # vanilla runs are counted too
    # one rank's summary (data-parallel rank 0), not one per rank with the last one parsed
    log = result.with_name("train.log").read_text()
    assert log.count("quality eval routing summary") == 1
    assert len(record["curve"]) >= 2
    assert (tmp_path / "report" / "quality.md").exists()

    started = time.time()
    second = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "cached" in second.stdout and "importing torch" not in second.stdout
    assert time.time() - started < 30
    assert json.loads(result.read_text())["finished"] == record["finished"]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_quick_upcycle_run_starts_from_the_dense_model_and_leaves_no_processes(
    tmp_path: Path,
) -> None:
    """The paper's recipe, tiny: a dense run saves a checkpoint, the upcycled run loads it.
    Saving starts megatron's checkpoint-writer helper processes; the forked ranks end with
    os._exit, so the launcher must remove them (they used to pile up, ~300 MB per process,
    until a 63-run sweep ran out of memory)."""
    orphans_before = _orphaned_python_helpers()
    command = [
        *(sys.executable, "-m", "benchmarks.quality", "--quick", "--recipe", "upcycle"),
        *("--experiments", "grid", "--variants", "Top-1"),
        *("--out", str(tmp_path / "runs"), "--report-dir", str(tmp_path / "report")),
    ]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert _orphaned_python_helpers() <= orphans_before
    (dense,) = (tmp_path / "runs").glob("dense_upcycle_s1_*")
    assert (dense / "checkpoint" / "latest_checkpointed_iteration.txt").exists()
    (upcycled,) = (tmp_path / "runs").glob("top-1_cf1_lb_upcycle_s1_*")
    record = json.loads((upcycled / "result.json").read_text())
    assert f"--load {dense}/checkpoint" in record["command"]
    assert "--moe-use-upcycling" in record["command"]
    assert 0 < record["heldout"]["as trained"]["loss"] < 10
    assert (tmp_path / "report" / "quality_upcycle.md").exists()
