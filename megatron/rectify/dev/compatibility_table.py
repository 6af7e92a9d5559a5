"""docs/compatibility.md as data: which megatron option works with which rectify mode.

The page has one table, ``| option | flags | none | fr | ir | ir+fr |``. Each row is a megatron
option, the flags that turn it on (added to a tiny MoE command line), and one cell per
``--moe-rectify`` mode:

* ``tested: ...`` - it trains correctly; the cell names the test(s) that would fail otherwise;
* ``refused: <reason> ...`` - the run stops before start-up with one line; the cell names the
  test of that refusal;
* ``untested: <reason> ...`` - allowed (the flag checks let it through), but no test here
  runs it: GPU-only kernels, or a mode the option's end-to-end test does not cover; the
  ``make fuzz-options`` runs draw it;
* ``n/a: <reason>`` - the combination means nothing (e.g. a flag that only matters for IR).

Tests are named as ``tests/<tier>/test_x.py::test_name`` in backticks. Two readers keep the
page honest: ``tests/unit/test_compatibility_table.py`` (every named test exists; every
``refused`` cell is refused by the flag checks and every ``tested`` cell is not) and
``scripts/fuzz_options.py`` (``make fuzz-options``: random combinations of the rows must train
or stop with one line). Imports neither torch nor megatron.
"""

from __future__ import annotations

import argparse
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

from megatron.rectify.dev.tiny_model import (
    MOCK_DATA,
    NO_EVAL,
    TINY_MODEL,
    TOP1_ROUTING,
    tiny_schedule,
)

MODES = ("none", "fr", "ir", "ir+fr")
KINDS = ("tested", "refused", "untested", "n/a")
HEADER = ("option", "flags", *MODES)
PAGE = Path(__file__).resolve().parents[3] / "docs" / "compatibility.md"

_TEST = re.compile(r"`(tests/[a-z_]+/test_[a-z0-9_]+\.py)::([A-Za-z0-9_]+)(?:\[[^\]]*\])?`")


@dataclass(frozen=True)
class Cell:
    """One option x mode: its kind (:data:`KINDS`), the text after the kind, and the tests it
    names as ``(file, test function)`` pairs."""

    kind: str
    text: str
    tests: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Row:
    """One megatron option: its name, the flags that turn it on, and a cell per mode."""

    option: str
    flags: tuple[str, ...]
    cells: dict[str, Cell]


class TableError(ValueError):
    """The page's table does not follow the format this module documents."""


def _split_row(line: str) -> list[str]:
    # a '|' inside backticks would split a cell; the table's flags never contain one
    return [part.strip() for part in line.strip().strip("|").split("|")]


def parse_cell(text: str) -> Cell:
    """``tested: ...`` / ``refused: ...`` / ``n/a: ...`` -> :class:`Cell`."""
    kind, sep, rest = text.partition(":")
    kind = kind.strip().lower()
    if not sep or kind not in KINDS:
        raise TableError(f"a cell must start with one of {', '.join(KINDS)} and ':' (got {text!r})")
    tests = tuple(_TEST.findall(rest))
    if kind in ("tested", "refused") and not tests:
        raise TableError(f"a {kind!r} cell must name its test (got {text!r})")
    return Cell(kind, rest.strip(), tests)


def read_table(page: Path = PAGE) -> list[Row]:
    """The rows of the page's compatibility table, in page order."""
    lines = page.read_text().splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("| option | flags |")]
    starts = [i for i in starts if tuple(_split_row(lines[i])) == HEADER]
    if not starts:
        raise TableError(f"{page}: no table with the header {' | '.join(HEADER)}")
    rows = []
    for line in lines[starts[0] + 2 :]:
        if not line.startswith("|"):
            break
        parts = _split_row(line)
        if len(parts) != len(HEADER):
            raise TableError(f"{page}: {len(parts)} cells in {line!r}, expected {len(HEADER)}")
        option, flags, *cells = parts
        flag_text = "".join(re.findall(r"`([^`]*)`", flags))
        rows.append(
            Row(
                option=option,
                flags=tuple(shlex.split(flag_text)),
                cells={mode: parse_cell(cell) for mode, cell in zip(MODES, cells, strict=True)},
            )
        )
    if not rows:
        raise TableError(f"{page}: the compatibility table has no rows")
    return rows


# ---- running a row -----------------------------------------------------------------------------

#: The tiny MoE command line a row's flags are added to (2 iterations of micro-batches of 2, no
#: rectify mode: :func:`command_for` adds it; a row's flags come after these, so a row may
#: override them, e.g. more layers for virtual pipeline stages).
BASE = [
    *TINY_MODEL,
    *tiny_schedule(train_iters=2, micro_batch_size=2),
    *TOP1_ROUTING,
    "--moe-aux-loss-coeff", "0.01", "--disable-bias-linear",
    *MOCK_DATA,
    "--log-interval", "1",
    *NO_EVAL,
    "--cpu-emulation",
]  # fmt: skip
MAX_PROCESSES = 4


def _sizes(flags: list[str]) -> dict[str, int | None]:
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    for name in (
        "--tensor-model-parallel-size",
        "--pipeline-model-parallel-size",
        "--context-parallel-size",
        "--expert-model-parallel-size",
        "--expert-tensor-parallel-size",
    ):
        parser.add_argument(name, type=int, default=None)
    known, _ = parser.parse_known_args(flags)
    return vars(known)


def layout(flags: list[str]) -> tuple[int, list[str]]:
    """The number of processes (at most :data:`MAX_PROCESSES`) and the expert-parallel flag
    for ``flags``: expert parallelism 2 wherever the other sizes leave room for it (the
    rectified dispatcher's IR only matters with EP > 1), else 1."""
    sizes = _sizes(flags)
    tp = sizes["tensor_model_parallel_size"] or 1
    pp = sizes["pipeline_model_parallel_size"] or 1
    cp = sizes["context_parallel_size"] or 1
    etp = sizes["expert_tensor_parallel_size"] or tp
    model = tp * pp * cp
    if sizes["expert_model_parallel_size"] is not None:
        ep = sizes["expert_model_parallel_size"]
        for world in range(model, MAX_PROCESSES + 1, model):
            if world % (ep * etp * pp) == 0:
                return world, []
        return model, []
    for world in range(model, MAX_PROCESSES + 1, model):
        if world % (2 * etp * pp) == 0:
            return world, ["--expert-model-parallel-size", "2"]
    return max(model, 1), []


def command_for(rows: list[Row], mode: str) -> tuple[list[str], int]:
    """The command line (:data:`BASE`, the rows' flags, the mode) and the number of processes
    that runs ``rows`` together with ``--moe-rectify mode``."""
    flags = [*BASE, *[flag for row in rows for flag in row.flags], "--moe-rectify", mode]
    if "ir" in mode.split("+"):
        flags += ["--moe-rectify-ir-trigger", "ignore_kth" if "fr" in mode else "all"]
    world, expert_flags = layout(flags)
    return [*flags, *expert_flags], world
