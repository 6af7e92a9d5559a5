"""``--eval-data-seed``: the held-out sample order no longer follows ``--seed``.

megatron draws the train, validation and test sample orders from one seed, so runs that differ
only in ``--seed`` are evaluated on different held-out sequences. The quality benchmark compares
seeds; these tests pin that the flag fixes the held-out batches and leaves training data alone.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest

from megatron.rectify import data
from megatron.rectify.training import gpt_recipe

pytestmark = [
    pytest.mark.filterwarnings("ignore:Could not determine rank:UserWarning"),
    pytest.mark.filterwarnings("ignore:Only transformer-engine:UserWarning"),  # megatron import
]

SEQ = 32
SAMPLES = [40, 12, 12]  # train, validation, test


def build_datasets(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, seed: int, eval_data_seed: int | None
) -> list[np.ndarray]:
    """The provider's three splits for these seeds, as [num_samples, SEQ] token arrays."""
    import megatron.training
    import megatron.training.utils

    prefix = data.ensure_embedded_corpus(tmp_path / "corpus", max_bytes=300_000)
    args = argparse.Namespace(
        seed=seed,
        eval_data_seed=eval_data_seed,
        seq_length=SEQ,
        split="80,10,10",
        num_dataset_builder_threads=1,
        data_cache_path=str(tmp_path / "indices"),
        mmap_bin_files=True,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask_in_dataloader=False,
        mock_data=False,
    )
    monkeypatch.setattr(megatron.training, "get_args", lambda: args)
    monkeypatch.setattr(megatron.training, "get_tokenizer", data.build_byte_tokenizer)
    monkeypatch.setattr(
        megatron.training.utils,
        "get_blend_and_blend_per_split",
        lambda _: (([prefix], None), None),
    )
    splits = gpt_recipe.train_valid_test_datasets_provider(SAMPLES)
    return [
        np.stack([np.asarray(split[i]["tokens"]) for i in range(n)])
        for split, n in zip(splits, SAMPLES, strict=True)
    ]


def test_without_the_flag_held_out_order_follows_the_seed(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _, valid1, test1 = build_datasets(monkeypatch, tmp_path, seed=1, eval_data_seed=None)
    _, valid2, test2 = build_datasets(monkeypatch, tmp_path, seed=2, eval_data_seed=None)
    assert not np.array_equal(valid1, valid2)
    assert not np.array_equal(test1, test2)


def test_eval_data_seed_fixes_held_out_batches_and_keeps_training_data(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    train1, valid1, test1 = build_datasets(monkeypatch, tmp_path, seed=1, eval_data_seed=7)
    train2, valid2, test2 = build_datasets(monkeypatch, tmp_path, seed=2, eval_data_seed=7)
    np.testing.assert_array_equal(valid1, valid2)
    np.testing.assert_array_equal(test1, test2)
    assert not np.array_equal(train1, train2)  # training order still follows --seed

    default_train, *_ = build_datasets(monkeypatch, tmp_path, seed=1, eval_data_seed=None)
    np.testing.assert_array_equal(train1, default_train)
    # the fixed held-out set is the one --seed 7 would draw
    _, valid7, test7 = build_datasets(monkeypatch, tmp_path, seed=7, eval_data_seed=None)
    np.testing.assert_array_equal(valid1, valid7)
    np.testing.assert_array_equal(test1, test7)
