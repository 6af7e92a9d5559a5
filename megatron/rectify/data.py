"""Data for megatron-rectify: a byte-level tokenizer and an embedded default corpus.

Two things a training run needs before it can start and that must not depend on a download:

* **A tokenizer.** :class:`ByteTokenizer` maps every UTF-8 byte to its own token id (0-255) and
  adds one end-of-document id (256); ``vocab_size`` is 257. It is a real megatron-core tokenizer
  (a :class:`~megatron.core.tokenizers.text.text_tokenizer.MegatronTokenizerText`, the class every
  tokenizer that ``megatron.training`` builds in 0.19 is), so ``GPTDataset``, the pretrain script
  and checkpoints treat it like any other. megatron-core 0.19.2 ships a ``ByteLevelTokenizer``
  library, but ``build_tokenizer(args)`` cannot select it (no ``--tokenizer-type`` for it) and it
  does not round-trip text (``ids_to_text`` strips trailing whitespace, its default EOD id 0 is
  also the NUL byte, and an EOD id of 256 makes it raise), hence this small class.
  :func:`install_byte_level_tokenizer` teaches ``megatron.training`` the value
  ``--tokenizer-type ByteLevel``.

* **A corpus.** :func:`ensure_embedded_corpus` turns the Python standard library's own ``*.py``
  sources (present wherever Python is) into a megatron indexed dataset on first use and caches
  it. The cache entry is keyed by a hash of the settings *and* of the selected files' contents, it
  is built in a temporary directory and renamed into place, and builders take a file lock, so a
  changed setting (or another Python version) rebuilds and a half-built cache is never read.

Indexed datasets are written through :class:`AtomicIndexedDatasetWriter`, which wraps
megatron-core's ``IndexedDatasetBuilder`` so that ``<prefix>.bin``/``<prefix>.idx`` appear only
once complete (``tools/preprocess_data.py`` uses it too).

None of this needs a GPU or the CPU emulation layer.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import functools
import hashlib
import importlib
import importlib.util
import json
import logging
import os
import shutil
import sys
import sysconfig
import tempfile
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder
from megatron.core.tokenizers.text.libraries.abstract_tokenizer import (
    MegatronTokenizerTextAbstract,
)
from megatron.core.tokenizers.text.text_tokenizer import MegatronTokenizerText

logger = logging.getLogger(__name__)

__all__ = [
    "BYTE_LEVEL_TOKENIZER_TYPE",
    "BYTE_VOCAB_SIZE",
    "BYTE_EOD_ID",
    "BYTE_PAD_ID",
    "ByteLevelCodec",
    "ByteTokenizer",
    "build_byte_tokenizer",
    "build_tokenizer",
    "add_byte_level_tokenizer_choice",
    "install_byte_level_tokenizer",
    "AtomicIndexedDatasetWriter",
    "indexed_dataset_paths",
    "EMBEDDED_CORPUS_DEFAULT_MAX_BYTES",
    "EMBEDDED_CORPUS_SPLIT",
    "CACHE_ENV_VAR",
    "CorpusFile",
    "default_cache_dir",
    "select_stdlib_files",
    "ensure_embedded_corpus",
]

# --------------------------------------------------------------------------------------------
# Byte-level tokenizer
# --------------------------------------------------------------------------------------------

#: The ``--tokenizer-type`` value for :class:`ByteTokenizer` (training and preprocessing).
BYTE_LEVEL_TOKENIZER_TYPE = "ByteLevel"
#: 256 byte values plus the end-of-document id.
BYTE_VOCAB_SIZE = 257
#: End-of-document id: outside the byte range, so a NUL byte in the text stays a NUL byte.
BYTE_EOD_ID = 256
#: No padding token, as megatron's ``NullTokenizer``: ``GPTDataset`` pads a short sample with this
#: id, masks its loss and maps it to token 0 before the embedding, so it never reaches the model.
BYTE_PAD_ID = -1

_BYTE_TOKENS = tuple(f"<0x{b:02X}>" for b in range(256))  # SentencePiece byte-fallback spelling
_EOD_TOKEN = "<eod>"


class ByteLevelCodec(MegatronTokenizerTextAbstract):
    """The "library" half of :class:`ByteTokenizer`: text <-> UTF-8 byte ids.

    megatron-core splits a tokenizer into a library object (text_to_ids, ids_to_text, special
    ids) and a :class:`MegatronTokenizerText` wrapper that the training code talks to; this is
    the library object. Token strings are spelled ``<0xNN>`` (as SentencePiece's byte fallback)
    and ``<eod>``, so that ``vocab`` is a proper str -> id mapping.
    """

    def __init__(self) -> None:
        self._vocab = {tok: i for i, tok in enumerate(_BYTE_TOKENS)}
        self._vocab[_EOD_TOKEN] = BYTE_EOD_ID

    # --- text <-> ids -------------------------------------------------------------------------
    def text_to_ids(self, text: str) -> list[int]:
        """UTF-8 bytes of ``text`` (strict: lone surrogates raise, as they are not text)."""
        return list(text.encode("utf-8"))

    def ids_to_text(self, ids: Sequence[int], remove_special_tokens: bool = True) -> str:
        """Inverse of :meth:`text_to_ids` (exact for any valid UTF-8 text).

        Ids outside 0-255 (EOD, padding) carry no text and are dropped. A model may generate a
        byte sequence that is not valid UTF-8; such bytes become U+FFFD rather than an error.
        """
        data = bytes(int(i) for i in ids if 0 <= int(i) < 256)
        return data.decode("utf-8", errors="replace")

    def text_to_tokens(self, text: str) -> list[str]:
        return [_BYTE_TOKENS[b] for b in text.encode("utf-8")]

    def tokens_to_text(self, tokens: Sequence[str]) -> str:
        return self.ids_to_text(self.tokens_to_ids(tokens))

    def tokens_to_ids(self, tokens: str | Sequence[str]) -> list[int]:
        if isinstance(tokens, str):
            tokens = [tokens]
        try:
            return [self._vocab[t] for t in tokens]
        except KeyError as exc:
            raise ValueError(f"not a byte-level token: {exc.args[0]!r}") from None

    def ids_to_tokens(self, ids: int | Sequence[int]) -> list[str]:
        if isinstance(ids, int):
            ids = [ids]
        return [_BYTE_TOKENS[i] if 0 <= i < 256 else self._special_token(i) for i in ids]

    @staticmethod
    def _special_token(i: int) -> str:
        if i == BYTE_EOD_ID:
            return _EOD_TOKEN
        raise ValueError(f"token id {i} is outside the byte-level vocabulary (0-{BYTE_EOD_ID})")

    def offsets(self, ids: Sequence[int], text: str) -> list[int]:
        """Character offset in ``text`` at which each token starts.

        A byte that continues a multi-byte character (``0b10xxxxxx``) starts inside the
        character that began before it, so it reports that character's offset.
        """
        out: list[int] = []
        chars = 0
        for i in ids:
            if 0 <= i < 256 and (i & 0xC0) != 0x80:  # a character's first byte
                out.append(chars)
                chars += 1
            else:
                out.append(max(chars - 1, 0) if 0 <= i < 256 else chars)
        return out

    def add_special_tokens(self, special_tokens: Any = None) -> None:
        raise NotImplementedError("the byte-level vocabulary is fixed (256 bytes + <eod>)")

    # --- vocabulary and special ids -----------------------------------------------------------
    @property
    def vocab(self) -> dict[str, int]:
        return dict(self._vocab)

    @property
    def inv_vocab(self) -> dict[int, str]:
        return {i: t for t, i in self._vocab.items()}

    @property
    def vocab_size(self) -> int:
        return BYTE_VOCAB_SIZE

    @property
    def eod(self) -> int:
        return BYTE_EOD_ID

    @property
    def eos_id(self) -> int:
        return BYTE_EOD_ID

    @property
    def pad_id(self) -> int:
        return BYTE_PAD_ID

    @property
    def bos_id(self) -> None:
        return None

    @property
    def unk_id(self) -> None:
        return None  # every byte string is representable

    @property
    def mask_id(self) -> None:
        return None

    @property
    def cls_id(self) -> None:
        return None

    @property
    def sep_id(self) -> None:
        return None

    @property
    def additional_special_tokens_ids(self) -> list[int]:
        return []


class ByteTokenizer(MegatronTokenizerText):
    """Byte-level tokenizer with megatron-core's tokenizer interface.

    ``tokenize``/``detokenize``, ``vocab_size`` (257), ``eod``/``eos`` (256), ``pad`` (-1: none),
    ``vocab``, ``offsets`` and ``unique_identifiers`` (which megatron's dataset cache hashes) all
    behave as for the tokenizers ``megatron.training`` builds itself. Build it with
    :func:`build_byte_tokenizer` or, in a megatron run, ``--tokenizer-type ByteLevel`` after
    :func:`install_byte_level_tokenizer`.
    """

    def __init__(self) -> None:
        config = {
            "library": "byte-level",
            "model_type": "gpt",
            "chat_template": None,
            "class_name": type(self).__name__,
            "class_path": type(self).__module__,
        }
        super().__init__(None, config)

    def _restore_model(self, **kwargs: Any) -> ByteLevelCodec:
        # megatron-core would look the library class up by name among its own libraries.
        return ByteLevelCodec()

    def tokenize_to_array(self, text: str) -> np.ndarray:
        """Fast path for bulk preprocessing: the UTF-8 bytes of ``text`` as a uint8 array."""
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)

    @property
    def unique_identifiers(self) -> OrderedDict:
        return OrderedDict(
            [
                ("class", f"{type(self).__module__}.{type(self).__qualname__}"),
                ("vocab_size", BYTE_VOCAB_SIZE),
                ("eod", BYTE_EOD_ID),
                ("pad", BYTE_PAD_ID),
            ]
        )

    def __repr__(self) -> str:
        return f"ByteTokenizer(vocab_size={BYTE_VOCAB_SIZE}, eod={BYTE_EOD_ID})"


def build_byte_tokenizer() -> ByteTokenizer:
    """The byte-level tokenizer (stateless; every call returns an equivalent object)."""
    return ByteTokenizer()


# --------------------------------------------------------------------------------------------
# megatron.training integration
# --------------------------------------------------------------------------------------------


def _require_transformers(args: argparse.Namespace) -> None:
    """Fail early and clearly where megatron would fail late or try to download.

    megatron's ``HuggingFaceTokenizer`` wraps ``transformers.AutoTokenizer``; without
    ``transformers`` it dies with a ``NameError``, and given a name that is not a local path
    ``AutoTokenizer`` tries the Hugging Face Hub.
    """
    if importlib.util.find_spec("transformers") is None:
        raise RuntimeError(
            "--tokenizer-type HuggingFaceTokenizer needs the 'transformers' package, which is not "
            "installed (pip install transformers)"
        )
    if not args.tokenizer_model:
        raise RuntimeError("--tokenizer-type HuggingFaceTokenizer needs --tokenizer-model DIR")


def build_tokenizer(args: argparse.Namespace, **kwargs: Any) -> Any:
    """megatron-core's ``build_tokenizer(args)`` plus ``args.tokenizer_type == "ByteLevel"``.

    For ``ByteLevel`` it also sets ``args.padded_vocab_size`` exactly as megatron does for its own
    tokenizers (257 rounded up to ``make_vocab_size_divisible_by * TP``), since model building
    reads that attribute. Every other type goes to megatron-core unchanged.
    """
    # The module, not the same-named function in it (megatron.training imported the latter).
    core_build = importlib.import_module("megatron.core.tokenizers.utils.build_tokenizer")

    if getattr(args, "tokenizer_type", None) == BYTE_LEVEL_TOKENIZER_TYPE:
        tokenizer = build_byte_tokenizer()
        if (
            getattr(args, "pad_vocab_size", True)
            and getattr(args, "padded_vocab_size", None) is None
        ):
            core_build._set_padded_vocab_size(args, tokenizer)
        return tokenizer
    if getattr(args, "tokenizer_type", None) == "HuggingFaceTokenizer":
        _require_transformers(args)
    return core_build.build_tokenizer(args, **kwargs)


def add_byte_level_tokenizer_choice(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Let ``--tokenizer-type`` accept ``ByteLevel`` on a parser that has megatron's tokenizer
    arguments (megatron derives the choices from a ``Literal`` type, so they cannot be extended
    by declaring the argument again). Returns ``parser``, so it also works as (part of) an
    ``extra_args_provider``."""
    action = parser._option_string_actions.get("--tokenizer-type")  # noqa: SLF001 (argparse)
    if action is None:
        raise ValueError("parser has no --tokenizer-type argument (add megatron's args first)")
    choices = tuple(action.choices or ())
    if BYTE_LEVEL_TOKENIZER_TYPE not in choices:
        action.choices = (*choices, BYTE_LEVEL_TOKENIZER_TYPE)
    return parser


def install_byte_level_tokenizer() -> None:
    """Teach ``megatron.training`` (0.19) the ``--tokenizer-type ByteLevel`` option.

    Patches two module attributes, idempotently: ``megatron.training.arguments.
    _add_tokenizer_args`` (so the argument parser accepts the value) and ``megatron.training.
    global_vars.build_tokenizer`` (so ``initialize_megatron`` builds :class:`ByteTokenizer` and
    sets ``padded_vocab_size``). Other tokenizer types are unaffected. Call it before megatron
    parses the command line (i.e. before ``pretrain``/``initialize_megatron``/``parse_args``).
    """
    import megatron.training.arguments as margs
    import megatron.training.global_vars as mglobals

    if not getattr(margs._add_tokenizer_args, "_rectify_byte_level", False):
        original_add = margs._add_tokenizer_args

        @functools.wraps(original_add)
        def _add_tokenizer_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
            parser = original_add(parser)
            return add_byte_level_tokenizer_choice(parser)

        _add_tokenizer_args._rectify_byte_level = True  # type: ignore[attr-defined]
        margs._add_tokenizer_args = _add_tokenizer_args

    if mglobals.build_tokenizer is not build_tokenizer:
        mglobals.build_tokenizer = build_tokenizer


# --------------------------------------------------------------------------------------------
# Writing indexed datasets atomically
# --------------------------------------------------------------------------------------------


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
        tag = f".tmp-{os.getpid()}-{os.urandom(4).hex()}"
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
        """Write the temporary index; the first half of :meth:`commit` (for multi-output tools
        that want every output complete before renaming any)."""
        assert self._builder is not None, "writer already committed or aborted"
        if not self._finalized:
            self._builder.finalize(str(self._tmp_idx))
            self._finalized = True

    def commit(self) -> tuple[Path, Path]:
        """Finalize if needed and move the pair into place; returns the final paths. SIGINT
        and SIGTERM are blocked in the calling thread meanwhile (a handler that raises, such as
        Python's SIGINT one, could otherwise leave the new ``.bin`` without its ``.idx``; a
        program with other threads defers its handlers itself, as tools/preprocess_data.py)."""
        self.finalize()
        with self._signals_deferred():
            self.idx_path.unlink(missing_ok=True)
            os.replace(self._tmp_bin, self.bin_path)
            os.replace(self._tmp_idx, self.idx_path)
            self._builder = None
        return self.bin_path, self.idx_path

    @staticmethod
    @contextlib.contextmanager
    def _signals_deferred() -> Iterator[None]:
        """Block SIGINT and SIGTERM in this thread for the block; a signal that arrives
        meanwhile is delivered when it ends."""
        import signal

        if not hasattr(signal, "pthread_sigmask"):  # not POSIX: nothing to defer with
            yield
            return
        deferred = {signal.SIGINT, signal.SIGTERM}
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, deferred)
        try:
            yield
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)

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


# --------------------------------------------------------------------------------------------
# The embedded corpus: the Python standard library's sources
# --------------------------------------------------------------------------------------------

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
    repo = Path(__file__).resolve().parents[2]
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
    that is renamed to ``entry`` only when complete (stamp included)."""
    tokenizer = build_byte_tokenizer()
    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{entry.name}-", dir=entry.parent))
    try:
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
        if entry.exists():  # a stale or foreign entry with our key: replace it
            shutil.rmtree(entry)
        os.rename(tmp, entry)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


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
