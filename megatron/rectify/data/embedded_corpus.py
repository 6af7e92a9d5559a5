"""The embedded default corpus: the Python standard library's own sources, cached.

:func:`ensure_embedded_corpus` turns the stdlib's ``*.py`` files (present wherever Python is)
into a megatron indexed dataset of byte-level tokens on first use and caches it, so a training
run needs no download. The cache entry is keyed by a hash of the settings *and* of the selected
files' contents, it is built in a temporary directory and renamed into place
(``megatron.rectify.atomic``), and builders take a file lock, so a changed setting (or another
Python version) rebuilds and a half-built cache is never read. Needs no GPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import shutil
import sys
import sysconfig
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from megatron.core.datasets.indexed_dataset import DType

from megatron.rectify.atomic import staged_directory, unique_tag
from megatron.rectify.data.indexed_writer import AtomicIndexedDatasetWriter, indexed_dataset_paths
from megatron.rectify.data.tokenizer import build_byte_tokenizer

logger = logging.getLogger(__name__)

__all__ = [
    "EMBEDDED_CORPUS_DEFAULT_MAX_BYTES",
    "EMBEDDED_CORPUS_SPLIT",
    "CACHE_ENV_VAR",
    "CorpusFile",
    "default_cache_dir",
    "select_stdlib_files",
    "ensure_embedded_corpus",
]

#: Default text budget. Python 3.12's stdlib has ~32 MB of ``*.py`` (about 60% in ``test/``),
#: so the default takes nearly all of it: ~31 M byte tokens, a .bin of ~62 MB (uint16).
EMBEDDED_CORPUS_DEFAULT_MAX_BYTES = 32 * 1024 * 1024
#: The recommended megatron ``--split`` for the embedded corpus. megatron splits by contiguous
#: document ranges; the corpus stores files in hash order, so valid and test are random files.
EMBEDDED_CORPUS_SPLIT = "98,1,1"
#: Environment variable overriding the cache directory.
CACHE_ENV_VAR = "MEGATRON_RECTIFY_DATA_CACHE"

_CORPUS_NAME = "stdlib"
_CORPUS_FORMAT_VERSION = 1
_CORPUS_SUBDIR = "embedded-stdlib"
_CORPUS_STAMP = "corpus.json"
_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})


@dataclasses.dataclass(frozen=True)
class CorpusFile:
    """One candidate source file: its path relative to the stdlib root and its size in bytes."""

    relpath: str
    size: int


def default_cache_dir() -> Path:
    """``$MEGATRON_RECTIFY_DATA_CACHE``, else ``<repo>/data/cache`` in a source checkout
    (git-ignored), else ``~/.cache/megatron-rectify`` (never inside site-packages)."""
    env = os.environ.get(CACHE_ENV_VAR)
    if env:
        return Path(env).expanduser()
    repo = Path(__file__).resolve().parents[3]  # <repo>/megatron/rectify/data/this file
    if (repo / "pyproject.toml").is_file() and (repo / "megatron" / "rectify").is_dir():
        return repo / "data" / "cache"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "megatron-rectify"


def _stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"]).resolve()


def _file_order_key(relpath: str) -> str:
    """Deterministic pseudo-random order: a file's place depends only on its own path.

    Sorted-path order would put whole packages (``asyncio/``, ``test/``) in one block, so a byte
    cap would keep only the first letters of the alphabet and megatron's contiguous
    train/valid/test split would hold out only ``xml``/``zoneinfo``. Hash order gives any cap a
    sample of the whole library and makes the held-out documents random files.
    """
    return hashlib.sha1(relpath.encode("utf-8")).hexdigest()


def _list_stdlib_sources(root: Path) -> list[CorpusFile]:
    """All non-empty ``*.py`` under ``root`` except third-party and bytecode directories."""
    found: list[CorpusFile] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _EXCLUDED_DIRS)
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            path = Path(dirpath) / name
            try:
                size = path.stat().st_size
            except OSError:
                continue
            if size > 0 and path.is_file():
                found.append(CorpusFile(path.relative_to(root).as_posix(), size))
    return found


def select_stdlib_files(
    max_bytes: int | None = EMBEDDED_CORPUS_DEFAULT_MAX_BYTES,
    max_files: int | None = None,
    root: str | os.PathLike[str] | None = None,
) -> list[CorpusFile]:
    """The files the embedded corpus takes, in document order.

    Files are visited in :func:`_file_order_key` order; one that would push the total past
    ``max_bytes`` is skipped (smaller ones after it may still fit), and the walk stops at
    ``max_files`` files. Files that are not valid UTF-8 are dropped later, when read (three test
    fixtures in 3.12). ``None`` means no cap.
    """
    if max_bytes is not None and max_bytes <= 0:
        raise ValueError(f"max_bytes must be positive, got {max_bytes}")
    if max_files is not None and max_files <= 0:
        raise ValueError(f"max_files must be positive, got {max_files}")
    candidates = _list_stdlib_sources(Path(root) if root is not None else _stdlib_root())
    candidates.sort(key=lambda f: _file_order_key(f.relpath))
    chosen: list[CorpusFile] = []
    total = 0
    for f in candidates:
        if max_files is not None and len(chosen) >= max_files:
            break
        if max_bytes is not None and total + f.size > max_bytes:
            continue
        chosen.append(f)
        total += f.size
    return chosen


def _read_utf8(path: Path) -> str | None:
    try:
        return path.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def _corpus_key(params: dict[str, Any], texts: list[tuple[str, str]]) -> str:
    """Hash of the build parameters and of every selected file's path and content."""
    h = hashlib.sha256(json.dumps(params, sort_keys=True).encode("utf-8"))
    for relpath, text in texts:
        h.update(b"\0F" + relpath.encode("utf-8") + b"\0")
        h.update(hashlib.sha256(text.encode("utf-8")).digest())
    return h.hexdigest()[:20]


def _stamp_ok(entry: Path, key: str) -> bool:
    """A cache entry is usable only if its stamp (written last, before the rename) matches and
    the data file has the size the stamp promises."""
    try:
        stamp = json.loads((entry / _CORPUS_STAMP).read_text("utf-8"))
        bin_path, idx_path = indexed_dataset_paths(entry / stamp["prefix_name"])
        expected = stamp["num_tokens"] * np.dtype(stamp["dtype"]).itemsize
        return (
            stamp.get("key") == key
            and idx_path.is_file()
            and bin_path.is_file()
            and bin_path.stat().st_size == expected
        )
    except (OSError, ValueError, KeyError, TypeError):
        return False


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Exclusive advisory lock so concurrent ranks build a cache entry once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _remove_stale_temporaries(base: Path, min_age_s: float = 3600.0) -> None:
    """Delete build directories left by killed builders. Called under the lock, so no local
    build is running; the age limit spares a build on another host of a shared filesystem
    (where ``flock`` may not reach)."""
    now = time.time()
    for tmp in base.glob(".tmp-*"):
        with contextlib.suppress(OSError):
            if now - tmp.stat().st_mtime > min_age_s:
                shutil.rmtree(tmp)


def _build_embedded_corpus(
    entry: Path, key: str, params: dict[str, Any], texts: list[tuple[str, str]]
) -> None:
    """Tokenize ``texts`` into ``entry/<name>_text_document`` via a temporary sibling directory
    (``.tmp-*``, which :func:`_remove_stale_temporaries` knows) that is renamed to ``entry`` only
    when complete (stamp included); a stale or foreign entry with our key is replaced."""
    tokenizer = build_byte_tokenizer()
    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    staging = entry.parent / f".tmp-{entry.name}-{unique_tag()}"
    with staged_directory(entry, staging) as tmp:
        prefix_name = f"{_CORPUS_NAME}_text_document"
        started = time.perf_counter()
        writer = AtomicIndexedDatasetWriter(tmp / prefix_name, dtype)
        eod = np.array([tokenizer.eod], dtype=dtype)
        with writer:
            for _, text in texts:
                writer.add_document(np.concatenate([tokenizer.tokenize_to_array(text), eod]))
            writer.commit()
        stamp = {
            "key": key,
            "format_version": _CORPUS_FORMAT_VERSION,
            "prefix_name": prefix_name,
            "params": params,
            "tokenizer": dict(tokenizer.unique_identifiers),
            "dtype": np.dtype(dtype).name,
            "num_documents": writer.num_documents,
            "num_tokens": writer.num_tokens,
            "python": sys.version.split()[0],
            "stdlib": str(_stdlib_root()),
            "build_seconds": round(time.perf_counter() - started, 3),
            "files": [relpath for relpath, _ in texts],
        }
        (tmp / _CORPUS_STAMP).write_text(json.dumps(stamp, indent=1) + "\n", "utf-8")


def ensure_embedded_corpus(
    cache_dir: str | os.PathLike[str] | None = None,
    max_bytes: int | None = EMBEDDED_CORPUS_DEFAULT_MAX_BYTES,
    max_files: int | None = None,
    *,
    log: Callable[[str], None] | None = None,
) -> str:
    """Build (first call) or reuse the embedded stdlib corpus; return its megatron data prefix.

    The returned string is what ``--data-path`` takes (``<prefix>.bin``/``.idx`` exist). Each
    source file is one document of UTF-8 byte ids (:class:`ByteTokenizer`) followed by EOD; use
    ``--split`` :data:`EMBEDDED_CORPUS_SPLIT` for train/valid/test.

    The cache entry lives in ``<cache_dir>/embedded-stdlib/<key>/`` where ``key`` hashes
    ``max_bytes``, ``max_files``, the tokenizer, the format version and the selected files'
    paths and contents, so any change builds a new entry and an unchanged call reuses the old
    one (reading the files to hash them takes well under a second). Entries for other settings
    are left alone. Safe to call from every rank at once: builders serialise on a lock file.
    """
    say = log or logger.info
    cache_root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    base = cache_root / _CORPUS_SUBDIR
    files = select_stdlib_files(max_bytes=max_bytes, max_files=max_files)
    root = _stdlib_root()
    texts = [(f.relpath, t) for f in files if (t := _read_utf8(root / f.relpath)) is not None]
    if not texts:
        raise RuntimeError(f"no readable UTF-8 *.py files found under {root} within the caps")
    params = {
        "corpus": _CORPUS_NAME,
        "format_version": _CORPUS_FORMAT_VERSION,
        "max_bytes": max_bytes,
        "max_files": max_files,
        "tokenizer": dict(build_byte_tokenizer().unique_identifiers),
    }
    key = _corpus_key(params, texts)
    entry = base / key
    prefix = str(entry / f"{_CORPUS_NAME}_text_document")
    if _stamp_ok(entry, key):
        return prefix
    try:
        with _file_lock(base / ".lock"):
            if not _stamp_ok(entry, key):  # another process may have built it meanwhile
                _remove_stale_temporaries(base)
                nbytes = sum(len(t.encode("utf-8")) for _, t in texts)
                say(
                    f"building the embedded corpus: {len(texts)} stdlib files, "
                    f"{nbytes / 1e6:.1f} MB -> {entry}"
                )
                _build_embedded_corpus(entry, key, params, texts)
    except PermissionError as exc:
        raise PermissionError(
            f"cannot write the corpus cache under {base} ({exc.strerror}); "
            f"set ${CACHE_ENV_VAR} or pass cache_dir"
        ) from exc
    return prefix
