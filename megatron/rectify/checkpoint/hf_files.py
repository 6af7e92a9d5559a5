"""Reading and writing Hugging Face checkpoint folders (``config.json`` + safetensors shards).

Reads are lazy (one tensor at a time through ``safe_open``) so importing a large model never
holds two copies of it; the reader remembers which tensors were used, so a tensor the mapping
ignored (a bias, an extra head) is reported instead of silently dropped.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from megatron.rectify.checkpoint.errors import CheckpointToolError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
#: Buffers some exporters store that carry no learned weights.
IGNORABLE_SUFFIXES = (".rotary_emb.inv_freq",)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


class HFCheckpointReader:
    """A Hugging Face model folder: its config and its tensors by name, read on demand."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        config_path = self.folder / "config.json"
        if not config_path.is_file():
            raise CheckpointToolError(f"{self.folder} has no config.json: not a HF model folder")
        self.config: dict[str, Any] = json.loads(config_path.read_text())
        self._files: dict[str, Path] | None = None  # found on first use: config errors first
        self._handles: dict[Path, Any] = {}
        self.used: set[str] = set()

    def _tensor_files(self) -> dict[str, Path]:
        index = self.folder / INDEX_FILE
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            return {name: self.folder / file for name, file in weight_map.items()}
        single = self.folder / SINGLE_FILE
        if single.is_file():
            from safetensors import safe_open

            with safe_open(str(single), "pt") as handle:
                return dict.fromkeys(handle.keys(), single)
        raise CheckpointToolError(
            f"{self.folder} has no {SINGLE_FILE} or {INDEX_FILE} (only safetensors checkpoints "
            "are read; convert .bin files with transformers' save_pretrained first)."
        )

    @property
    def _file_of(self) -> dict[str, Path]:
        if self._files is None:
            self._files = self._tensor_files()
        return self._files

    def require_weights(self) -> None:
        """Fail now (not after minutes of model building) if the folder has no weights."""
        self._file_of  # noqa: B018 - the property finds the files or raises

    @property
    def names(self) -> set[str]:
        return set(self._file_of)

    def read(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        if name not in self._file_of:
            raise CheckpointToolError(f"{self.folder}: the checkpoint has no tensor {name}")
        path = self._file_of[name]
        if path not in self._handles:
            self._handles[path] = safe_open(str(path), "pt")
        self.used.add(name)
        return self._handles[path].get_tensor(name)

    def unused(self) -> list[str]:
        return sorted(
            name for name in self.names - self.used if not name.endswith(IGNORABLE_SUFFIXES)
        )


def write_hf_checkpoint(
    folder: Path,
    config: dict[str, Any],
    tensors: Iterable[tuple[str, torch.Tensor]],
    dtype: str,
    max_shard_bytes: int,
) -> int:
    """Write ``tensors`` (cast to ``dtype``) into safetensors shards of at most
    ``max_shard_bytes``, the index and ``config.json``; returns the number of tensors.

    A shard is written as soon as it is full, so at most one shard is held in memory beside
    the model. (Tensors are cloned: safetensors refuses views that share storage, such as the
    gate and up halves of one ``linear_fc1``.)
    """
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    written: list[tuple[Path, list[str]]] = []
    shard: dict[str, torch.Tensor] = {}
    shard_bytes = total_bytes = 0

    def flush() -> None:
        path = folder / f"shard-{len(written) + 1:05d}.partial"
        save_file(shard, str(path), metadata={"format": "pt"})
        written.append((path, list(shard)))
        shard.clear()

    for name, tensor in tensors:
        tensor = tensor.detach().to(DTYPES[dtype]).contiguous().clone()
        size = tensor.numel() * tensor.element_size()
        if shard and shard_bytes + size > max_shard_bytes:
            flush()
            shard_bytes = 0
        shard[name] = tensor
        shard_bytes += size
        total_bytes += size
    if shard or not written:
        flush()
    weight_map = {}
    for number, (path, names) in enumerate(written, start=1):
        if len(written) == 1:
            final = SINGLE_FILE
        else:
            final = f"model-{number:05d}-of-{len(written):05d}.safetensors"
        path.rename(folder / final)
        weight_map.update(dict.fromkeys(names, final))
    if len(written) > 1:
        index = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
        (folder / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True))
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    return len(weight_map)
