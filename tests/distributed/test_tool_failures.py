"""Damaged inputs of the tools give one line and a non-zero exit, never a traceback, and leave
nothing behind (issue 16, items 10 and 11).

* ``inspect.py`` on a folder with an empty tracker file: one line, exit 2.
* ``inspect.py`` on a truncated shard: no longer "fine" (sizes are checked against the index);
  ``--verify`` reads every tensor and names an unreadable file, exit 1; without it the output
  says that the tensor data was not read.
* ``convert_hf.py import`` with a malformed ``config.json``: one line naming it, exit 2.
* ``preprocess_data.py`` stopped by SIGTERM (as by Ctrl-C) leaves no ``*.tmp-PID-*`` file.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tiny_checkpoint import REPO, copy_checkpoint, saved_run

pytestmark = [pytest.mark.slow]

TOOLS = REPO / "tools" / "checkpoint"


def run_tool(script: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, str(script), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def failed_with(run: subprocess.CompletedProcess, code: int, prog: str, *expected: str) -> str:
    assert run.returncode == code, run.stdout[-2000:] + run.stderr[-3000:]
    assert "Traceback" not in run.stderr, run.stderr[-3000:]
    line = run.stderr.strip().splitlines()[-1]
    assert line.startswith(f"{prog}: error: "), run.stderr[-3000:]
    for text in expected:
        assert text in line, (text, line)
    return line


# ---- inspect.py ---------------------------------------------------------------------------------


def test_inspect_refuses_an_empty_tracker_file(tmp_path: Path) -> None:
    (tmp_path / "iter_0000010").mkdir()
    tracker = tmp_path / "latest_checkpointed_iteration.txt"
    tracker.write_text("")
    run = run_tool(TOOLS / "inspect.py", str(tmp_path))
    failed_with(run, 2, "inspect.py", str(tracker), "is empty", "echo 10 >")


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return saved_run(tmp_path_factory)[0]


@pytest.mark.multiprocess
def test_inspect_checks_the_shards_and_verify_reads_every_tensor(
    trained: Path, tmp_path: Path
) -> None:
    good = run_tool(TOOLS / "inspect.py", str(trained), "--no-tensors")
    assert good.returncode == 0, good.stderr[-3000:]
    assert "tensor data NOT read (--verify reads it)" in good.stdout
    verified = run_tool(TOOLS / "inspect.py", str(trained), "--no-tensors", "--verify", "--json")
    assert verified.returncode == 0, verified.stderr[-3000:]
    shards = json.loads(verified.stdout)["shards"]
    assert shards["tensor_data_read"] and shards["problem"] is None and shards["tensors"] > 10

    truncated = copy_checkpoint(trained, tmp_path / "truncated")
    shard = sorted((truncated / "iter_0000020").glob("*.distcp"))[0]
    with open(shard, "r+b") as handle:
        handle.truncate(shard.stat().st_size - 1000)
    run = run_tool(TOOLS / "inspect.py", str(truncated), "--no-tensors")
    failed_with(run, 1, "inspect.py", f"{shard} is truncated")

    garbled = copy_checkpoint(trained, tmp_path / "garbled")
    shard = sorted((garbled / "iter_0000020").glob("*.distcp"))[0]
    offset = _first_tensor_offset(shard)
    with open(shard, "r+b") as handle:
        handle.seek(offset)
        handle.write(b"garbage!" * 4)
    unverified = run_tool(TOOLS / "inspect.py", str(garbled), "--no-tensors")
    assert unverified.returncode == 0  # the sizes are right: only reading the data tells
    assert "tensor data NOT read" in unverified.stdout
    run = run_tool(TOOLS / "inspect.py", str(garbled), "--no-tensors", "--verify")
    failed_with(run, 1, "inspect.py", f"{shard} is corrupt")


def _first_tensor_offset(shard: Path) -> int:
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from megatron.rectify.checkpoint.integrity import read_storage_index

    metadata = read_storage_index(shard.parent)
    return min(
        info.offset
        for index, info in metadata.storage_data.items()
        if isinstance(metadata.state_dict_metadata[index.fqn], TensorStorageMetadata)
        and info.relative_path == shard.name
    )


# ---- convert_hf.py import -----------------------------------------------------------------------

LLAMA = {
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "vocab_size": 500,
}


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ('{"model_type": "llama",', "is not valid JSON"),
        ("[1, 2]", "holds a JSON list, not an object"),
        (json.dumps({k: v for k, v in LLAMA.items() if k != "hidden_size"}), "no 'hidden_size'"),
        (json.dumps({**LLAMA, "num_attention_heads": "4"}), "num_attention_heads='4'"),
        (json.dumps({**LLAMA, "rope_scaling": "yes"}), "rope_scaling='yes'"),
    ],
    ids=["syntax", "not-an-object", "missing-key", "string-number", "rope-scaling-type"],
)
def test_convert_import_names_a_malformed_config(
    tmp_path: Path, config: str, expected: str
) -> None:
    hf_dir, save_dir = tmp_path / "hf", tmp_path / "out"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text(config)
    run = run_tool(
        TOOLS / "convert_hf.py", "import", "--hf-dir", str(hf_dir), "--save-dir", str(save_dir)
    )
    failed_with(run, 2, "convert_hf.py", str(hf_dir / "config.json"), expected)
    assert not save_dir.exists()


# ---- preprocess_data.py -------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [1, 2])
def test_preprocess_stopped_by_sigterm_leaves_no_temporary_file(
    tmp_path: Path, workers: int
) -> None:
    source = tmp_path / "big.txt"
    with open(source, "w") as handle:  # ~35 MB of short lines: several seconds of work
        for number in range(800_000):
            handle.write(f"line {number} {'x' * (number % 60)}\n")
    out = tmp_path / "out"
    out.mkdir()
    command = [
        sys.executable, str(REPO / "tools" / "preprocess_data.py"),
        "--input", str(source), "--text-document", "line",
        "--output-prefix", str(out / "data"), "--tokenizer-type", "ByteLevel",
        "--workers", str(workers), "--log-interval", "0",
    ]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(out.glob("*.tmp-*")):  # the output is being written
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.01)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr[-3000:]
    assert list(out.iterdir()) == [], "temporary or partial outputs left behind"
    assert stderr.strip().splitlines()[-1] == (
        "preprocess_data.py: terminated (SIGTERM); no partial output left"
    )
    assert "Traceback" not in stderr
