"""Is a saved iteration's data readable, and which file is not?

A ``torch_dist`` iteration folder holds megatron's ``metadata.json``, torch.distributed.
checkpoint's ``.metadata`` (every item's file, byte offset and length) and the ``*.distcp``
shard files. Two levels of checking:

* :func:`quick_check` - cheap (no tensor data read): the index files parse, and every shard file
  exists and is as long as the index says. Catches truncated and missing files, the usual result
  of an interrupted copy or a full disk.
* :func:`verify_tensors` - reads every tensor through torch.distributed.checkpoint's own loader
  on the CPU (in groups of bounded memory) and, when a read fails, reads the failing group item
  by item to name the file. Catches garbled files too, as far as the format can tell: tensors
  are stored without checksums, so flipped bits inside tensor data are only found through
  megatron's ``--verify-integrity`` manifest (checked too when the checkpoint has one).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron.rectify.checkpoint.layout import iteration_folder_name, saved_iterations

DCP_INDEX = ".metadata"
MEGATRON_INDEX = "metadata.json"
INTEGRITY_MANIFEST = "integrity.json"  # megatron-core 0.19.2 --verify-integrity (validation.py)
#: Bytes of tensor data loaded at once by :func:`verify_tensors`.
VERIFY_GROUP_BYTES = 1 << 30


@dataclass(frozen=True)
class FileProblem:
    """One unusable file of an iteration folder and what is wrong with it."""

    path: Path
    what: str

    def __str__(self) -> str:
        return f"{self.path} {self.what}"


def _one_line(error: BaseException) -> str:
    import pickle

    if isinstance(error, pickle.UnpicklingError):  # torch's message is a page on weights_only
        return "garbled data, UnpicklingError"
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:200]}" if text else type(error).__name__


def read_storage_index(folder: str | os.PathLike) -> Any:
    """torch.distributed.checkpoint's ``Metadata`` of ``folder`` (raises when unreadable)."""
    from torch.distributed.checkpoint import FileSystemReader

    return FileSystemReader(str(folder)).read_metadata()


def quick_check(folder: str | os.PathLike) -> FileProblem | None:
    """The first missing, unparsable or truncated file of a ``torch_dist`` iteration folder,
    or None. Reads the index files only, not the tensor data."""
    folder = Path(folder)
    megatron_index = folder / MEGATRON_INDEX
    if not megatron_index.is_file():
        return FileProblem(megatron_index, "is missing")
    try:
        json.loads(megatron_index.read_text())
    except (OSError, ValueError) as error:
        return FileProblem(megatron_index, f"is unreadable ({_one_line(error)})")
    dcp_index = folder / DCP_INDEX
    if not dcp_index.is_file():
        return FileProblem(dcp_index, "is missing")
    try:
        metadata = read_storage_index(folder)
    except Exception as error:  # torch raises anything from EOFError to UnpicklingError
        return FileProblem(dcp_index, f"is unreadable ({_one_line(error)})")
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        end = int(info.offset) + int(info.length)
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), end)
    for name, size in sorted(needed.items()):
        path = folder / name
        if not path.is_file():
            return FileProblem(path, "is missing")
        actual = path.stat().st_size
        if actual < size:
            return FileProblem(path, f"is truncated ({actual:,} of {size:,} bytes)")
    return None


def previous_complete_iteration(save_dir: str | os.PathLike, before: int | None) -> int | None:
    """The newest ``iter_XXXXXXX`` of ``save_dir`` below ``before`` (any, when None) that
    passes :func:`quick_check`."""
    for iteration in reversed(saved_iterations(save_dir)):
        if before is not None and iteration >= before:
            continue
        if quick_check(Path(save_dir) / iteration_folder_name(iteration)) is None:
            return iteration
    return None


def _items_by_key(metadata: Any) -> dict[str, list[tuple[Any, Any]]]:
    by_key: dict[str, list[tuple[Any, Any]]] = {}
    for index, info in (metadata.storage_data or {}).items():
        by_key.setdefault(index.fqn, []).append((index, info))
    return by_key


def _read_item(folder: Path, info: Any, as_tensor: bool) -> None:
    """Read one stored item the way torch.distributed.checkpoint's ``FileSystemReader`` does
    (a ``torch.load`` of its byte range, tensors only: other items are pickled objects, which
    this check does not execute)."""
    import torch

    with open(folder / info.relative_path, "rb") as handle:
        handle.seek(int(info.offset))
        data = handle.read(int(info.length))
    if len(data) != int(info.length):
        raise EOFError(f"{len(data)} of {int(info.length)} bytes")
    if as_tensor and not info.transform_descriptors:
        torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def find_unreadable_item(
    folder: str | os.PathLike, keys: Iterable[str] | None = None, files: Iterable[str] = ()
) -> FileProblem | None:
    """Read the stored items of ``keys`` (every key when None), or those stored in ``files``,
    one by one; the first that fails names its file."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    folder = Path(folder)
    metadata = read_storage_index(folder)
    by_key = _items_by_key(metadata)
    wanted = set(by_key if keys is None else keys)
    files = set(files)
    for key in sorted(by_key):
        is_tensor = isinstance(metadata.state_dict_metadata.get(key), TensorStorageMetadata)
        for _, info in by_key[key]:
            if key not in wanted and info.relative_path not in files:
                continue
            try:
                _read_item(folder, info, is_tensor)
            except Exception as error:
                return FileProblem(
                    folder / info.relative_path,
                    f"is corrupt: reading {key} failed ({_one_line(error)})",
                )
    return None


def _tensor_groups(metadata: Any, group_bytes: int) -> list[list[str]]:
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    groups: list[list[str]] = [[]]
    size = 0
    for key, item in sorted(metadata.state_dict_metadata.items()):
        if not isinstance(item, TensorStorageMetadata):
            continue
        count = 1
        for dim in item.size:
            count *= int(dim)
        nbytes = count * item.properties.dtype.itemsize
        if groups[-1] and size + nbytes > group_bytes:
            groups.append([])
            size = 0
        groups[-1].append(key)
        size += nbytes
    return [group for group in groups if group]


def verify_manifest(folder: str | os.PathLike) -> FileProblem | None:
    """megatron's ``--verify-integrity`` SHA-256 manifest, when the checkpoint has one."""
    folder = Path(folder)
    manifest_path = folder / INTEGRITY_MANIFEST
    if not manifest_path.is_file():
        return None
    try:
        manifest = json.loads(manifest_path.read_text())
        files = dict(manifest["files"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        return FileProblem(manifest_path, f"is unreadable ({_one_line(error)})")
    if manifest.get("algorithm", "sha256") != "sha256":
        return None
    for name, expected in sorted(files.items()):
        path = folder / name
        digest = hashlib.sha256()
        try:
            with open(path, "rb") as handle:
                for chunk in iter(lambda handle=handle: handle.read(1 << 24), b""):
                    digest.update(chunk)
        except OSError as error:
            return FileProblem(path, f"is unreadable ({_one_line(error)})")
        if digest.hexdigest() != expected:
            return FileProblem(path, f"does not match its SHA-256 in {INTEGRITY_MANIFEST}")
    return None


@dataclass(frozen=True)
class VerifyResult:
    """What :func:`verify_tensors` read, and the first problem found (None: all readable)."""

    tensors: int
    bytes: int
    problem: FileProblem | None
    manifest_checked: bool


def verify_tensors(
    folder: str | os.PathLike, group_bytes: int = VERIFY_GROUP_BYTES
) -> VerifyResult:
    """Load every tensor of the iteration folder through torch.distributed.checkpoint on the
    CPU, ``group_bytes`` at a time; name the first unreadable file."""
    import torch
    from torch.distributed.checkpoint import FileSystemReader, load
    from torch.distributed.checkpoint.api import CheckpointException

    folder = Path(folder)
    problem = quick_check(folder)
    if problem is not None:
        return VerifyResult(0, 0, problem, False)
    metadata = read_storage_index(folder)
    tensors = total = 0
    for keys in _tensor_groups(metadata, group_bytes):
        state = {}
        for key in keys:
            item = metadata.state_dict_metadata[key]
            state[key] = torch.empty(tuple(item.size), dtype=item.properties.dtype)
        try:
            load(state, storage_reader=FileSystemReader(str(folder)), no_dist=True)
        except (Exception, CheckpointException) as error:  # CheckpointException: BaseException
            problem = find_unreadable_item(folder, keys) or FileProblem(
                folder, f"cannot be loaded ({_one_line(error)})"
            )
            return VerifyResult(tensors, total, problem, False)
        tensors += len(keys)
        total += sum(t.numel() * t.element_size() for t in state.values())
    manifest = verify_manifest(folder)
    return VerifyResult(tensors, total, manifest, (folder / INTEGRITY_MANIFEST).is_file())
