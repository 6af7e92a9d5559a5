"""All-or-nothing output folders: a conversion that fails leaves nothing behind.

Everything is written into a hidden staging folder next to the destination and renamed into
place only when complete (``megatron.rectify.atomic``: a rename within one file system is
atomic), so a crash, a shape error or Ctrl-C never leaves a half-written checkpoint that a later
training run would load.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from megatron.rectify.atomic import staged_directory
from megatron.rectify.checkpoint.errors import CheckpointToolError


def check_destination(destination: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse early (before any work) to replace an existing non-empty folder unless asked."""
    destination = Path(destination).absolute()
    if destination.exists() and not destination.is_dir():
        raise CheckpointToolError(f"{destination} exists and is not a directory")
    if destination.is_dir() and any(destination.iterdir()) and not overwrite:
        raise CheckpointToolError(
            f"{destination} exists and is not empty; choose another path or pass --overwrite"
        )
    return destination


@contextmanager
def atomic_output_dir(destination: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a staging folder; on success it becomes ``destination``, on error it is removed
    (``megatron.rectify.atomic.staged_directory``)."""
    destination = check_destination(destination, overwrite)
    destination.parent.mkdir(parents=True, exist_ok=True)
    with staged_directory(
        destination,
        staging=destination.parent / f".{destination.name}.partial-{os.getpid()}",
        aside=destination.parent / f".{destination.name}.previous-{os.getpid()}",
    ) as staging:
        yield staging
