"""The quality benchmark (``benchmarks/quality``): plan, log parsing, statistics, report, and
one real tiny training run that goes through the whole pipeline and the cache.

The pure tests use synthetic logs and records (milliseconds). The end-to-end test launches
``python -m benchmarks.quality --quick`` in a subprocess (it forks gloo ranks and activates the
CPU emulation, neither of which may happen inside the pytest process).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from benchmarks.quality import logparse, plan, report, stats  # noqa: E402

LOG = """\
 [2026-11-23 01:00:00.1] iteration       10/      20 | consumed samples:          160 | \
elapsed time per iteration (ms): 205.9 | learning rate: 1.0E-03 | global batch size:    16 | \
lm loss: 5.289138E+00 | load_balancing_loss: 1.102491E+00 | rectify_dropped_pct: 18.5 | \
rectify_padded_pct: 3.25 | rectify_filled_in_pct: 15.25 | rectify_rectified_pct: 18.5 | \
rectify_max_over_mean_load: 1.9 | loss scale: 1.0 | grad norm: 2.975 |
 [2026-11-23 01:00:01.1] iteration       20/      20 | consumed samples:          320 | \
elapsed time per iteration (ms): 139.8 | learning rate: 2.0E-04 | global batch size:    16 | \
lm loss: 3.963957E+00 | load_balancing_loss: 1.106833E+00 | loss scale: 1.0 |
 validation loss at iteration 20 on validation set | lm loss value: 3.0E+00 | lm loss PPL: 20.1 |
 validation loss at iteration 20 on validation set [eval rectify ir+fr] | lm loss value: 2.5E+00 |
 validation loss at iteration 20 on test set | lm loss value: 2.000000E+00 | lm loss PPL: 7.4 |
 validation loss at iteration 20 on test set [eval rectify ir+fr] | lm loss value: 1.500000E+00 |
rectify routing summary (pipeline stage 0, this rank's tokens, all training iterations):
  MoE layer 1: dropped 10.00 % | padded 4.00 % | filled-in 6.00 % | rectified 10.00 %
  MoE layer 2: dropped 20.00 % | padded 8.00 % | filled-in 12.00 % | rectified 20.00 %
quality eval routing summary (this rank's tokens, all evaluation passes):
  eval [as trained] MoE layer 1: dropped 5.00 % | padded 5.00 % | filled-in 0.00 % | \
rectified 0.00 % | lost 5.00 %
  eval [ir+fr] MoE layer 1: dropped 5.00 % | padded 1.00 % | filled-in 4.00 % | \
rectified 5.00 % | lost 0.00 %
"""


def test_log_parser_reads_curve_heldout_and_both_routing_summaries() -> None:
    record = logparse.parse_log(LOG)
    assert [entry["iteration"] for entry in record["curve"]] == [10, 20]
    assert record["curve"][0]["lm_loss"] == pytest.approx(5.289138)
    assert record["curve"][0]["filled_in_pct"] == pytest.approx(15.25)
    assert "dropped_pct" not in record["curve"][1]
    # held-out = mean of validation and test, per evaluation mode
    assert record["heldout"]["as trained"]["loss"] == pytest.approx(2.5)
    assert record["heldout"]["ir+fr"]["loss"] == pytest.approx(2.0)
    assert record["train_routing"]["mean"]["dropped_pct"] == pytest.approx(15.0)
    assert record["train_routing"]["per_layer"]["2"]["padded_pct"] == pytest.approx(8.0)
    assert record["eval_routing"]["ir+fr"]["mean"]["filled_in_pct"] == pytest.approx(4.0)
    assert record["eval_routing"]["as trained"]["mean"]["lost_pct"] == pytest.approx(5.0)
    assert record["ms_per_iter"] == pytest.approx(139.8)  # first window excluded


def _record(variant: str, rectify: str, seed: int, loss: float, **spec: object) -> dict:
    full_spec = {
        "topk": 1,
        "rectify": rectify,
        "capacity": 1.0,
        "aux_loss": 0.01,
        "seed": seed,
        "recipe": "scratch",
        "eval_modes": [],
        "dense": False,
        "unit_gate": False,
        **spec,
    }
    return {
        "spec": full_spec,
        "variant": variant,
        "heldout": {"as trained": {"loss": loss}},
        "curve": [{"iteration": 10, "lm_loss": loss + 1}, {"iteration": 20, "lm_loss": loss}],
        "train_routing": {"mean": {"dropped_pct": 10.0, "padded_pct": 10.0}},
        "eval_routing": {},
        "wall_s": 30.0,
        "ms_per_iter": 150.0,
        "run_dir": f"/runs/{variant}_{seed}",
        "command": "python -m torch.distributed.run pretrain_observed.py --seed 1",
    }


def test_statistics_spread_and_paired_deltas() -> None:
    stat = stats.Stat.of([2.0, 2.2, 2.4])
    assert stat.mean == pytest.approx(2.2) and stat.std == pytest.approx(0.2)  # n - 1
    assert (stat.low, stat.high, stat.n) == (2.0, 2.4, 3)
    vanilla = [_record("Top-1", "none", s, loss) for s, loss in ((1, 2.7), (2, 2.6), (3, 2.8))]
    rectified = [_record("Top-1+FR+IR", "ir+fr", s, loss) for s, loss in ((1, 2.5), (3, 2.7))]
    delta = stats.paired_delta(rectified, vanilla)  # seed 2 has no partner: left out
    assert delta.n == 2 and delta.mean == pytest.approx(-0.15)


def test_target_check_needs_a_gap_above_twice_the_larger_spread() -> None:
    vanilla = [_record("Top-1", "none", s, loss) for s, loss in ((1, 2.70), (2, 2.72), (3, 2.68))]
    close = [_record("Top-1+FR+IR", "ir+fr", s, x) for s, x in ((1, 2.66), (2, 2.70), (3, 2.62))]
    far = [_record("Top-1+FR+IR", "ir+fr", s, x) for s, x in ((1, 2.50), (2, 2.52), (3, 2.48))]
    check = stats.target_check(stats.group_runs(vanilla + close), "scratch")
    assert check["gap"] == pytest.approx(0.04) and check["spread"] == pytest.approx(0.04)
    assert not check["holds"]
    assert stats.target_check(stats.group_runs(vanilla + far), "scratch")["holds"]
    assert not check["control"]["available"]  # the gate-1 control was not run

    # the same test against the gate-scaling control, which may fail where vanilla's holds
    control = [
        _record("Top-1 (gate 1)", "none", s, x, unit_gate=True)
        for s, x in ((1, 2.55), (2, 2.53), (3, 2.51))
    ]
    check = stats.target_check(stats.group_runs(vanilla + far + control), "scratch")
    assert check["holds"] and check["control"]["available"]
    assert check["control"]["gap"] == pytest.approx(0.03)
    assert check["control"]["paired"].mean == pytest.approx(-0.03)
    assert not check["control"]["holds"]
    text = "\n".join(report._target_lines(check))
    assert "gate-scaling control" in text and "does not hold" in text


def test_plan_deduplicates_shared_runs_and_marks_inference_runs() -> None:
    specs = plan.experiment_specs(plan.EXPERIMENTS, seeds=[1, 2])
    # grid 9, capacity 4 x 4 + dropless (cf 1.0's four are the grid's), lb 2
    assert len(specs) == len(set(specs)) == 2 * 24
    by_slug = {spec.slug: spec for spec in specs}
    assert by_slug["top-1_cf1_lb_s1"].eval_modes == ("ir", "fr", "ir+fr")
    assert by_slug["top-1_cf0.5_lb_s1"].eval_modes == ("ir+fr",)
    assert not by_slug["top-1-fr-ir_cf1_lb_s1"].eval_modes
    assert "top-1-ir_cfdropless_lb_s1" not in by_slug  # nothing to rectify without capacity
    upcycle = plan.experiment_specs(["grid"], [1], variants=["Top-1"], recipe="upcycle")
    assert [spec.dense for spec in upcycle] == [True, False]
    # one dense model for every seed: the seeds vary the fine-tuning, not the starting point
    upcycle = plan.experiment_specs(["grid"], [1, 2, 3], variants=["Top-1"], recipe="upcycle")
    assert [(spec.dense, spec.seed) for spec in upcycle] == [
        (True, plan.UPCYCLE_DENSE_SEED),
        (False, 1),
        (False, 2),
        (False, 3),
    ]


def test_cache_key_follows_every_setting_that_changes_a_result() -> None:
    spec = plan.RunSpec()
    key = plan.run_key(spec, plan.Settings())
    assert plan.run_key(spec, plan.Settings()) == key
    assert plan.run_key(spec, plan.Settings(train_iters=151)) != key
    assert plan.run_key(plan.RunSpec(seed=2), plan.Settings()) != key
    assert plan.run_key(spec, plan.Settings(extra_args=("--split", "90,5,5"))) != key
    # the dense model's length only matters to upcycled runs
    assert plan.run_key(spec, plan.Settings(dense_iters=7)) == key
    upcycled = plan.RunSpec(recipe="upcycle")
    assert plan.run_key(upcycled, plan.Settings(dense_iters=7)) != plan.run_key(
        upcycled, plan.Settings()
    )


def test_report_from_records_has_tables_and_plots(tmp_path: Path) -> None:
    records = [_record("Top-1", "none", s, 2.7 + 0.01 * s) for s in (1, 2, 3)] + [
        _record("Top-1+FR+IR", "ir+fr", s, 2.5 + 0.01 * s) for s in (1, 2, 3)
    ]
    meta = {
        "date": "today",
        "machine": "test",
        "software": "test",
        "command": "python -m benchmarks.quality",
        "num_runs": 6,
        "num_trained": 6,
        "seeds": [1, 2, 3],
        "invocation_s": 60.0,
        "sum_run_s": 180.0,
        "span": ("2026-01-01 00:00", "2026-01-01 00:03", 190.0),
        "settings": plan.dataclasses.asdict(plan.Settings()),
        "recipe": "scratch",
        "data": "synthetic",
        "failures": [],
    }
    records += [
        _record(variant, mode, s, loss + 0.01 * s, capacity=0.5)
        for variant, mode, loss in (("Top-1", "none", 2.8), ("Top-1+FR+IR", "ir+fr", 2.6))
        for s in (1, 2, 3)
    ]
    path = report.write_report(records, tmp_path, meta, [0.5, 1.0])
    text = path.read_text()
    assert "the target **holds**" in text
    assert "| Top-1+FR+IR | 3 | 2.5200 ± 0.0100" in text
    assert "-0.2000 ± 0.0000" in text
    assert f"{math.exp(2.72):.3f}" in text
    assert (tmp_path / "quality_loss_curves.png").stat().st_size > 1000
    assert (tmp_path / "quality_capacity.png").stat().st_size > 1000


def test_static_ir_budgets_are_their_own_variants_in_plan_and_grid_table() -> None:
    specs = plan.experiment_specs(
        ["grid"], [1], variants=["Top-1", "Top-1+FR+IR"], ir_budgets=[0.25]
    )
    assert [spec.variant for spec in specs] == [
        "Top-1",
        "Top-1+FR+IR",
        "Top-1+FR+IR (IR budget 0.25)",
    ]
    budget = specs[-1]
    assert budget.slug == "top-1-fr-ir-irb0.25_cf1_lb_s1"
    args = plan.routing_args(budget, plan.Settings())
    assert args[args.index("--moe-rectify-ir-capacity-factor") + 1] == "0.25"
    assert "--moe-rectify-ir-capacity-factor" not in plan.routing_args(specs[1], plan.Settings())
    assert plan.run_key(budget, plan.Settings()) != plan.run_key(specs[1], plan.Settings())
    with pytest.raises(ValueError, match="needs an IR variant"):
        plan.RunSpec(rectify="fr", ir_capacity=0.25)

    records = (
        [_record("Top-1", "none", s, 2.7) for s in (1, 2, 3)]
        + [_record("Top-1+FR+IR", "ir+fr", s, 2.5) for s in (1, 2, 3)]
        + [
            _record("Top-1+FR+IR (IR budget 0.25)", "ir+fr", s, 2.6, ir_capacity=0.25)
            for s in (1, 2, 3)
        ]
    )
    lines = tables_grid(records)
    rows = [line.split(" | ")[:2] for line in lines if line.startswith("| Top-1+FR+IR")]
    assert rows == [["| Top-1+FR+IR", "3"], ["| Top-1+FR+IR (IR budget 0.25)", "3"]]
    assert "-0.1000" in next(line for line in lines if "IR budget" in line)  # vs vanilla


def tables_grid(records: list[dict]) -> list[str]:
    from benchmarks.quality import tables

    return tables.grid_table(stats.group_runs(records), "scratch")


def test_capacity_sweep_trains_the_headline_series_and_plots_only_curves(tmp_path: Path) -> None:
    from benchmarks.quality import plots, tables

    specs = plan.experiment_specs(["capacity"], [1])
    headline = [spec.capacity for spec in specs if spec.variant == "Top-1+FR+IR"]
    assert headline == [0.5, 0.75, 1.0, 1.5]  # not dropless: nothing to rectify there
    assert len(specs) == 4 * 4 + 1

    records = [
        _record(variant, mode, s, loss + 0.01 * s, capacity=capacity)
        for capacity in (0.5, 1.0)
        for variant, mode, loss in (("Top-1", "none", 2.7), ("Top-1+FR+IR", "ir+fr", 2.5))
        for s in (1, 2, 3)
    ]
    groups = stats.group_runs(records)
    lines = tables.capacity_table(groups, "scratch", [0.5, 1.0])
    header = lines[0].split(" | ")
    row = lines[2].split(" | ")
    assert row[0] == "| 0.5"
    assert row[header.index("Top-1+FR+IR")] == "2.5200 ± 0.0100 (Δ -0.2000)"
    assert plots.plot_capacity(groups, "scratch", [0.5, 1.0], tmp_path / "two.png")
    assert (tmp_path / "two.png").stat().st_size > 1000
    # one capacity factor (the upcycle study): a table row, not a "vs capacity" plot
    one = stats.group_runs([r for r in records if r["spec"]["capacity"] == 1.0])
    assert plots.plot_capacity(one, "scratch", [0.5, 1.0], tmp_path / "one.png") is None
    assert not (tmp_path / "one.png").exists()


def _tiny_corpus(prefix: Path, documents: int = 100, length: int = 10, top: int = 200) -> str:
    import numpy as np

    from megatron.rectify.data.indexed_writer import AtomicIndexedDatasetWriter

    with AtomicIndexedDatasetWriter(prefix, np.uint16) as writer:
        for number in range(documents):
            writer.add_document(np.full(length, number % top, dtype=np.uint16))
            if number == documents - 1:
                writer.add_document(np.array([top], dtype=np.uint16))
        writer.commit()
    return str(prefix)


def test_data_flags_reach_every_run_and_the_report_header(tmp_path: Path) -> None:
    from benchmarks.quality import cli, data

    prefix = _tiny_corpus(tmp_path / "corpus")
    argv = ["--data-path", prefix, "--tokenizer-type", "ByteLevel", "--experiments", "grid"]
    args, extra = cli.build_parser().parse_known_args(argv)
    assert data.data_problem(args) is None
    settings = cli.settings_from(args, extra)
    for spec in cli.plan(args):
        command = plan.training_args(spec, settings, "/runs/x", "/runs/dense")
        at = command.index("--data-path")
        assert command[at : at + 6] == [
            *("--data-path", prefix, "--split", data.DEFAULT_SPLIT),
            *("--tokenizer-type", "ByteLevel"),
        ]
    default = cli.settings_from(*cli.build_parser().parse_known_args([]))
    assert default.extra_args == ()  # the embedded corpus's runs keep their cache keys
    assert plan.run_key(plan.RunSpec(), settings) != plan.run_key(plan.RunSpec(), default)

    header = data.describe_data(args)
    # 101 documents (100 of 10 tokens, one of 1): split 98,1,1 -> documents 0-98, 99, 100
    assert header.startswith(f"`--data-path {prefix}`; `{prefix}`: 101 documents, 1,001 tokens")
    assert "(train 990, validation 10, test 1); split 98,1,1; tokenizer ByteLevel" in header


def test_bad_data_flags_stop_the_benchmark_in_one_line_before_any_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from benchmarks.quality import cli

    good = _tiny_corpus(tmp_path / "good")
    wide = _tiny_corpus(tmp_path / "wide", top=300)  # ids up to 300: not byte-level data
    (tmp_path / "cut.bin").write_bytes(b"\0" * 8)
    (tmp_path / "cut.idx").write_bytes(b"MMIDIDX\0\0")
    cases = {
        ("--data-path", str(tmp_path / "nothing"), "--tokenizer-type", "ByteLevel"): (
            "no dataset at prefix"
        ),
        ("--data-path", str(tmp_path / "cut"), "--tokenizer-type", "ByteLevel"): "is truncated",
        ("--data-path", good): "--data-path needs --tokenizer-type",
        ("--data-path", good, "--tokenizer-type", "GPT2BPETokenizer"): "needs --vocab-file",
        (
            "--data-path",
            good,
            "--tokenizer-type",
            "HuggingFaceTokenizer",
            "--tokenizer-model",
            str(tmp_path / "no-model"),
        ): "--tokenizer-model",
        ("--data-path", wide, "--tokenizer-type", "ByteLevel"): "token id 300",
        ("--data-path", good, "--tokenizer-type", "ByteLevel", "--split", "100,0,0"): (
            "leaves the held-out set"
        ),
        ("--data-path", good, "--tokenizer-type", "ByteLevel", "--split", "90,5,5"): None,
        ("--tokenizer-type", "ByteLevel"): "--tokenizer-type without --data-path",
    }
    for number, (argv, expected) in enumerate(cases.items()):
        out = tmp_path / f"runs{number}"
        code = cli.main([*argv, "--out", str(out), "--dry-run"])
        captured = capsys.readouterr()
        if expected is None:
            assert code == 0, captured.err
            continue
        assert code == 2, argv
        lines = captured.err.splitlines()
        assert len(lines) == 1 and expected in lines[0], (argv, captured.err)
        assert lines[0].startswith("python -m benchmarks.quality: error: ")
        assert not out.exists()  # stopped before anything was made


def test_layer_cost_cases_are_the_quality_models_layer() -> None:
    from benchmarks.quality import layer_cost

    settings = plan.Settings()
    cases = layer_cost.quality_cases()
    assert [case.topk for case in cases] == [1, 2]
    for case in cases:
        assert case.tokens == settings.micro_batch_size * settings.seq_length
        assert (case.hidden, case.experts, case.ep) == (
            settings.hidden_size,
            settings.num_experts,
            settings.expert_parallel,
        )
        assert case.ffn == 320  # megatron's --swiglu default at hidden 128 (the runs' logs)
