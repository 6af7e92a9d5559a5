"""A damaged checkpoint in ``--load`` stops the run with one line naming the file and the fix
(issue 16, items 7 and 10).

* An empty or garbled ``latest_checkpointed_iteration.txt`` (megatron-core 0.19.2 prints ERROR
  and exits 0 without training) is refused before start-up, exit 2.
* A truncated or garbled shard file (a traceback from deep inside torch.distributed.checkpoint)
  is named, with the newest earlier iteration whose files are complete, exit 2.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny_checkpoint import BASE, ROUTING, copy_checkpoint, pretrain, saved_run

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

PROG = "pretrain_gpt_rectify.py"


def one_error_line(run, *expected: str) -> str:
    assert run.returncode != 0, run.stdout[-2000:] + run.stderr[-3000:]
    errors = [line for line in run.stderr.splitlines() if line.startswith(f"{PROG}: error:")]
    assert errors, run.stdout[-2000:] + run.stderr[-3000:]
    assert len(set(errors)) == 1, errors
    for text in expected:
        assert text in errors[0], (text, errors[0])
    # torchrun's launcher prints its own report of a failed child; the child prints none
    assert "[rank0]: Traceback" not in run.stderr
    return errors[0]


@pytest.mark.parametrize(
    ("tracker", "expected"),
    [
        ("", ["is empty", "echo 10 >"]),
        ("10\x00\x00", ["not an iteration number", "echo 10 >"]),
        ("30\n", ["names 30", "iter_0000030 does not exist", "saved here: 10"]),
    ],
    ids=["empty", "garbled", "missing-iteration"],
)
def test_a_bad_tracker_file_stops_before_start_up(
    tmp_path: Path, tracker: str, expected: list[str]
) -> None:
    (tmp_path / "iter_0000010").mkdir()
    tracker_file = tmp_path / "latest_checkpointed_iteration.txt"
    tracker_file.write_text(tracker)
    run = pretrain(*BASE, *ROUTING, "--load", str(tmp_path), torchrun=False)
    assert run.returncode == 2, run.stdout[-2000:] + run.stderr[-3000:]
    line = one_error_line(run, str(tracker_file), *expected)
    assert run.stderr.strip().splitlines()[-1] == line  # the last word, before start-up
    assert "Traceback" not in run.stderr
    assert tracker_file.read_text() == tracker  # nothing touched


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return saved_run(tmp_path_factory)[0]


def _truncate(shard: Path) -> str:
    with open(shard, "r+b") as handle:
        handle.truncate(shard.stat().st_size // 2)
    return "is truncated"


def _garble_a_tensor(shard: Path) -> str:
    """Overwrite the serialisation header of one stored tensor (the size stays the same)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from megatron.rectify.checkpoint.integrity import read_storage_index

    metadata = read_storage_index(shard.parent)
    offset = next(
        info.offset
        for index, info in metadata.storage_data.items()
        if isinstance(metadata.state_dict_metadata[index.fqn], TensorStorageMetadata)
        and info.relative_path == shard.name
    )
    with open(shard, "r+b") as handle:
        handle.seek(offset)
        handle.write(b"garbage!" * 4)
    return "is corrupt"


@pytest.mark.parametrize("damage", [_truncate, _garble_a_tensor], ids=["truncated", "garbled"])
def test_a_corrupt_shard_names_the_file_and_the_previous_good_iteration(
    trained: Path, tmp_path: Path, damage
) -> None:
    checkpoint = copy_checkpoint(trained, tmp_path / "ckpt")
    shards = sorted((checkpoint / "iter_0000020").glob("*.distcp"))
    assert shards
    what = damage(shards[0])
    run = pretrain(*BASE, *ROUTING, "--load", str(checkpoint))
    one_error_line(
        run,
        "cannot load the checkpoint:",
        f"{shards[0]} {what}",
        "iter_0000010",
        "--ckpt-step 10",
    )
