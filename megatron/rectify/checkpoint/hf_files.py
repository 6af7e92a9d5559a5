"""Reading and writing Hugging Face checkpoint folders (``config.json`` + safetensors shards).

Reads are lazy (one tensor at a time through ``safe_open``) so importing a large model never
holds two copies of it; the reader remembers which tensors were used, so a tensor the mapping
ignored (a bias, an extra head) is reported instead of silently dropped.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
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
        self.config: dict[str, Any] = read_json_object(config_path)
        self._files: dict[str, Path] | None = None  # found on first use: config errors first
        self._handles: dict[Path, Any] = {}
        self.used: set[str] = set()

    def _tensor_files(self) -> dict[str, Path]:
        index = self.folder / INDEX_FILE
        if index.is_file():
            weight_map = read_json_object(index).get("weight_map")
            if not isinstance(weight_map, dict) or not all(
                isinstance(file, str) for file in weight_map.values()
            ):
                raise CheckpointToolError(
                    f'{index} has no "weight_map" object of tensor name -> file name: '
                    "re-create it (transformers' save_pretrained writes it)"
                )
            return {name: self.folder / file for name, file in weight_map.items()}
        single = self.folder / SINGLE_FILE
        if single.is_file():
            return dict.fromkeys(_open_safetensors(single).keys(), single)
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
        if name not in self._file_of:
            raise CheckpointToolError(f"{self.folder}: the checkpoint has no tensor {name}")
        path = self._file_of[name]
        if path not in self._handles:
            if not path.is_file():
                raise CheckpointToolError(f"{path} is missing (named by {INDEX_FILE})")
            self._handles[path] = _open_safetensors(path)
        self.used.add(name)
        try:
            return self._handles[path].get_tensor(name)
        except Exception as error:  # safetensors raises its own error types
            raise CheckpointToolError(
                f"{path}: cannot read tensor {name} ({_first_line(error)}): the file is "
                "damaged or incomplete; download or copy it again"
            ) from None

    def unused(self) -> list[str]:
        return sorted(
            name for name in self.names - self.used if not name.endswith(IGNORABLE_SUFFIXES)
        )


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:200]}" if lines else type(error).__name__


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON file that must hold an object; anything else is one line naming the file."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise CheckpointToolError(
            f"{path} is not valid JSON ({error.msg} at line {error.lineno} column "
            f"{error.colno}): fix or re-download it"
        ) from None
    except (OSError, UnicodeDecodeError) as error:
        raise CheckpointToolError(f"cannot read {path} ({_first_line(error)})") from None
    if not isinstance(value, dict):
        raise CheckpointToolError(
            f"{path} holds a JSON {type(value).__name__}, not an object of settings: fix or "
            "re-download it"
        )
    return value


def _open_safetensors(path: Path) -> Any:
    from safetensors import safe_open

    try:
        return safe_open(str(path), "pt")
    except Exception as error:  # SafetensorError, OSError, ...
        raise CheckpointToolError(
            f"{path} is not a readable safetensors file ({_first_line(error)}): the file is "
            "damaged or incomplete; download or copy it again"
        ) from None


def write_hf_checkpoint(
    folder: Path,
    config: dict[str, Any],
    tensors: Iterable[tuple[str, torch.Tensor]],
    dtype: str,
    max_shard_bytes: int,
    on_tensor: Callable[[int], None] | None = None,
) -> int:
    """Write ``tensors`` (cast to ``dtype``) into safetensors shards of at most
    ``max_shard_bytes``, the index and ``config.json``; returns the number of tensors.
    ``on_tensor(nbytes)`` is called after each tensor is taken (progress).

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
        if on_tensor is not None:
            on_tensor(size)
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
