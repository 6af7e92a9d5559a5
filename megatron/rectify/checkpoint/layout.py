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


def checkpoint_iteration_dir(save_dir: str | os.PathLike) -> Path:
    """The folder of the iteration the tracker file names (``release`` or ``iter_XXXXXXX``)."""
    save_dir = Path(save_dir)
    tracker = save_dir / TRACKER_FILE
    if not tracker.is_file():
        if (save_dir / "metadata.json").is_file():  # pointed at the iteration folder itself
            return save_dir
        raise CheckpointToolError(
            f"{save_dir} is not a megatron checkpoint directory: it has no {TRACKER_FILE} "
            "(pass the directory given to --save)."
        )
    marker = tracker.read_text().strip()
    folder = save_dir / ("release" if marker == "release" else f"iter_{int(marker):07d}")
    if not (folder / "metadata.json").is_file():
        raise CheckpointToolError(
            f"{folder} has no common.pt: only torch_dist (distributed) checkpoints are supported "
            "(train with --ckpt-format torch_dist, megatron's default)."
        )
    return folder


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
