"""``scripts/gpu_check.sh`` without a GPU: the plan fits the lent device's minutes, every command
it will run parses against its own CLI, and the budget logic skips and bounds steps while still
writing the report (``GPU_CHECK_FAKE=1`` turns every step into a ``sleep``).

Why it matters: a GPU is lent for 15 minutes per session, start-up included; a command that dies
on an argument error, a plan that overruns, or a run cut short with no report wastes them.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # benchmarks/ is not installed
    sys.path.insert(0, str(REPO))

SCRIPT = REPO / "scripts" / "gpu_check.sh"
STEPS = ("tests", "bench", "train_none", "train_irfr")
#: Device minutes a full run may use: 15 per session, 1-2 of them start-up, room for a rerun.
MAX_PLAN_MINUTES = 8.0


def _script(*args: str, cwd: Path = REPO, **env: str) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("GPU_CHECK_")}
    full_env.pop("OUT", None)
    full_env.update(PYTHON="python3", **env)
    return subprocess.run(
        ["bash", str(cwd / "scripts" / "gpu_check.sh"), *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _plan(*args: str, **env: str) -> str:
    result = _script("--dry-run", *args, **env)
    assert result.returncode == 0, result.stderr
    return result.stdout


def _commands(plan: str) -> dict[str, list[str]]:
    """Each step's command, as words, from the plan."""
    commands, step = {}, None
    for line in plan.splitlines():
        if match := re.match(r"step (\w+): ", line):
            step = match.group(1)
        elif line.startswith("  $ "):
            commands[step] = shlex.split(line[4:])
    return commands


def test_the_script_is_valid_bash() -> None:
    assert subprocess.run(["bash", "-n", str(SCRIPT)], check=False).returncode == 0


def test_plan_fits_the_device_minutes_and_lists_every_step() -> None:
    plan = _plan()
    estimates = {m[0]: float(m[1]) for m in re.findall(r"^step (\w+): ([\d.]+) min", plan, re.M)}
    assert list(estimates) == ["setup", *STEPS]
    total = float(re.search(r"^total estimate: ([\d.]+) min", plan, re.M).group(1))
    assert total == pytest.approx(sum(estimates.values()), abs=0.15)
    assert total <= MAX_PLAN_MINUTES
    assert set(_commands(plan)) == set(STEPS)
    assert "GPU(s), EP = 1, Transformer Engine: no" in plan
    # GPU_CHECK_DRY_RUN=1 is the same as --dry-run
    result = _script(GPU_CHECK_DRY_RUN="1")
    assert result.returncode == 0 and result.stdout == plan


def test_plan_with_only_lists_the_chosen_steps() -> None:
    plan = _plan("--only", "bench,train_irfr")
    assert set(_commands(plan)) == {"bench", "train_irfr"}
    total = float(re.search(r"^total estimate: ([\d.]+) min", plan, re.M).group(1))
    assert total < 4


def test_bench_command_runs_the_h200_preset_on_one_gpu() -> None:
    from benchmarks.perf import run, sweeps

    words = _commands(_plan())["bench"]
    assert words[0] == "python3"
    assert words[1:7] == [
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "1",
        "-m",
    ]
    assert words[7] == "benchmarks.perf"
    args = run.parse_args(words[8:])
    assert args.preset == "h200" and args.bf16 and not args.te
    assert args.parts == ["router", "layer", "syncs"]
    assert args.out == Path("gpu_check_out/perf")
    layer = sweeps.layer_sweep("h200", world=1)
    assert all(case.ep == 1 and sweeps.fits(case, 1) for case in layer.cases)
    assert {(c.hidden, c.ffn, c.experts) for c in layer.cases} == {(4096, 14336, 8)}
    assert {c.topk for c in layer.cases} == {1, 2}
    assert {c.capacity_factor for c in layer.cases} == {0.5, 1.0}
    assert {c.tokens for c in layer.cases} == {8192, 16384}
    assert any(c.vanilla_dropless for c in layer.cases)


def test_bench_command_with_te_and_more_gpus() -> None:
    from benchmarks.perf import run

    words = _commands(_plan(GPU_CHECK_NGPU="4", GPU_CHECK_TE="1"))["bench"]
    assert words[5] == "4"
    assert run.parse_args(words[8:]).te


def test_tests_command_runs_the_gpu_tier() -> None:
    words = _commands(_plan())["tests"]
    assert words[1:3] == ["-m", "pytest"] and words[3] == "tests/gpu"
    assert (REPO / "tests" / "gpu" / "test_gpu_host_syncs.py").exists()


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")
@pytest.mark.parametrize("step", ["train_none", "train_irfr"])
def test_training_commands_pass_the_scripts_own_checks(
    step: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pretrain_gpt_rectify.py's parse + rectify checks + megatron's validation, in process
    (megatron's global state left alone), on the exact flags of the plan."""
    import megatron.training.global_vars as megatron_globals

    from megatron.rectify.training import parse_and_validate_args

    words = _commands(_plan())[step]
    assert words[1:6] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1"]
    argv = words[words.index("pretrain_gpt_rectify.py") :]
    monkeypatch.setattr(megatron_globals, "set_global_variables", lambda *a, **k: None)
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    args = parse_and_validate_args(training_data=True)
    assert args.moe_rectify == ("none" if step == "train_none" else "ir+fr")
    assert (args.num_experts, args.moe_router_topk, args.expert_model_parallel_size) == (8, 1, 1)
    assert args.bf16 and args.train_iters == 60 and args.transformer_impl == "local"
    assert not args.gradient_accumulation_fusion  # needs apex / TE kernels the image lacks
    assert args.global_batch_size * args.seq_length == 16384
    # ~0.5 B parameters: 8 x (attention 4 h^2 + experts E x 2 h F)
    params = args.num_layers * (
        4 * args.hidden_size**2 + args.num_experts * 2 * args.hidden_size * args.ffn_hidden_size
    )
    assert 0.45e9 < params < 0.65e9


def test_plan_lists_the_wheels_and_the_carried_total(tmp_path: Path) -> None:
    """In a copy of the script with a 3 MiB stand-in wheel (no git repository there, so the
    repository counts 0): the wheel, its size and the total against 64 MiB."""
    (tmp_path / "scripts").mkdir()
    shutil.copy(SCRIPT, tmp_path / "scripts" / "gpu_check.sh")
    missing = _script("--dry-run", cwd=tmp_path).stdout
    assert "none in .whl/: run `bash scripts/fetch_gpu_wheels.sh`" in missing
    (tmp_path / ".whl").mkdir()
    (tmp_path / ".whl" / "megatron_core-0.19.2-cp312-cp312-x.whl").write_bytes(b"0" * 3 * 2**20)
    plan = _script("--dry-run", cwd=tmp_path).stdout
    assert "megatron-core 0.19.2, cp312" in plan
    assert ".whl/megatron_core-0.19.2-cp312-cp312-x.whl  3.0 MiB" in plan
    assert "wheels 3.0 MiB + repository (tracked + untracked) 0.0 MiB = 3.0 MiB carried" in plan


def test_fetch_script_targets_python_312_and_the_ignored_folder() -> None:
    text = (REPO / "scripts" / "fetch_gpu_wheels.sh").read_text()
    assert "megatron-core==0.19.2" in text and "--python-version 3.12" in text
    assert "--dest .whl" in text
    for path in (".whl/x.whl", "gpu_check_out/gpu_check.md"):  # never committed by accident
        ignored = subprocess.run(["git", "check-ignore", "-q", path], cwd=REPO, check=False)
        assert ignored.returncode == 0, path


def _report(out: Path) -> dict[str, str]:
    """Step -> status from the report's step table."""
    text = (out / "gpu_check.md").read_text()
    rows = re.findall(r"^\| (\w+) \| [^|]+ \| \d+ s \| ([^|]+) \|", text, re.M)
    return {step: status.strip() for step, status in rows}


def test_fake_run_within_budget_writes_the_whole_report(tmp_path: Path) -> None:
    result = _script("--budget-s", "60", "--out", str(tmp_path), GPU_CHECK_FAKE="1")
    assert result.returncode == 0, result.stderr
    assert _report(tmp_path) == dict.fromkeys(STEPS, "ok")
    text = (tmp_path / "gpu_check.md").read_text()
    for field in ("- Device: ", "- Date: ", "- Command: `bash scripts/gpu_check.sh --budget-s 60"):
        assert field in text
    assert "## 3. Training: 60 iterations" in text
    assert not list(tmp_path.glob("*.tmp"))


def test_spent_budget_bounds_the_step_in_flight_and_skips_the_rest(tmp_path: Path) -> None:
    start = time.monotonic()
    result = _script(
        "--budget-s", "3", str(tmp_path), GPU_CHECK_FAKE="1", GPU_CHECK_FAKE_SLEEP="20"
    )
    assert time.monotonic() - start < 15  # the 20 s step was killed at the budget
    assert result.returncode == 1  # a step timed out
    statuses = _report(tmp_path)
    assert re.fullmatch(r"timed out after [1-3] s", statuses["tests"]), statuses
    for step in STEPS[1:]:
        assert statuses[step].startswith("skipped: budget (needs ~1 s, "), statuses


def test_only_and_an_empty_budget_skip_cleanly(tmp_path: Path) -> None:
    result = _script("--budget-s", "0", "--only", "bench", str(tmp_path), GPU_CHECK_FAKE="1")
    assert result.returncode == 3  # nothing failed, something was skipped
    statuses = _report(tmp_path)
    assert statuses["bench"] == "skipped: budget (needs ~1 s, 0 s left)"
    assert all(statuses[s] == "not selected (--only bench)" for s in STEPS if s != "bench")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--only", "train"],
            "--only: unknown step 'train' (steps: tests bench train_none train_irfr)",
        ),
        (["--budget-s", "5m"], "--budget-s takes whole seconds, got '5m'"),
        (["--fast"], "unknown option --fast (see --help)"),
    ],
)
def test_bad_options_are_refused_in_one_line(args: list[str], message: str) -> None:
    result = _script(*args, "--dry-run")
    assert result.returncode == 2
    assert result.stderr.strip() == f"gpu_check.sh: error: {message}"
