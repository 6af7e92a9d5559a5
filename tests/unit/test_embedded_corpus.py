"""The embedded default corpus (stdlib sources -> indexed dataset, cached) and the hooks that let
megatron.training use the byte-level tokenizer.

Corpora here are capped at a few hundred KB so that each build takes a fraction of a second.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from megatron.rectify import data
from megatron.rectify.data import embedded_corpus

pytestmark = pytest.mark.filterwarnings("ignore:Could not determine rank:UserWarning")

SMALL = 300_000  # bytes of source text


@pytest.fixture
def build_calls(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Records every real build (the cache entry it was for)."""
    calls: list[Path] = []
    real = embedded_corpus._build_embedded_corpus

    def counting(entry, *args, **kwargs):
        calls.append(entry)
        return real(entry, *args, **kwargs)

    monkeypatch.setattr(embedded_corpus, "_build_embedded_corpus", counting)
    return calls


def read_docs(prefix: str) -> list[np.ndarray]:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix)
    return [np.array(ds[i]) for i in range(len(ds))]  # copies: ds closes its mmap when collected


def expected_texts(max_bytes: int | None, max_files: int | None = None) -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    texts = []
    for f in data.select_stdlib_files(max_bytes=max_bytes, max_files=max_files):
        try:
            texts.append((root / f.relpath).read_bytes().decode("utf-8"))
        except UnicodeDecodeError:
            continue
    return texts


def test_selection_is_deterministic_and_capped() -> None:
    files = data.select_stdlib_files(max_bytes=SMALL)
    assert files == data.select_stdlib_files(max_bytes=SMALL)
    assert 0 < sum(f.size for f in files) <= SMALL
    assert all(f.relpath.endswith(".py") and f.size > 0 for f in files)
    assert not any("site-packages" in f.relpath.split("/") for f in files)
    assert len(data.select_stdlib_files(max_bytes=None, max_files=7)) == 7
    # Hash order spreads a small cap over the library instead of its first packages.
    assert len({f.relpath.split("/")[0] for f in files}) > 3
    with pytest.raises(ValueError):
        data.select_stdlib_files(max_bytes=0)


def test_build_then_reuse(tmp_path: Path, build_calls: list[Path]) -> None:
    prefix = data.ensure_embedded_corpus(tmp_path, max_bytes=SMALL)
    assert len(build_calls) == 1
    bin_path, idx_path = data.indexed_dataset_paths(prefix)
    assert bin_path.is_file() and idx_path.is_file()
    assert Path(prefix).is_relative_to(tmp_path)

    texts = expected_texts(SMALL)
    docs = read_docs(prefix)
    assert len(docs) == len(texts) > 5
    tok = data.build_byte_tokenizer()
    for doc, text in zip(docs, texts, strict=True):
        assert doc[-1] == data.BYTE_EOD_ID and data.BYTE_EOD_ID not in doc[:-1]
        assert tok.detokenize(doc.tolist()) == text

    stamp = json.loads((Path(prefix).parent / "corpus.json").read_text("utf-8"))
    assert stamp["num_documents"] == len(texts) and stamp["params"]["max_bytes"] == SMALL

    mtime = bin_path.stat().st_mtime_ns
    assert data.ensure_embedded_corpus(tmp_path, max_bytes=SMALL) == prefix
    assert len(build_calls) == 1 and bin_path.stat().st_mtime_ns == mtime


def test_changed_setting_rebuilds(tmp_path: Path, build_calls: list[Path]) -> None:
    first = data.ensure_embedded_corpus(tmp_path, max_bytes=SMALL)
    second = data.ensure_embedded_corpus(tmp_path, max_bytes=SMALL // 2)
    third = data.ensure_embedded_corpus(tmp_path, max_bytes=SMALL, max_files=3)
    assert len({first, second, third}) == 3 and len(build_calls) == 3
    assert len(read_docs(third)) == len(expected_texts(SMALL, 3))
    assert len(read_docs(second)) == len(expected_texts(SMALL // 2))
    # The first entry is still there and still used for its own setting.
    assert data.ensure_embedded_corpus(tmp_path, max_bytes=SMALL) == first
    assert len(build_calls) == 3


def test_damaged_or_half_built_cache_is_rebuilt(tmp_path: Path, build_calls: list[Path]) -> None:
    prefix = data.ensure_embedded_corpus(tmp_path, max_bytes=SMALL)
    bin_path, _ = data.indexed_dataset_paths(prefix)
    good = bin_path.read_bytes()
    bin_path.write_bytes(good[: len(good) // 2])  # truncated data file
    assert data.ensure_embedded_corpus(tmp_path, max_bytes=SMALL) == prefix
    assert len(build_calls) == 2 and bin_path.read_bytes() == good

    # A builder killed mid-way leaves only a temporary directory: never read, and swept once
    # it is old enough not to belong to a build still running elsewhere.
    base = Path(prefix).parent.parent
    dead = base / ".tmp-killed-builder"
    (dead / "stdlib_text_document.bin").parent.mkdir()
    (dead / "stdlib_text_document.bin").write_bytes(b"partial")
    os.utime(dead, (0, 0))
    (Path(prefix).parent / "corpus.json").unlink()  # no stamp: never trusted
    assert data.ensure_embedded_corpus(tmp_path, max_bytes=SMALL) == prefix
    assert len(build_calls) == 3 and bin_path.read_bytes() == good
    assert not dead.exists()
    assert [p.name for p in base.iterdir() if p.name.startswith(".tmp-")] == []


def test_failed_build_leaves_no_entry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def exploding_writer(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(embedded_corpus, "AtomicIndexedDatasetWriter", exploding_writer)
    with pytest.raises(OSError):
        data.ensure_embedded_corpus(tmp_path, max_bytes=SMALL)
    base = tmp_path / "embedded-stdlib"
    assert [p.name for p in base.iterdir() if p.name != ".lock"] == []


def _ensure_in_child(cache_dir: str, queue) -> None:
    queue.put(data.ensure_embedded_corpus(cache_dir, max_bytes=SMALL))


def test_concurrent_callers_build_once(tmp_path: Path, build_calls: list[Path]) -> None:
    # fork: children inherit the counting patch; they report builds through a shared file.
    marker = tmp_path / "builds.txt"
    real = embedded_corpus._build_embedded_corpus

    def logging_build(entry, *args, **kwargs):
        with open(marker, "a") as fh:
            fh.write(f"{entry}\n")
        return real(entry, *args, **kwargs)

    embedded_corpus._build_embedded_corpus = logging_build  # restored by the build_calls fixture
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_ensure_in_child, args=(str(tmp_path), queue)) for _ in range(3)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert len(set(results)) == 1
    assert len(marker.read_text().splitlines()) == 1


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(data.CACHE_ENV_VAR, str(tmp_path / "elsewhere"))
    assert data.default_cache_dir() == tmp_path / "elsewhere"
    monkeypatch.delenv(data.CACHE_ENV_VAR)
    repo = Path(__file__).resolve().parents[2]
    assert data.default_cache_dir() == repo / "data" / "cache"


def test_gpt_dataset_reads_the_corpus(tmp_path: Path) -> None:
    """megatron's own GPTDataset machinery, with the split the docs recommend."""
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    prefix = data.ensure_embedded_corpus(tmp_path, max_bytes=SMALL)
    tok = data.build_byte_tokenizer()
    config = GPTDatasetConfig(
        random_seed=1234,
        sequence_length=64,
        blend=([prefix], None),
        split="90,5,5",  # a small corpus: keep a few documents in each held-out split
        tokenizer=tok,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        path_to_cache=str(tmp_path / "indices"),
    )
    train, valid, test = BlendedMegatronDatasetBuilder(
        GPTDataset, [50, 5, 5], lambda: True, config
    ).build()
    assert len(train) >= 50 and len(valid) >= 5 and len(test) >= 5
    sample = train[0]
    tokens, labels = sample["tokens"], sample["labels"]
    assert tokens.shape == labels.shape == (64,)
    assert int(tokens.max()) < tok.vocab_size and int(tokens.min()) >= 0
    assert bool((tokens[1:] == labels[:-1]).all())  # labels are the next tokens
    assert sample["loss_mask"].sum() > 0


@pytest.mark.filterwarnings("ignore:Only transformer-engine:UserWarning")  # megatron import noise
@pytest.mark.filterwarnings("ignore:'type' is deprecated:DeprecationWarning")  # megatron's argparse
def test_megatron_training_accepts_tokenizer_type_bytelevel(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import megatron.training.global_vars as mglobals
    from megatron.training.arguments import parse_args

    data.install_byte_level_tokenizer()
    data.install_byte_level_tokenizer()  # idempotent
    assert mglobals.build_tokenizer is data.build_tokenizer
    argv = ["pretrain", "--tokenizer-type", "ByteLevel", "--tensor-model-parallel-size", "2"]
    monkeypatch.setattr(sys, "argv", argv)
    args = parse_args()
    assert args.tokenizer_type == data.BYTE_LEVEL_TOKENIZER_TYPE
    tok = data.build_tokenizer(args)  # what initialize_megatron now calls
    assert isinstance(tok, data.ByteTokenizer)
    assert args.padded_vocab_size == 512  # 257 rounded up to 128 * TP(2), as megatron pads

    # Other tokenizer types still go to megatron-core unchanged.
    null_args = argparse.Namespace(
        tokenizer_type="NullTokenizer", vocab_size=257, pad_vocab_size=False, metadata_path=None
    )
    null = data.build_tokenizer(null_args)
    assert (null.vocab_size, null.eod) == (257, data.BYTE_EOD_ID)  # the zero-code equivalent
