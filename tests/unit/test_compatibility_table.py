"""docs/compatibility.md cannot drift from the code: every cell names a test that exists, every
``refused`` cell is refused by the flag checks (one line, before start-up) and every ``tested``
or ``untested`` cell is not; and every option issue 12 lists has a row.

The flag checks are the rectify-specific ones (``rectify_arg_problems``); what this machine
cannot run (Transformer Engine kernels, CUDA graphs on CPU: ``environment_problems``) is left
out, so the table reads the same on every machine."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from megatron.rectify.dev.compatibility_table import (
    MODES,
    Row,
    TableError,
    command_for,
    parse_cell,
    read_table,
)

REPO = Path(__file__).resolve().parents[2]
ROWS = read_table()

#: Options a megatron MoE user turns on, each of which must have a row (by a flag it uses).
REQUIRED_FLAGS = (
    "allgather",
    "flex",
    "--moe-pad-expert-input-to-capacity",
    "--moe-permute-fusion",
    "--moe-router-fusion",
    "--cuda-graph-impl",
    "--overlap-moe-expert-parallel-comm",
    "--delay-wgrad-compute",
    "--mtp-num-layers",
    "--moe-router-padding-for-quantization",
    "--num-layers-per-virtual-pipeline-stage",
    "--context-parallel-size",
    "--recompute-granularity",
    "--use-distributed-optimizer",
    "--ckpt-format",
    "--tensor-model-parallel-size",
    "--expert-tensor-parallel-size",
    "--pipeline-model-parallel-size",
    "--moe-rectify-ir-capacity-factor",
)

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]


def _row_id(row: Row) -> str:
    return re.sub(r"[^a-z0-9]+", "-", row.option.lower()).strip("-")


def test_every_option_of_the_issue_has_a_row() -> None:
    flags = {flag for row in ROWS for flag in row.flags}
    missing = [flag for flag in REQUIRED_FLAGS if flag not in flags]
    assert not missing, f"docs/compatibility.md has no row for {missing}"


@pytest.mark.parametrize("row", ROWS, ids=_row_id)
def test_every_cell_names_tests_that_exist(row: Row) -> None:
    for mode, cell in row.cells.items():
        for file, name in cell.tests:
            path = REPO / file
            assert path.is_file(), f"{row.option} / {mode} names {file}, which does not exist"
            assert re.search(rf"^(async )?def {name}\(", path.read_text(), re.M), (
                f"{row.option} / {mode} names {file}::{name}, which does not exist"
            )


def test_a_cell_without_a_test_or_kind_is_a_table_error() -> None:
    with pytest.raises(TableError, match="must name its test"):
        parse_cell("tested: trains")
    with pytest.raises(TableError, match="must start with"):
        parse_cell("works `tests/unit/test_config.py::test_x`")
    assert parse_cell("n/a: FR only").kind == "n/a"


def _problems(row: Row, mode: str, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    from megatron.training.arguments import parse_args

    from megatron.rectify.dev.mode import CPU_EMULATION_DEFAULT_ARGS
    from megatron.rectify.training.args import add_rectify_args, rectify_arg_problems

    flags, world = command_for([row], mode)
    argv = ["pretrain_gpt_rectify.py", *CPU_EMULATION_DEFAULT_ARGS, *flags]
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("RANK", "0")
    return rectify_arg_problems(parse_args(add_rectify_args))


@pytest.mark.parametrize("row", ROWS, ids=_row_id)
def test_refused_cells_are_refused_and_tested_cells_are_not(
    row: Row, monkeypatch: pytest.MonkeyPatch
) -> None:
    for mode in MODES:
        cell = row.cells[mode]
        if cell.kind == "n/a":
            continue
        problems = _problems(row, mode, monkeypatch)
        if cell.kind == "refused":
            assert problems, (row.option, mode)  # the script prints the first, one line
        else:
            assert problems == [], (row.option, mode, problems)


def test_rows_run_on_a_layout_that_fits_at_most_four_processes() -> None:
    from megatron.rectify.dev.compatibility_table import layout

    assert layout([]) == (2, ["--expert-model-parallel-size", "2"])
    tp2 = ["--tensor-model-parallel-size", "2"]  # expert-TP 2 (megatron's default: TP)
    assert layout(tp2) == (4, ["--expert-model-parallel-size", "2"])
    assert layout([*tp2, "--pipeline-model-parallel-size", "2"]) == (4, [])  # no room for EP 2
    assert layout(["--context-parallel-size", "2"]) == (2, ["--expert-model-parallel-size", "2"])
    assert layout(["--expert-model-parallel-size", "4"]) == (4, [])


def test_the_fuzz_tells_a_one_line_stop_from_a_crash() -> None:
    sys.path.insert(0, str(REPO / "scripts"))
    from fuzz_options import classify

    error = "pretrain_gpt_rectify.py: error: --x needs --y"
    assert classify([(0, " iteration        2/       2 |", ""), (0, "", "")])[0] == "trained"
    assert classify([(0, "", ""), (0, "", "")])[0] == "FAILED"  # exit 0 without training
    assert classify([(2, "", f"warning\n{error}\n"), (2, "", f"{error}\n")]) == ("stopped", error)
    assert classify([(2, "", f"{error}\n"), (-9, "", "")])[0] == "stopped"  # killed peer
    assert classify([(1, "", "Traceback (most recent call last):\n  ...\nValueError: x")])[0] == (
        "FAILED"
    )
    assert classify([(2, "", f"{error}\n{error}\n")])[0] == "FAILED"  # two lines
