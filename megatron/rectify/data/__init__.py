"""Data for megatron-rectify: what a training run needs before it can start, without a download.

One module per job:

* ``tokenizer`` - :class:`ByteTokenizer` (UTF-8 bytes, ``vocab_size`` 257) and
  ``--tokenizer-type ByteLevel`` for ``megatron.training``;
* ``indexed_writer`` - :class:`AtomicIndexedDatasetWriter`: a megatron indexed dataset that
  appears only once complete (``tools/preprocess_data.py`` writes through it);
* ``embedded_corpus`` - :func:`ensure_embedded_corpus`: the Python standard library's sources as
  a cached indexed dataset, the default corpus;
* ``checks`` - the checks of a run's data source before megatron builds anything from it.

The names below are the package's public face (``from megatron.rectify.data import X``).
"""

from megatron.rectify.data.embedded_corpus import (
    CACHE_ENV_VAR,
    EMBEDDED_CORPUS_DEFAULT_MAX_BYTES,
    EMBEDDED_CORPUS_SPLIT,
    CorpusFile,
    default_cache_dir,
    ensure_embedded_corpus,
    select_stdlib_files,
)
from megatron.rectify.data.indexed_writer import AtomicIndexedDatasetWriter, indexed_dataset_paths
from megatron.rectify.data.tokenizer import (
    BYTE_EOD_ID,
    BYTE_LEVEL_TOKENIZER_TYPE,
    BYTE_PAD_ID,
    BYTE_VOCAB_SIZE,
    ByteLevelCodec,
    ByteTokenizer,
    add_byte_level_tokenizer_choice,
    build_byte_tokenizer,
    build_tokenizer,
    install_byte_level_tokenizer,
)

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
