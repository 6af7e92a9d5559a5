"""All-or-nothing output folders: a conversion that fails leaves nothing behind.

Everything is written into a hidden staging folder next to the destination and renamed into
place only when complete (a rename within one file system is atomic), so a crash, a shape
error or Ctrl-C never leaves a half-written checkpoint that a later training run would load.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

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
    """Yield a staging folder; on success it becomes ``destination``, on error it is removed."""
    destination = check_destination(destination, overwrite)
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = destination.parent / f".{destination.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    previous = destination.parent / f".{destination.name}.previous-{os.getpid()}"
    if destination.exists():
        destination.rename(previous)
    staging.rename(destination)
    shutil.rmtree(previous, ignore_errors=True)
