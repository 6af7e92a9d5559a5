"""Checks of the training data a run names, before megatron builds anything from it.

megatron-core 0.19.2 finds a bad data source late and badly: a missing prefix is an exception
deep in the dataset build of one rank (the others wait in a collective), a truncated ``.bin`` /
``.idx`` is a numpy error or a bus error inside the mmap, and a split that gets no token makes
``GPTDataset._get_num_epochs`` loop forever (it asks for at least one token even when it wants
0 samples). :func:`data_source_problem` finds each of these from the parsed arguments and the
``.idx`` headers, and says it in one line that names the flag or file and the fix.

Owns: reading a megatron ``.idx`` header and the sequence lengths. Must not build datasets,
open the ``.bin`` (only its size is read) or touch process groups.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

#: ``.idx`` header: magic (9 bytes), version (<Q), dtype code (<B), sequence count (<Q) and
#: document count (<Q); then int32 lengths, int64 pointers (per sequence), int64 document indices.
_HEADER = struct.Struct("<9sQBQQ")
_SPLIT_NAMES = ("train", "validation", "test")
_SPLIT_FLAGS = ("--train-data-path", "--valid-data-path", "--test-data-path")
_PER_SPLIT_KEYS = ("train", "valid", "test")
#: Splits offered when the given one leaves a split empty (the first that works is named).
_SUGGESTED_SPLITS = ("98,1,1", "90,5,5", "80,10,10", "60,20,20", "34,33,33")
MEGATRON_DEFAULT_SPLIT = "969, 30, 1"  # megatron-core 0.19.2's value when --split is not given
_REBUILD = "rebuild it with tools/preprocess_data.py"


class DataCheckError(ValueError):
    """A data source megatron cannot use; the message names the flag or file and the fix."""


@dataclass(frozen=True)
class IndexedDatasetSummary:
    """What the checks need from one ``PREFIX.idx``: its documents' token counts."""

    prefix: str
    sequence_lengths: np.ndarray  # one entry per sequence (a document, for GPT data)

    @property
    def num_documents(self) -> int:
        return int(self.sequence_lengths.shape[0])

    def has_tokens(self, begin: int, end: int) -> bool:
        return bool(np.any(self.sequence_lengths[begin:end]))


def data_source_problem(args: argparse.Namespace) -> str | None:
    """The first thing wrong with the run's data source (after megatron's ``validate_args``,
    which fills in ``args.split``), or None. ``--mock-data`` and no source at all are fine."""
    try:
        check_data_source(args)
    except DataCheckError as error:
        return str(error)
    return None


def check_data_source(args: argparse.Namespace) -> None:
    """Raise :class:`DataCheckError` for a missing list file, a missing or damaged prefix, or a
    split that megatron would build from no tokens."""
    if getattr(args, "mock_data", False):
        return
    for flag, value in (
        ("--data-path", args.data_path),
        ("--train-data-path", args.train_data_path),
        ("--valid-data-path", args.valid_data_path),
        ("--test-data-path", args.test_data_path),
    ):
        if value is not None and not value:
            raise DataCheckError(
                f"{flag} needs at least one dataset prefix: PREFIX (for PREFIX.bin and "
                "PREFIX.idx), or weights and prefixes: 0.3 A 0.7 B."
            )
    blend, blend_per_split = _blends(args)
    if blend is not None:
        flag = _blend_flag(args)
        summaries = [_summary(flag, prefix) for prefix in blend[0]]
        if None not in summaries:
            _check_split(args, blend, summaries)
    for index, split_blend in enumerate(blend_per_split or ()):
        if split_blend is None:
            continue
        flag = _per_split_flag(args, index)
        summaries = [_summary(flag, prefix) for prefix in split_blend[0]]
        if None in summaries:
            continue
        whole = [(summary, 0, summary.num_documents) for summary in summaries]
        starved = _starved(args, index, split_blend, whole)
        if starved is not None:
            raise DataCheckError(
                f"{flag}: {starved[0].prefix} has no tokens ({starved[1]} documents), and "
                f"megatron would hang building {_SPLIT_NAMES[index]} samples from it. Give a "
                f"dataset with tokens ({_REBUILD})."
            )


# ---- which prefixes -----------------------------------------------------------------------------


def _blends(args: argparse.Namespace) -> tuple[Any, Any]:
    """megatron's own ``(blend, blend_per_split)``, after making sure the list files it reads
    exist and hold what it expects."""
    from megatron.training.utils import get_blend_and_blend_per_split

    if args.data_args_path is not None:
        _read_list_file("--data-args-path", args.data_args_path)
    if args.per_split_data_args_path is not None:
        text = _read_list_file("--per-split-data-args-path", args.per_split_data_args_path)
        try:
            lists = json.loads(text)
        except ValueError as error:
            raise DataCheckError(
                f"--per-split-data-args-path {args.per_split_data_args_path} is not JSON "
                f"({error}): give a JSON object with 'train', 'valid' and 'test' lists."
            ) from None
        missing = [
            key for key in _PER_SPLIT_KEYS if not isinstance(lists, dict) or key not in lists
        ]
        if missing:
            raise DataCheckError(
                f"--per-split-data-args-path {args.per_split_data_args_path} lacks "
                f"{', '.join(repr(key) for key in missing)}: give a JSON object with 'train', "
                "'valid' and 'test' lists of dataset prefixes (and optional weights)."
            )
    try:
        return get_blend_and_blend_per_split(args)
    except (AssertionError, ValueError, TypeError, KeyError) as error:
        raise DataCheckError(
            f"{_blend_flag(args)}: megatron cannot read the dataset list "
            f"({str(error) or type(error).__name__}); give PREFIX, or weights and prefixes: "
            "0.3 A 0.7 B."
        ) from None


def _read_list_file(flag: str, path: str) -> str:
    try:
        with open(path, encoding="utf-8") as stream:
            return stream.read()
    except OSError as error:
        raise DataCheckError(
            f"{flag} {path}: cannot read it ({error.strerror}); give an existing file."
        ) from None


def _blend_flag(args: argparse.Namespace) -> str:
    if args.data_args_path is not None:
        return f"--data-args-path {args.data_args_path}"
    if args.data_path is not None:
        return "--data-path"
    if args.per_split_data_args_path is not None:
        return f"--per-split-data-args-path {args.per_split_data_args_path}"
    return "--train/valid/test-data-path"


def _per_split_flag(args: argparse.Namespace, index: int) -> str:
    if args.per_split_data_args_path is not None:
        return (
            f"--per-split-data-args-path {args.per_split_data_args_path} ({_PER_SPLIT_KEYS[index]})"
        )
    return _SPLIT_FLAGS[index]


# ---- one prefix ---------------------------------------------------------------------------------


def _summary(flag: str, prefix: str) -> IndexedDatasetSummary | None:
    """The prefix's index, after checking its files; None for object storage (megatron's
    multi-storage client reads ``scheme://`` prefixes; they are not checked here)."""
    if "://" in prefix:
        return None
    bin_path, idx_path = prefix + ".bin", prefix + ".idx"
    missing = [path for path in (bin_path, idx_path) if not os.path.isfile(path)]
    if missing:
        raise DataCheckError(f"{flag}: {_missing_message(prefix, missing)}")
    try:
        return read_index_summary(prefix)
    except DataCheckError as error:
        raise DataCheckError(f"{flag}: {error}") from None


def _missing_message(prefix: str, missing: list[str]) -> str:
    for suffix in (".bin", ".idx"):
        stem = prefix[: -len(suffix)]
        if prefix.endswith(suffix) and all(os.path.isfile(stem + s) for s in (".bin", ".idx")):
            return f"{prefix} is a file, not a dataset prefix: give {stem} (without {suffix})."
    hint = ""
    if any(character.isspace() for character in prefix):
        hint = " (weights and prefixes are separate words: --data-path 0.3 A 0.7 B)"
    if len(missing) == 2:
        return (
            f"no dataset at prefix {prefix}: neither {missing[0]} nor {missing[1]} exists{hint}. "
            "Give the output prefix of tools/preprocess_data.py (without .bin/.idx)."
        )
    return f"{missing[0]} does not exist (its pair is there): {_REBUILD}."


def read_index_summary(prefix: str) -> IndexedDatasetSummary:
    """Read ``PREFIX.idx`` the way megatron-core 0.19.2's ``_IndexReader`` does, but check every
    size first: the header against the ``.idx`` length, the last sequence against the ``.bin``
    length. Raises :class:`DataCheckError` naming the damaged file."""
    from megatron.core.datasets.indexed_dataset import _INDEX_HEADER, DType

    bin_path, idx_path = prefix + ".bin", prefix + ".idx"
    idx_size = os.path.getsize(idx_path)
    with open(idx_path, "rb") as stream:
        head = stream.read(_HEADER.size)
    if len(head) < _HEADER.size or not head.startswith(_INDEX_HEADER):
        damage = "is truncated" if _INDEX_HEADER.startswith(head[:9]) else "is not a megatron index"
        raise DataCheckError(f"{idx_path} {damage} (bad header, {idx_size} bytes): {_REBUILD}.")
    _, version, code, num_sequences, num_documents = _HEADER.unpack(head)
    try:
        itemsize = DType.size(DType.dtype_from_code(code))
    except (KeyError, ValueError):
        raise DataCheckError(f"{idx_path}: unknown token dtype code {code}: {_REBUILD}.") from None
    if version != 1:
        raise DataCheckError(f"{idx_path}: index version {version}, megatron reads 1: {_REBUILD}.")
    needed = _HEADER.size + num_sequences * (4 + 8) + num_documents * 8
    if idx_size < needed:
        raise DataCheckError(
            f"{idx_path} is truncated: its header lists {num_sequences} sequences, which need "
            f"{needed} bytes, but the file has {idx_size}: {_REBUILD}."
        )
    if num_sequences == 0:
        return IndexedDatasetSummary(prefix, np.zeros(0, dtype=np.int32))
    lengths = np.memmap(
        idx_path, dtype=np.int32, mode="r", offset=_HEADER.size, shape=(num_sequences,)
    )
    with open(idx_path, "rb") as stream:
        stream.seek(_HEADER.size + num_sequences * 4 + (num_sequences - 1) * 8)
        (last_pointer,) = struct.unpack("<q", stream.read(8))
    bin_needed = last_pointer + int(lengths[-1]) * itemsize
    bin_size = os.path.getsize(bin_path)
    if bin_size < bin_needed:
        raise DataCheckError(
            f"{bin_path} is truncated: its index {idx_path} needs {bin_needed} bytes of tokens, "
            f"the file has {bin_size}: {_REBUILD}."
        )
    return IndexedDatasetSummary(prefix, lengths)


# ---- the split ----------------------------------------------------------------------------------


def _starved(args: argparse.Namespace, index: int, blend: Any, ranges: list) -> Any:
    """``(summary, documents)`` of a dataset whose part in split ``index`` (``ranges``: one
    ``(summary, begin, end)`` per prefix of ``blend``) megatron would build from no tokens, or
    None. Weighted blends and single prefixes ask each dataset for a sample count, and
    ``_get_num_epochs`` wants ``samples * seq_length + 1`` tokens even for 0 samples: one empty
    dataset hangs. An unweighted blend of several builds one epoch of each (no count) and
    blends them by length: only all of them empty is unusable. ``--full-validation`` builds the
    validation split as one epoch."""
    if index == 1 and getattr(args, "full_validation", False):
        return None
    empty = [
        (summary, end - begin)
        for summary, begin, end in ranges
        if not summary.has_tokens(begin, end)
    ]
    prefixes, weights = blend
    if weights is None and len(prefixes) > 1 and len(empty) < len(ranges):
        return None
    return empty[0] if empty else None


def _split_matrix(split: str) -> list:
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix,
        parse_and_normalize_split,
    )

    try:
        vector = parse_and_normalize_split(split)  # 0 / 0 for an all-zero split: NaN, no error
    except (AssertionError, ValueError, ZeroDivisionError):
        return []
    if not all(math.isfinite(share) for share in vector):
        return []
    return convert_split_vector_to_split_matrix(vector)


def _empty_split(args: argparse.Namespace, split: str, blend: Any, summaries: list) -> Any:
    """``(split index, summary, documents in the split)`` of the first empty split, or None."""
    matrix = _split_matrix(split)
    for index, bounds in enumerate(matrix):
        if bounds is None:  # a 0 share: megatron builds no dataset for the split
            continue
        # megatron's _build_megatron_dataset_splits: rounded book-ends over the sequences
        ranges = [
            (
                summary,
                int(round(bounds[0] * float(summary.num_documents))),
                int(round(bounds[1] * float(summary.num_documents))),
            )
            for summary in summaries
        ]
        starved = _starved(args, index, blend, ranges)
        if starved is not None:
            return index, *starved
    return None


def _check_split(args: argparse.Namespace, blend: Any, summaries: list) -> None:
    split = args.split
    matrix = _split_matrix(split)
    if len(matrix) != 3 or not any(bounds is not None for bounds in matrix):
        raise DataCheckError(
            f"--split {split!r}: give three non-negative proportions for train, validation and "
            "test with a positive sum, e.g. --split 98,1,1."
        )
    empty = _empty_split(args, split, blend, summaries)
    if empty is None:
        return
    index, summary, documents = empty
    default = " (megatron's default)" if split == MEGATRON_DEFAULT_SPLIT else ""
    fits = [s for s in _SUGGESTED_SPLITS if _empty_split(args, s, blend, summaries) is None]
    if fits:
        fix = f"give every split a share of at least one document (e.g. --split {fits[0]})"
    else:
        fix = "use a larger dataset"
    what = "no tokens" if documents else "no document"
    raise DataCheckError(
        f"--split '{split}'{default} gives the {_SPLIT_NAMES[index]} split of {summary.prefix} "
        f"{what} ({documents} of its {summary.num_documents} documents), and megatron would "
        f"wait forever for its samples (--eval-iters 0 does not avoid it): {fix}, or set its share "
        "to 0 to leave it out (e.g. --split 100,0,0 --eval-iters 0 to train only)."
    )
