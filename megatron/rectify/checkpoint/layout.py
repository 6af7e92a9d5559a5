"""Where things are in a megatron checkpoint directory, read without building a model.

A megatron save directory holds ``latest_checkpointed_iteration.txt`` (an iteration number or
``release``) and one folder per saved iteration (``iter_0000100`` or ``release``); with the
``torch_dist`` format that folder is a torch.distributed.checkpoint whose ``.metadata`` lists
every tensor's global shape and dtype (whatever parallel layout wrote it) and which also holds
the "common state": the args the run was started with, the iteration, the checkpoint version.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron.rectify.checkpoint.errors import CheckpointToolError

TRACKER_FILE = "latest_checkpointed_iteration.txt"


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a distributed checkpoint: its global shape, whatever layout wrote it."""

    key: str
    shape: tuple[int, ...]
    dtype: str


def iteration_folder_name(marker: str | int) -> str:
    """megatron's folder name for a tracker value: ``release`` or ``iter_0000020``."""
    return "release" if marker == "release" else f"iter_{int(marker):07d}"


def saved_iterations(save_dir: str | os.PathLike) -> list[int]:
    """The iterations that have an ``iter_XXXXXXX`` folder in ``save_dir``, ascending."""
    save_dir = Path(save_dir)
    if not save_dir.is_dir():
        return []
    found = []
    for folder in save_dir.glob("iter_*"):
        digits = folder.name.removeprefix("iter_")
        if folder.is_dir() and digits.isdigit():
            found.append(int(digits))
    return sorted(found)


def read_tracker(save_dir: str | os.PathLike) -> str | None:
    """What ``latest_checkpointed_iteration.txt`` names: ``"release"``, an iteration number as
    text, or None when the file does not exist (megatron then starts from scratch). An empty or
    garbled file (a save or a copy that was cut short) raises :class:`CheckpointToolError`
    naming the file and the fix; megatron itself prints ERROR and exits 0 (megatron-core
    0.19.2 ``read_metadata``)."""
    save_dir = Path(save_dir)
    tracker = save_dir / TRACKER_FILE
    if not tracker.is_file():
        return None
    try:
        marker = tracker.read_text().strip()
    except (OSError, UnicodeDecodeError) as error:
        raise CheckpointToolError(f"cannot read {tracker}: {error}") from None
    if marker == "release" or (marker.isascii() and marker.isdigit()):
        return marker
    saved = saved_iterations(save_dir)
    what = "is empty" if not marker else f"holds {marker[:40]!r}, not an iteration number"
    if saved:
        fix = (
            f"write the iteration to resume from into it (the newest folder here is "
            f"{iteration_folder_name(saved[-1])}: echo {saved[-1]} > {tracker})"
        )
    else:
        fix = "there is no iter_* folder here: delete it to start from scratch"
    raise CheckpointToolError(f"{tracker} {what} (an interrupted save or copy?): {fix}")


def checkpoint_iteration_dir(save_dir: str | os.PathLike) -> Path:
    """The folder of the iteration the tracker file names (``release`` or ``iter_XXXXXXX``)."""
    save_dir = Path(save_dir)
    marker = read_tracker(save_dir)
    if marker is None:
        if (save_dir / "metadata.json").is_file():  # pointed at the iteration folder itself
            return save_dir
        raise CheckpointToolError(
            f"{save_dir} is not a megatron checkpoint directory: it has no {TRACKER_FILE} "
            "(pass the directory given to --save)."
        )
    folder = save_dir / iteration_folder_name(marker)
    if not folder.is_dir():
        raise CheckpointToolError(missing_iteration_message(save_dir, marker))
    if not (folder / "metadata.json").is_file():
        raise CheckpointToolError(
            f"{folder} has no metadata.json: only torch_dist (distributed) checkpoints are "
            "supported (train with --ckpt-format torch_dist, megatron's default)."
        )
    return folder


def missing_iteration_message(save_dir: str | os.PathLike, marker: str) -> str:
    """The tracker names an iteration whose folder is not there."""
    save_dir = Path(save_dir)
    saved = saved_iterations(save_dir)
    if saved:
        fix = f"write a saved iteration into it (saved here: {', '.join(map(str, saved[-5:]))})"
    else:
        fix = "there is no iter_* folder here: delete it to start from scratch"
    return (
        f"{save_dir / TRACKER_FILE} names {marker} but {save_dir / iteration_folder_name(marker)} "
        f"does not exist: {fix}"
    )


def read_common_state(save_dir: str | os.PathLike) -> dict[str, Any]:
    """The rank-independent state (args, iteration, checkpoint version), stored inside the
    torch_dist checkpoint (megatron-core 0.19) or in a ``common.pt`` (older checkpoints)."""
    from megatron.core.dist_checkpointing.serialization import load_common_state_dict

    return load_common_state_dict(checkpoint_iteration_dir(save_dir))


def read_checkpoint_args(save_dir: str | os.PathLike) -> argparse.Namespace:
    state = read_common_state(save_dir)
    if "args" not in state:
        raise CheckpointToolError(f"{save_dir}: the checkpoint has no saved args")
    return state["args"]


def read_tensor_entries(save_dir: str | os.PathLike) -> list[TensorEntry]:
    """Every tensor's key, global shape and dtype, from the checkpoint's metadata."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = FileSystemReader(str(checkpoint_iteration_dir(save_dir))).read_metadata()
    entries = []
    for key, item in metadata.state_dict_metadata.items():
        if isinstance(item, TensorStorageMetadata):
            dtype = str(item.properties.dtype).removeprefix("torch.")
            entries.append(TensorEntry(key, tuple(item.size), dtype))
    return sorted(entries, key=lambda entry: entry.key)


def read_full_tensors(save_dir: str | os.PathLike, keys: list[str] | None = None) -> dict:
    """Global (unsharded) tensors of a distributed checkpoint, by checkpoint key, in one
    process: what any layout of a training run would see assembled. For tests and audits of
    small models (it holds every requested tensor in memory)."""
    import torch
    from torch.distributed.checkpoint import FileSystemReader, load

    entries = {entry.key: entry for entry in read_tensor_entries(save_dir)}
    wanted = entries if keys is None else {key: entries[key] for key in keys}
    state = {
        key: torch.empty(entry.shape, dtype=getattr(torch, entry.dtype))
        for key, entry in wanted.items()
    }
    load(state, storage_reader=FileSystemReader(str(checkpoint_iteration_dir(save_dir))),
         no_dist=True)  # fmt: skip
    return state
