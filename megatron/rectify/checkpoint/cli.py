"""Shared command-line plumbing of the ``tools/checkpoint`` scripts."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from megatron.rectify.checkpoint.errors import CheckpointToolError


def add_layout_args(parser: argparse.ArgumentParser) -> None:
    """Megatron-LM's converter names for the layout a checkpoint is written for."""
    group = parser.add_argument_group("target layout (recorded in the checkpoint's args)")
    group.add_argument("--target-tensor-parallel-size", type=int, default=1)
    group.add_argument("--target-pipeline-parallel-size", type=int, default=1)
    group.add_argument("--target-expert-parallel-size", type=int, default=1)


def add_quiet_arg(parser: argparse.ArgumentParser) -> None:
    """``--quiet``: without it, phases, tensors / bytes done, rate and ETA go to stderr."""
    parser.add_argument(
        "--quiet",
        action="store_true",
        help="print errors only (no progress on stderr, no summary); without it, phases and "
        "tensors / bytes done, rate and ETA are printed to stderr about once a second",
    )


def run_tool(name: str, main: Callable[[], None]) -> None:
    """Run ``main``; a :class:`CheckpointToolError` becomes one line on stderr and exit 2."""
    try:
        main()
    except CheckpointToolError as error:
        print(f"{name}: error: {error}", file=sys.stderr)
        sys.exit(2)
