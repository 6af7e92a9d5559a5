"""Bad input to ``pretrain_gpt_rectify.py`` is refused before any model is built: exit status 2
and one line ``pretrain_gpt_rectify.py: error: ...`` naming the flag or file and the fix.

Most cases call the parse/validate step in-process (fast: megatron is imported once); two run
the real script as one plain process (no launcher: a refusal happens before any process group).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megatron.rectify.dev.tiny_model import MOCK_DATA as MOCK
from megatron.rectify.dev.tiny_model import (
    NULL_TOKENIZER,
    RECTIFY_IR_FR,
    TINY_MODEL,
    TINY_SCHEDULE,
    TOP1_ROUTING,
)

REPO = Path(__file__).resolve().parents[2]
PROG = "pretrain_gpt_rectify.py"
#: The tiny model, trained with IR+FR, no data flags (each test names its data). Evaluation
#: every 10 iterations for 2, so that the validation and test splits are read (the split
#: refusals are about them).
BASE = [
    *TINY_MODEL, *TINY_SCHEDULE, *TOP1_ROUTING, *RECTIFY_IR_FR,
    "--eval-interval", "10", "--eval-iters", "2", "--cpu-emulation",
]  # fmt: skip

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),  # megatron's argument warnings
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),
]


# ---- datasets -----------------------------------------------------------------------------------


def _write(prefix: Path, documents: int, tokens: int) -> str:
    from megatron.rectify.data import AtomicIndexedDatasetWriter

    with AtomicIndexedDatasetWriter(prefix, np.uint16) as writer:
        for document in range(documents):
            writer.add_document((np.arange(tokens) + document) % 250)
        writer.commit()
    return str(prefix)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("data")
    tiny = _write(root / "tiny", documents=5, tokens=100)
    hundred = _write(root / "hundred", documents=100, tokens=20)
    # Damaged copies of tiny: 100 of the .bin's 1000 token bytes lost, or the .idx cut short.
    short_bin, short_idx = str(root / "short_bin"), str(root / "short_idx")
    shutil.copy(tiny + ".idx", short_bin + ".idx")
    Path(short_bin + ".bin").write_bytes(Path(tiny + ".bin").read_bytes()[:900])
    shutil.copy(tiny + ".bin", short_idx + ".bin")
    Path(short_idx + ".idx").write_bytes(Path(tiny + ".idx").read_bytes()[:100])
    return {
        "tiny": tiny,
        "hundred": hundred,
        "short_bin": short_bin,
        "short_idx": short_idx,
        "missing": str(root / "missing"),
        "root": str(root),
    }


# ---- helpers ------------------------------------------------------------------------------------


@pytest.fixture
def parse(monkeypatch: pytest.MonkeyPatch):
    """``parse(*flags, world_size=1)``: the script's parse/validate step on ``flags`` in this
    process, up to (not including) megatron's global state; returns the args."""
    import megatron.training.global_vars as megatron_globals

    monkeypatch.setattr(megatron_globals, "set_global_variables", lambda *a, **k: None)

    def run(*flags: str, world_size: int = 1):
        from megatron.rectify.dev.mode import CPU_EMULATION_DEFAULT_ARGS
        from megatron.rectify.training import parse_and_validate_args

        monkeypatch.setattr(sys, "argv", [PROG, *CPU_EMULATION_DEFAULT_ARGS, *BASE, *flags])
        monkeypatch.setenv("WORLD_SIZE", str(world_size))
        monkeypatch.setenv("RANK", "0")
        return parse_and_validate_args(training_data=True)

    return run


@pytest.fixture
def refusal(parse, capsys: pytest.CaptureFixture):
    """``refusal(*flags)``: the one error line the parse/validate step ends with (exit 2)."""

    def run(*flags: str, world_size: int = 1) -> str:
        with pytest.raises(SystemExit) as exited:
            parse(*flags, world_size=world_size)
        err = capsys.readouterr().err
        assert exited.value.code == 2, err[-2000:]
        assert "Traceback" not in err
        errors = [line for line in err.splitlines() if f"{PROG}: error:" in line]
        assert len(errors) == 1, err[-2000:]
        assert err.strip().splitlines()[-1] == errors[0]
        return errors[0]

    return run


@pytest.fixture
def no_embedded_corpus(monkeypatch: pytest.MonkeyPatch) -> None:
    import megatron.rectify.data as rectify_data

    def refuse() -> str:
        raise AssertionError("the embedded corpus must not be used when a data source is given")

    monkeypatch.setattr(rectify_data, "ensure_embedded_corpus", refuse)


def _script(*flags: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    command = [sys.executable, str(REPO / PROG), *BASE, *flags]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def _refused(run: subprocess.CompletedProcess) -> str:
    assert run.returncode == 2, run.stdout[-2000:] + run.stderr[-3000:]
    assert "Traceback" not in run.stderr
    line = run.stderr.strip().splitlines()[-1]
    assert line.startswith(f"{PROG}: error: "), run.stderr[-2000:]
    return line


# ---- item 2: the data source, decided from the parsed arguments ---------------------------------


def test_data_path_with_equals_sign_is_not_replaced_by_the_embedded_corpus(data) -> None:
    """The reported bug: ``--data-path=PREFIX`` trained on the embedded corpus, exit 0."""
    line = _refused(_script(f"--data-path={data['missing']}", *NULL_TOKENIZER))
    assert "--data-path" in line and data["missing"] in line


@pytest.mark.parametrize(
    "flags",
    [
        ["--data-path={missing}"],
        ["--data-path", "{missing}"],
        ["--data-path", "0.3", "{tiny}", "0.7", "{missing}"],
        ["--data-path", "{tiny}", "{missing}"],
        ["--train-data-path={missing}"],
        ["--train-data-path={hundred}", "--valid-data-path={missing}"],
    ],
)
def test_a_missing_prefix_is_named(refusal, no_embedded_corpus, data, flags) -> None:
    line = refusal(*(flag.format(**data) for flag in flags), *NULL_TOKENIZER)
    flag = flags[-1].split("=")[0] if "=" in flags[-1] else "--data-path"
    assert flag in line
    assert data["missing"] in line and "preprocess_data.py" in line


def test_a_data_file_instead_of_a_prefix_names_the_prefix(refusal, data) -> None:
    line = refusal(f"--data-path={data['tiny']}.bin", *NULL_TOKENIZER)
    assert f"give {data['tiny']} (without .bin)" in line


def test_list_files_are_read_before_megatron_reads_them(refusal, no_embedded_corpus, data) -> None:
    root = Path(data["root"])
    assert "--data-args-path" in refusal(f"--data-args-path={root / 'nowhere'}", *NULL_TOKENIZER)
    listing = root / "list.txt"
    listing.write_text(f"0.5 {data['hundred']} 0.5 {data['missing']}\n")
    line = refusal(f"--data-args-path={listing}", "--split", "90,5,5", *NULL_TOKENIZER)
    assert f"--data-args-path {listing}" in line and data["missing"] in line
    per_split = root / "per_split.json"
    per_split.write_text(json.dumps({"train": data["hundred"], "valid": data["missing"]}))
    line = refusal(f"--per-split-data-args-path={per_split}", *NULL_TOKENIZER)
    assert "--per-split-data-args-path" in line and "'test'" in line
    per_split.write_text(
        json.dumps({"train": data["hundred"], "valid": data["missing"], "test": data["hundred"]})
    )
    line = refusal(f"--per-split-data-args-path={per_split}", *NULL_TOKENIZER)
    assert f"--per-split-data-args-path {per_split} (valid)" in line and data["missing"] in line


@pytest.mark.parametrize(
    "flags",
    [
        ["--mock-data"],
        ["--data-path={hundred}", "--split=90,5,5"],
        ["--train-data-path={hundred}", "--valid-data-path={hundred}"],
        ["--data-args-path={root}/good.txt", "--split", "90,5,5"],
        ["--per-split-data-args-path={root}/good.json"],
    ],
)
def test_any_spelling_of_a_data_source_is_used_as_given(
    parse, no_embedded_corpus, data, flags
) -> None:
    root = Path(data["root"])
    (root / "good.txt").write_text(f"{data['hundred']}\n")
    splits = {"train": data["hundred"], "valid": data["hundred"], "test": data["hundred"]}
    (root / "good.json").write_text(json.dumps(splits))
    args = parse(*(flag.format(**data) for flag in flags), *NULL_TOKENIZER)
    assert args.tokenizer_type == "NullTokenizer"
    if "--data-path=" in flags[0]:
        assert args.data_path == [data["hundred"]]
    else:
        assert args.data_path is None


def test_without_a_data_source_the_embedded_corpus_fills_only_what_is_missing(
    parse, monkeypatch: pytest.MonkeyPatch, data
) -> None:
    import megatron.rectify.data as rectify_data

    monkeypatch.setattr(rectify_data, "ensure_embedded_corpus", lambda: data["hundred"])
    args = parse()
    assert args.data_path == [data["hundred"]]
    assert args.split == rectify_data.EMBEDDED_CORPUS_SPLIT
    assert args.tokenizer_type == rectify_data.BYTE_LEVEL_TOKENIZER_TYPE
    args = parse("--split=90,5,5", *NULL_TOKENIZER)
    assert args.data_path == [data["hundred"]]
    assert (args.split, args.tokenizer_type) == ("90,5,5", "NullTokenizer")


# ---- item 4: a capacity factor that is not positive ---------------------------------------------


@pytest.mark.parametrize("factor", ["-1", "0"])
def test_rectification_refuses_a_capacity_factor_that_is_not_positive(refusal, factor) -> None:
    line = refusal("--moe-expert-capacity-factor", factor, *MOCK)
    assert "positive --moe-expert-capacity-factor" in line


@pytest.mark.parametrize("factor", [-1.0, 0.0])
def test_the_transformer_config_refuses_it_too(factor: float) -> None:
    from megatron.rectify.config import RectifyConfigError, RectifyTransformerConfig

    with pytest.raises(RectifyConfigError, match="positive --moe-expert-capacity-factor"):
        RectifyTransformerConfig(
            num_layers=1,
            hidden_size=16,
            num_attention_heads=4,
            num_moe_experts=8,
            moe_router_topk=2,
            moe_expert_capacity_factor=factor,
            moe_rectify="fr",
        )


# ---- static IR: --moe-rectify-ir-capacity-factor -------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (["--moe-rectify-ir-capacity-factor", "0"], "must be a positive number"),
        (["--moe-rectify-ir-capacity-factor", "-0.5"], "must be a positive number"),
        (["--moe-rectify-ir-capacity-factor", "inf"], "must be a positive number"),
        (
            ["--moe-rectify-ir-capacity-factor", "half"],
            "expected a number (e.g. 0.25) or 'dynamic'",
        ),
        (["--moe-rectify", "fr", "--moe-rectify-ir-capacity-factor", "0.5"], "runs no IR"),
        (
            ["--moe-rectify", "none", "--moe-rectify-ir-capacity-factor", "0.5"],
            "use --moe-rectify ir or ir+fr",
        ),
    ],
)
def test_static_ir_needs_a_positive_budget_and_a_mode_with_ir(refusal, flags, words) -> None:
    line = refusal(*flags, *MOCK)
    assert "--moe-rectify-ir-capacity-factor" in line and words in line


@pytest.mark.parametrize("mode_flags", [[], ["--moe-rectify", "none", "--moe-rectify-eval", "ir"]])
def test_static_ir_is_accepted_with_ir_in_training_or_evaluation(parse, mode_flags) -> None:
    from megatron.training.argument_utils import core_transformer_config_from_args

    from megatron.rectify.config import RectifyTransformerConfig
    from megatron.rectify.training.args import eval_rectify_options

    args = parse(*mode_flags, "--moe-rectify-ir-capacity-factor", "0.25", *MOCK)
    config = core_transformer_config_from_args(args, RectifyTransformerConfig)
    options = eval_rectify_options(args) or config.rectify_options
    assert options.intra_gpu and options.ir_capacity_factor == 0.25  # reaches the router


def test_static_ir_dynamic_is_the_default_said_explicitly(parse) -> None:
    assert (
        parse("--moe-rectify-ir-capacity-factor", "dynamic", *MOCK).moe_rectify_ir_capacity_factor
        is None
    )


# ---- item 8: a split megatron would build from no document --------------------------------------


def test_megatrons_default_split_on_a_small_dataset_is_refused(data) -> None:
    """Without the check megatron waits forever in GPTDataset._get_num_epochs."""
    line = _refused(_script(f"--data-path={data['tiny']}", *NULL_TOKENIZER))
    assert "--split '969, 30, 1' (megatron's default)" in line
    assert "validation split" in line and "0 of its 5 documents" in line
    assert "e.g. --split 60,20,20" in line


def test_eval_iters_0_does_not_make_an_empty_split_acceptable(refusal, data) -> None:
    line = refusal("--data-path", data["tiny"], "--eval-iters", "0", *NULL_TOKENIZER)
    assert "--split" in line and "--eval-iters 0 does not avoid it" in line


def test_an_empty_test_split_is_named_and_a_split_that_fits_is_accepted(
    parse, refusal, data
) -> None:
    line = refusal("--data-path", data["tiny"], "--split", "90,5,5", *NULL_TOKENIZER)
    assert "--split '90,5,5'" in line and "test split" in line
    assert parse("--data-path", data["tiny"], "--split", "60,20,20", *NULL_TOKENIZER)
    assert parse("--data-path", data["tiny"], "--split", "100,0,0", *NULL_TOKENIZER)


def test_blends_need_tokens_where_megatron_asks_each_dataset_for_samples(
    parse, refusal, data
) -> None:
    tiny, hundred = data["tiny"], data["hundred"]
    # weighted: every dataset is asked for samples of every split, and tiny has no test document
    line = refusal("--data-path", "1", tiny, "1", hundred, "--split", "90,5,5", *NULL_TOKENIZER)
    assert "test split of " + tiny in line
    # unweighted: one epoch of each dataset, blended by size; hundred's test documents suffice
    assert parse("--data-path", tiny, hundred, "--split", "90,5,5", *NULL_TOKENIZER)


def test_a_split_that_is_no_split_is_refused(refusal, data) -> None:
    for split in ("0,0,0", "abc"):
        line = refusal("--data-path", data["hundred"], "--split", split, *NULL_TOKENIZER)
        assert f"--split '{split}'" in line


# ---- item 10: top-k, expert parallelism, damaged data files -------------------------------------


@pytest.mark.parametrize(("rectify", "topk"), [("ir+fr", "0"), ("none", "0"), ("ir", "5")])
def test_top_k_out_of_range_is_named(refusal, rectify: str, topk: str) -> None:
    line = refusal("--moe-rectify", rectify, "--moe-router-topk", topk, *MOCK)
    assert f"--moe-router-topk {topk} is out of range for --num-experts 4" in line
    assert "capacity" not in line


def test_the_transformer_config_names_top_k_not_capacity() -> None:
    from megatron.rectify.config import RectifyConfigError, RectifyTransformerConfig

    with pytest.raises(RectifyConfigError) as error:
        RectifyTransformerConfig(
            num_layers=1,
            hidden_size=16,
            num_attention_heads=4,
            num_moe_experts=8,
            moe_router_topk=9,
            moe_expert_capacity_factor=1.0,
            moe_rectify="ir",
        )
    assert "--moe-router-topk 9" in str(error.value) and "capacity" not in str(error.value)


def test_expert_parallel_size_must_divide_the_world_size(refusal) -> None:
    line = refusal("--expert-model-parallel-size", "4", *MOCK, world_size=2)
    assert "--expert-model-parallel-size 4" in line and "2 processes (WORLD_SIZE)" in line


def test_experts_must_divide_over_expert_parallel_ranks(refusal) -> None:
    line = refusal("--num-experts", "6", "--expert-model-parallel-size", "4", *MOCK, world_size=4)
    assert "--num-experts 6 is not divisible by --expert-model-parallel-size 4" in line


def test_expert_biases_with_expert_tensor_parallelism_are_refused(refusal) -> None:
    """megatron-core 0.19.2 asserts this at model build (a traceback on every rank)."""
    line = refusal("--tensor-model-parallel-size", "2", "--sequence-parallel", *MOCK, world_size=4)
    assert "expert biases" in line and "--disable-bias-linear" in line
    assert "--expert-tensor-parallel-size 1" in line


@pytest.mark.parametrize(("name", "damaged"), [("short_bin", ".bin"), ("short_idx", ".idx")])
def test_a_truncated_data_file_is_named(refusal, data, name: str, damaged: str) -> None:
    line = refusal("--data-path", data[name], "--split", "60,20,20", *NULL_TOKENIZER)
    assert f"{data[name]}{damaged} is truncated" in line and "preprocess_data.py" in line


# ---- --exit-on-missing-checkpoint ---------------------------------------------------------------


def test_exit_on_missing_checkpoint_without_a_checkpoint_is_refused(
    refusal, parse, tmp_path: Path
) -> None:
    """megatron-core 0.19.2 exits 0 (a bare ``sys.exit()``) when the checkpoint is missing."""
    empty = tmp_path / "no_checkpoint_here"
    line = refusal("--load", str(empty), "--exit-on-missing-checkpoint", *MOCK)
    assert f"--exit-on-missing-checkpoint: no checkpoint in --load {empty}" in line
    saved = tmp_path / "saved"
    (saved / "iter_0000010").mkdir(parents=True)
    (saved / "latest_checkpointed_iteration.txt").write_text("10")
    assert parse("--load", str(saved), "--exit-on-missing-checkpoint", *MOCK)


# ---- --pretrained-checkpoint and --yaml-cfg -----------------------------------------------------


def test_a_pretrained_checkpoint_that_cannot_load_is_named_before_start_up(
    refusal, parse, tmp_path: Path
) -> None:
    """megatron-core 0.19.2 finds it only after building the model (FileNotFoundError)."""
    missing = tmp_path / "missing"
    assert "--pretrained-checkpoint " + str(missing) + ": no such folder" in refusal(
        "--pretrained-checkpoint", str(missing), *MOCK
    )
    empty = tmp_path / "empty"
    empty.mkdir()
    assert f"--pretrained-checkpoint {empty} holds no checkpoint" in refusal(
        "--pretrained-checkpoint", str(empty), *MOCK
    )
    stale = tmp_path / "stale"
    stale.mkdir()
    (stale / "latest_checkpointed_iteration.txt").write_text("30")
    line = refusal("--pretrained-checkpoint", str(stale), *MOCK)
    assert line.split("error: ", 1)[1].startswith("--pretrained-checkpoint: ") and "30" in line
    saved = tmp_path / "saved"
    (saved / "iter_0000010").mkdir(parents=True)
    (saved / "latest_checkpointed_iteration.txt").write_text("10")
    assert parse("--pretrained-checkpoint", str(saved), *MOCK)
    # --load holds a checkpoint: megatron resumes it and never reads the pretrained one
    assert parse("--pretrained-checkpoint", str(empty), "--load", str(saved), *MOCK)


def test_checkpoint_args_need_a_folder_to_read_them_from(refusal) -> None:
    line = refusal("--use-checkpoint-args", *MOCK)
    assert "--use-checkpoint-args needs --load DIR or --pretrained-checkpoint DIR" in line


@pytest.mark.parametrize("spelling", [["--yaml-cfg", "run.yaml"], ["--yaml-cfg=run.yaml"]])
def test_yaml_cfg_is_refused_with_the_reason(refusal, spelling: list[str]) -> None:
    line = refusal(*spelling, *MOCK)
    assert "--yaml-cfg is not supported" in line and "command line" in line
