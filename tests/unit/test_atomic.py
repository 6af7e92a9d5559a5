"""megatron.rectify.atomic: an output appears whole or not at all, and no temporary is left."""

from __future__ import annotations

from pathlib import Path

import pytest

from megatron.rectify.atomic import staged_directory, write_text_atomically


def test_a_staged_directory_replaces_the_old_one_whole(tmp_path: Path) -> None:
    destination = tmp_path / "out"
    destination.mkdir()
    (destination / "old.txt").write_text("old")
    with staged_directory(destination, tmp_path / ".out.partial") as staging:
        (staging / "sub").mkdir()
        (staging / "sub" / "new.txt").write_text("new")
        assert sorted(p.name for p in destination.iterdir()) == ["old.txt"]  # not yet
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # staging and aside gone
    assert (destination / "sub" / "new.txt").read_text() == "new"
    assert not (destination / "old.txt").exists()


def test_a_failed_staged_directory_leaves_the_old_one(tmp_path: Path) -> None:
    destination = tmp_path / "out"
    destination.mkdir()
    (destination / "old.txt").write_text("old")
    with pytest.raises(RuntimeError), staged_directory(destination, tmp_path / ".stage") as staging:
        (staging / "half.bin").write_text("partial")
        raise RuntimeError("boom")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert (destination / "old.txt").read_text() == "old"


def test_a_leftover_staging_folder_is_replaced(tmp_path: Path) -> None:
    (tmp_path / ".stage").mkdir()
    (tmp_path / ".stage" / "stale").write_text("from a killed run")
    with staged_directory(tmp_path / "out", tmp_path / ".stage") as staging:
        assert list(staging.iterdir()) == []
    assert list((tmp_path / "out").iterdir()) == []


def test_text_is_written_whole(tmp_path: Path) -> None:
    path = tmp_path / "result.json"
    write_text_atomically(path, "first")
    write_text_atomically(path, "second")
    assert path.read_text() == "second"
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]
