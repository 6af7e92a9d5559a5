"""Writing megatron indexed datasets (``<prefix>.bin`` + ``<prefix>.idx``) all at once.

:class:`AtomicIndexedDatasetWriter` wraps megatron-core's ``IndexedDatasetBuilder`` so that the
pair appears only once complete; ``tools/preprocess_data.py`` and the embedded corpus write
through it. The temporary names, fsync and renames are ``megatron.rectify.atomic``'s.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

from megatron.rectify.atomic import fsync_file, publish_file, signals_deferred, unique_tag

__all__ = ["AtomicIndexedDatasetWriter", "indexed_dataset_paths"]


def indexed_dataset_paths(prefix: str | os.PathLike[str]) -> tuple[Path, Path]:
    """``(<prefix>.bin, <prefix>.idx)``: the pair megatron's ``IndexedDataset(prefix)`` reads."""
    prefix = os.fspath(prefix)
    return Path(prefix + ".bin"), Path(prefix + ".idx")


class AtomicIndexedDatasetWriter:
    """megatron-core's ``IndexedDatasetBuilder`` writing to temporary names, renamed on commit.

    The data goes to ``<prefix>.bin.tmp-<pid>-<random>`` and the index, at :meth:`commit`, to a
    matching temporary ``.idx``; then the old ``.idx`` is removed, the ``.bin`` renamed into
    place and the ``.idx`` last. megatron only opens a prefix whose ``.idx`` exists, so a crash at
    any point leaves either the previous dataset, no dataset, or the new one, never a mix.
    :meth:`abort` (or leaving the ``with`` block on an exception) deletes the temporaries.
    """

    def __init__(self, prefix: str | os.PathLike[str], dtype: type[np.number]) -> None:
        self.prefix = os.fspath(prefix)
        self.bin_path, self.idx_path = indexed_dataset_paths(self.prefix)
        self.dtype = dtype
        self.bin_path.parent.mkdir(parents=True, exist_ok=True)
        tag = f".tmp-{unique_tag()}"
        self._tmp_bin = self.bin_path.with_name(self.bin_path.name + tag)
        self._tmp_idx = self.idx_path.with_name(self.idx_path.name + tag)
        self._builder: IndexedDatasetBuilder | None = IndexedDatasetBuilder(
            str(self._tmp_bin), dtype=dtype
        )
        self._finalized = False
        self.num_documents = 0
        self.num_tokens = 0

    def add_document(self, tokens: np.ndarray | Sequence[int]) -> None:
        """Append one document (one sequence); ``tokens`` must fit ``dtype``."""
        assert self._builder is not None, "writer already committed or aborted"
        array = np.asarray(tokens)
        self._builder.add_document(array, [int(array.size)])
        self.num_documents += 1
        self.num_tokens += int(array.size)

    def finalize(self) -> None:
        """Write the temporary index and flush both temporaries to disk; the first half of
        :meth:`commit` (for multi-output tools that want every output complete before renaming
        any)."""
        assert self._builder is not None, "writer already committed or aborted"
        if not self._finalized:
            self._builder.finalize(str(self._tmp_idx))
            fsync_file(self._tmp_bin)
            fsync_file(self._tmp_idx)
            self._finalized = True

    def commit(self) -> tuple[Path, Path]:
        """Finalize if needed and move the pair into place; returns the final paths. SIGINT
        and SIGTERM are blocked in the calling thread meanwhile (a handler that raises, such as
        Python's SIGINT one, could otherwise leave the new ``.bin`` without its ``.idx``; a
        program with other threads defers its handlers itself, as tools/preprocess_data.py)."""
        self.finalize()
        with signals_deferred():
            self.idx_path.unlink(missing_ok=True)
            publish_file(self._tmp_bin, self.bin_path, flushed=True)
            publish_file(self._tmp_idx, self.idx_path, flushed=True)
            self._builder = None
        return self.bin_path, self.idx_path

    def abort(self) -> None:
        """Delete the temporaries (safe to call more than once)."""
        if self._builder is not None:
            with contextlib.suppress(Exception):
                self._builder.data_file.close()
            self._builder = None
        for path in (self._tmp_bin, self._tmp_idx):
            path.unlink(missing_ok=True)

    def __enter__(self) -> AtomicIndexedDatasetWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None or self._builder is not None:
            self.abort()  # an exception, or the block ended without commit()
