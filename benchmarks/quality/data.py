"""The corpus a quality benchmark trains on: its flags, their checks, and the report's line.

Without data flags every run trains on the product's embedded corpus (Python standard library
sources, byte-level tokens, split 98,1,1; ``pretrain_gpt_rectify.py`` builds it). With
``--data-path`` (a megatron indexed dataset from ``tools/preprocess_data.py``) the runs train
on the user's corpus instead, with the tokenizer flags ``pretrain_gpt_rectify.py`` takes. The
held-out set is made the same way in both cases: the validation and test splits of
``--split`` (98,1,1 unless given), the same batches for every seed (``--eval-data-seed``).

The data is checked here, once, before any run starts: a missing or damaged prefix, a split
that leaves the held-out set without tokens (``megatron.rectify.data.checks``, the checks the
training entry point runs), a tokenizer without its files, or byte-level tokens out of range
would otherwise fail every run of a sweep one after another, each only after its start-up.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

import numpy as np

#: What ``--split`` defaults to with ``--data-path``: the embedded corpus's split, so a user's
#: corpus gets the same held-out share (1 % validation + 1 % test) as the default study.
DEFAULT_SPLIT = "98,1,1"
BYTE_LEVEL = "ByteLevel"
BYTE_LEVEL_VOCAB = 257
#: Which files (flags) each megatron tokenizer type needs (megatron-core 0.19.2's
#: ``build_tokenizer``); a type not listed needs none that can be checked here.
TOKENIZER_NEEDS: dict[str, tuple[str, ...]] = {
    "GPT2BPETokenizer": ("vocab_file", "merge_file"),
    "BertWordPieceLowerCase": ("vocab_file",),
    "BertWordPieceCase": ("vocab_file",),
    "SentencePieceTokenizer": ("tokenizer_model",),
    "GPTSentencePieceTokenizer": ("tokenizer_model",),
    "Llama2Tokenizer": ("tokenizer_model",),
    "HuggingFaceTokenizer": ("tokenizer_model",),
    "TikTokenizer": ("tokenizer_model",),
    "NullTokenizer": ("vocab_size",),
}
_FILE_FLAGS = ("tokenizer_model", "vocab_file", "merge_file")
_TOKENIZER_FLAGS = ("tokenizer_type", *_FILE_FLAGS, "vocab_size")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_data_args(parser: argparse.ArgumentParser) -> None:
    """``--data-path``, ``--split`` and the tokenizer flags (``pretrain_gpt_rectify.py``'s)."""
    group = parser.add_argument_group(
        "data (default: the embedded corpus, Python standard library sources, byte-level)"
    )
    group.add_argument(
        "--data-path",
        nargs="+",
        default=None,
        metavar="PREFIX",
        help="megatron indexed dataset(s) from tools/preprocess_data.py: PREFIX (for "
        "PREFIX.bin/.idx) or weights and prefixes (0.3 A 0.7 B); needs --tokenizer-type",
    )
    group.add_argument(
        "--split",
        default=None,
        help=f"train,validation,test shares of --data-path (default {DEFAULT_SPLIT}, as the "
        "embedded corpus); validation + test are the held-out set",
    )
    group.add_argument(
        "--tokenizer-type",
        default=None,
        help="the tokenizer the data was preprocessed with (ByteLevel, GPT2BPETokenizer, "
        "HuggingFaceTokenizer, SentencePieceTokenizer, NullTokenizer, ...)",
    )
    group.add_argument("--tokenizer-model", default=None, help="its model file or directory")
    group.add_argument("--vocab-file", default=None, help="its vocabulary file (GPT-2 BPE, BERT)")
    group.add_argument("--merge-file", default=None, help="its merge file (GPT-2 BPE)")
    group.add_argument("--vocab-size", type=int, default=None, help="NullTokenizer's vocabulary")


def data_flags(args: argparse.Namespace) -> list[str]:
    """The megatron flags of the chosen corpus (empty for the embedded one), in a fixed order:
    they are part of every run's cache key."""
    if args.data_path is None:
        return [] if args.split is None else ["--split", args.split]
    flags = ["--data-path", *args.data_path, "--split", args.split or DEFAULT_SPLIT]
    for name in _TOKENIZER_FLAGS:
        value = getattr(args, name)
        if value is not None:
            flags += [_flag(name), str(value)]
    return flags


def data_problem(args: argparse.Namespace) -> str | None:
    """The first thing wrong with the data flags, as one line naming the flag and the fix, or
    None. Reads the ``.idx`` headers (and, for ``ByteLevel``, the tokens); starts nothing."""
    if args.split is not None and not _has_heldout(args.split):
        return (
            f"--split {args.split!r} leaves the held-out set (the validation and test splits) "
            "without a share, and every run reports its held-out loss: give three shares with "
            f"positive validation and test, e.g. --split {DEFAULT_SPLIT}."
        )
    if args.data_path is None:
        given = [_flag(name) for name in _TOKENIZER_FLAGS if getattr(args, name) is not None]
        if given:
            return (
                f"{given[0]} without --data-path: the embedded corpus is byte-level and needs "
                "no tokenizer flags; give --data-path PREFIX for your own corpus."
            )
        return None
    if args.tokenizer_type is None:
        return (
            "--data-path needs --tokenizer-type: the tokenizer the data was preprocessed with "
            "(tools/preprocess_data.py --tokenizer-type), e.g. --tokenizer-type ByteLevel."
        )
    for name in TOKENIZER_NEEDS.get(args.tokenizer_type, ()):
        if getattr(args, name) is None:
            return f"--tokenizer-type {args.tokenizer_type} needs {_flag(name)}."
    for name in _FILE_FLAGS:
        path = getattr(args, name)
        if path is not None and not os.path.exists(path):
            return f"{_flag(name)} {path} does not exist: give the tokenizer's file on disk."
    if args.vocab_size is not None and args.vocab_size < 1:
        return f"--vocab-size {args.vocab_size}: give the tokenizer's vocabulary size (>= 1)."
    from megatron.rectify.data.checks import data_source_problem

    problem = data_source_problem(_megatron_namespace(args))
    if problem:
        return problem
    if args.tokenizer_type == BYTE_LEVEL:
        for prefix in _prefixes(args.data_path):
            top = max_token_id(prefix)
            if top >= BYTE_LEVEL_VOCAB:
                return (
                    f"--data-path {prefix} has token id {top}, beyond ByteLevel's vocabulary "
                    f"({BYTE_LEVEL_VOCAB}): give the --tokenizer-type it was preprocessed with."
                )
    return None


def _has_heldout(split: str) -> bool:
    """Whether ``split`` (megatron's ``a,b,c`` or ``a/b/c``) gives validation and test a
    positive share."""
    try:
        shares = [float(part) for part in split.replace("/", ",").split(",")]
    except ValueError:
        return False
    return len(shares) == 3 and min(shares) >= 0 and shares[1] > 0 and shares[2] > 0


def _megatron_namespace(args: argparse.Namespace) -> argparse.Namespace:
    """What ``megatron.rectify.data.checks`` reads of megatron's parsed arguments."""
    return argparse.Namespace(
        data_path=list(args.data_path),
        data_args_path=None,
        per_split_data_args_path=None,
        train_data_path=None,
        valid_data_path=None,
        test_data_path=None,
        mock_data=False,
        full_validation=False,
        split=args.split or DEFAULT_SPLIT,
    )


def _prefixes(data_path: Sequence[str]) -> list[str]:
    """The prefixes of ``PREFIX ...`` or ``W1 P1 W2 P2 ...`` (megatron's blend list)."""
    try:
        float(data_path[0])
    except ValueError:
        return list(data_path)
    return list(data_path[1::2])


def max_token_id(prefix: str, chunk: int = 1 << 24) -> int:
    """The largest token id in ``PREFIX.bin`` (read in chunks through a memory map)."""
    from megatron.core.datasets.indexed_dataset import DType

    with open(prefix + ".idx", "rb") as stream:
        stream.seek(9 + 8)  # magic, version
        dtype = DType.dtype_from_code(stream.read(1)[0])
    tokens = np.memmap(prefix + ".bin", dtype=dtype, mode="r")
    top = -1
    for start in range(0, tokens.shape[0], chunk):
        top = max(top, int(tokens[start : start + chunk].max()))
    return top


def _split_tokens(lengths: np.ndarray, split: str) -> list[int]:
    """Tokens of the train, validation and test documents under megatron's split (contiguous
    document ranges with rounded book-ends, ``_build_megatron_dataset_splits``)."""
    shares = [float(part) for part in split.replace("/", ",").split(",")]
    shares += [0.0] * (3 - len(shares))
    total = sum(shares)
    bounds = [0.0]
    for share in shares[:3]:
        bounds.append(bounds[-1] + share / total)
    count = lengths.shape[0]
    cuts = [int(round(bound * float(count))) for bound in bounds]
    return [int(lengths[cuts[i] : cuts[i + 1]].sum()) for i in range(3)]


def describe_data(args: argparse.Namespace) -> str:
    """The report header's data line: which corpus, how many documents and tokens (from the
    ``.idx``), the split's token counts and the tokenizer."""
    from megatron.rectify.data.checks import read_index_summary

    if args.data_path is None:
        from megatron.rectify.data import ensure_embedded_corpus

        prefixes, split = [ensure_embedded_corpus()], args.split or DEFAULT_SPLIT
        name = "embedded corpus (Python standard library sources, byte-level tokens)"
        tokenizer = "ByteLevel"
    else:
        prefixes, split = _prefixes(args.data_path), args.split or DEFAULT_SPLIT
        name = f"`--data-path {' '.join(args.data_path)}`"
        extras = [
            f"{_flag(n)} {getattr(args, n)}" for n in _TOKENIZER_FLAGS[1:] if getattr(args, n)
        ]
        tokenizer = " ".join([args.tokenizer_type, *extras])
    parts = []
    for prefix in prefixes:
        lengths = read_index_summary(prefix).sequence_lengths
        train, valid, test = _split_tokens(lengths, split)
        parts.append(
            f"`{prefix}`: {lengths.shape[0]:,} documents, {int(lengths.sum()):,} tokens "
            f"(train {train:,}, validation {valid:,}, test {test:,})"
        )
    return f"{name}; {'; '.join(parts)}; split {split}; tokenizer {tokenizer}"
