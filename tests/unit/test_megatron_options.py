"""megatron training options next to rectification, in one process: the refusals of what cannot
work, and the pieces the end-to-end runs (tests/distributed/test_megatron_options_e2e.py) rest
on."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from megatron.rectify.dev.tiny_model import (
    MOCK_DATA,
    RECTIFY_IR_FR,
    TINY_MODEL,
    TINY_SCHEDULE,
    TOP1_ROUTING,
)

PROG = "pretrain_gpt_rectify.py"
BASE = [*TINY_MODEL, *TINY_SCHEDULE, *TOP1_ROUTING, *RECTIFY_IR_FR, *MOCK_DATA, "--cpu-emulation"]

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),  # megatron's argument warnings
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]


@pytest.fixture
def refusal(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, cpu_emulation):
    """``refusal(*flags, world_size=1)``: the one error line the script's parse/validate step
    ends with (exit 2), run in this process (under the CPU emulation, as the script runs with
    ``--cpu-emulation``: megatron's validation asks the device for its architecture)."""
    import megatron.training.global_vars as megatron_globals

    monkeypatch.setattr(megatron_globals, "set_global_variables", lambda *a, **k: None)

    def run(*flags: str, world_size: int = 1) -> str:
        from megatron.rectify.dev.mode import CPU_EMULATION_DEFAULT_ARGS
        from megatron.rectify.training import parse_and_validate_args

        monkeypatch.setattr(sys, "argv", [PROG, *CPU_EMULATION_DEFAULT_ARGS, *BASE, *flags])
        monkeypatch.setenv("WORLD_SIZE", str(world_size))
        monkeypatch.setenv("RANK", "0")
        with pytest.raises(SystemExit) as exited:
            parse_and_validate_args(training_data=True)
        err = capsys.readouterr().err
        assert exited.value.code == 2, err[-2000:]
        assert "Traceback" not in err
        errors = [line for line in err.splitlines() if f"{PROG}: error:" in line]
        assert len(errors) == 1, err[-2000:]
        return errors[0]

    return run


def test_context_parallelism_on_the_local_spec_is_refused(refusal) -> None:
    """megatron-core 0.19.2's local ``DotProductAttention`` asserts a context-parallel size of 1
    when the model is built (seen on CPU: "Context parallelism is only supported by
    TEDotProductAttention!" on every rank, after start-up); refused before start-up instead."""
    line = refusal("--context-parallel-size", "2", world_size=2)
    assert "--context-parallel-size 2 with --transformer-impl local" in line
    assert "--transformer-impl transformer_engine" in line


def test_context_parallelism_with_transformer_engine_is_left_to_megatron() -> None:
    from types import SimpleNamespace

    from megatron.rectify.training.option_checks import _context_parallel_problems

    with_te = SimpleNamespace(context_parallel_size=2, transformer_impl="transformer_engine")
    assert _context_parallel_problems(with_te) == []
    local = SimpleNamespace(context_parallel_size=2, transformer_impl="local")
    assert len(_context_parallel_problems(local)) == 1
    assert _context_parallel_problems(SimpleNamespace(context_parallel_size=1)) == []


def _torch_format_checkpoint(root: Path, iterations: list[int], tracker: int) -> Path:
    """A ``--ckpt-format torch`` layout (files empty: only names are read before start-up)."""
    for iteration in iterations:
        rank = root / f"iter_{iteration:07d}" / "mp_rank_00_000"
        rank.mkdir(parents=True)
        (rank / "model_optim_rng.pt").touch()
        (rank / "distrib_optim.pt").touch()
    (root / "latest_checkpointed_iteration.txt").write_text(str(tracker))
    return root


def test_a_ckpt_step_megatron_would_mix_with_the_tracker_s_optimizer_is_refused(
    refusal, tmp_path: Path
) -> None:
    """megatron-core 0.19.2 reads ``distrib_optim.pt`` of the tracker's iteration, whatever
    ``--ckpt-step`` says, and reports that iteration as loaded (seen on CPU)."""
    load = _torch_format_checkpoint(tmp_path / "ckpt", [2, 4], tracker=4)
    flags = ["--load", str(load), "--ckpt-step", "2", "--use-distributed-optimizer"]
    line = refusal(*flags, "--ckpt-format", "torch")
    assert "--ckpt-step 2 with --use-distributed-optimizer and --ckpt-format torch" in line
    assert "latest_checkpointed_iteration.txt" in line


def test_a_ckpt_step_megatron_loads_whole_is_accepted(tmp_path: Path) -> None:
    """The step the tracker names, the plain optimizer, or ``torch_dist``: nothing to refuse."""
    from types import SimpleNamespace

    from megatron.rectify.training.checkpoint_args import torch_format_ckpt_step_problem

    load = str(tmp_path)

    def problem(**changes) -> str | None:
        settings = dict(load=load, ckpt_step=2, use_distributed_optimizer=True, ckpt_format="torch")
        return torch_format_ckpt_step_problem(SimpleNamespace(**{**settings, **changes}), "4")

    assert problem() is not None
    assert problem(ckpt_step=4) is None
    assert problem(ckpt_step=None) is None
    assert problem(use_distributed_optimizer=False) is None
    assert problem(ckpt_format="torch_dist") is None


def test_a_torch_format_checkpoint_is_not_judged_by_the_torch_dist_file_checks(
    tmp_path: Path,
) -> None:
    """When a load fails, the diagnosis names a missing or truncated file of a ``torch_dist``
    checkpoint; a ``--ckpt-format torch`` checkpoint has none of those files, and calling it
    incomplete ("metadata.json is missing") hid megatron's real error. It is left to megatron."""
    from megatron.rectify.training.checkpoint_args import corrupt_checkpoint_message

    torch_format = _torch_format_checkpoint(tmp_path / "torch", [2], tracker=2)
    assert corrupt_checkpoint_message(str(torch_format), "2", []) is None
    broken = tmp_path / "torch_dist" / "iter_0000002"
    broken.mkdir(parents=True)
    message = corrupt_checkpoint_message(str(broken.parent), "2", [])
    assert message is not None and "metadata.json is missing" in message


def _torch_dist_checkpoint(root: Path, iteration: int) -> Path:
    """A ``torch_dist`` layout as far as the start-up checks read it (names only)."""
    folder = root / f"iter_{iteration:07d}"
    folder.mkdir(parents=True)
    (folder / "metadata.json").write_text("{}")
    (root / "latest_checkpointed_iteration.txt").write_text(str(iteration))
    return root


def test_a_distributed_optimizer_resume_megatron_cannot_load_is_refused(
    refusal, tmp_path: Path
) -> None:
    """Without Transformer Engine or Apex (torch's Adam), megatron-core 0.19.2 cannot load a
    distributed optimizer's state from a ``torch_dist`` checkpoint (an AssertionError on every
    rank after start-up, seen on CPU)."""
    from megatron.core.optimizer.distrib_optimizer import HAVE_APEX_OR_TE

    if HAVE_APEX_OR_TE:
        pytest.skip("Transformer Engine or Apex is installed: megatron loads it")
    load = _torch_dist_checkpoint(tmp_path / "ckpt", 2)
    line = refusal("--load", str(load), "--use-distributed-optimizer", world_size=2)
    assert "--use-distributed-optimizer resuming from the torch_dist checkpoint" in line
    assert "--ckpt-format torch" in line and "--no-load-optim" in line


def test_distributed_optimizer_resumes_megatron_can_load_are_accepted(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from megatron.rectify.training.checkpoint_args import distributed_optimizer_resume_problem

    torch_dist = _torch_dist_checkpoint(tmp_path / "dist", 2) / "iter_0000002"
    torch_format = _torch_format_checkpoint(tmp_path / "torch", [2], tracker=2) / "iter_0000002"

    def problem(folder: Path = torch_dist, have_apex_or_te: bool = False, **changes):
        settings = dict(use_distributed_optimizer=True, no_load_optim=False, finetune=False)
        args = SimpleNamespace(**{**settings, "optimizer": "adam", **changes})
        return distributed_optimizer_resume_problem(args, folder, have_apex_or_te)

    assert problem() is not None
    assert problem(have_apex_or_te=True) is None  # TE / Apex fused Adam keeps step per group
    assert problem(folder=torch_format) is None  # fixed: megatron_patches
    assert problem(no_load_optim=True) is None
    assert problem(finetune=True) is None
    assert problem(use_distributed_optimizer=False) is None


MTP_ON_THE_LAST_STAGE = [
    "--mtp-num-layers", "1", "--position-embedding-type", "rope",
    "--pipeline-model-parallel-size", "2",
]  # fmt: skip


def test_mtp_on_a_later_stage_with_tied_embeddings_and_a_checkpoint_is_refused(
    refusal, tmp_path: Path
) -> None:
    """megatron-core 0.19.2 fails at the first distributed-checkpoint save (after training up
    to it) or at the load: seen on CPU."""
    save = ["--save", str(tmp_path / "ckpt"), "--save-interval", "10"]
    line = refusal(*MTP_ON_THE_LAST_STAGE, *save, world_size=2)
    assert "--mtp-num-layers 1 with --pipeline-model-parallel-size 2, tied embeddings" in line
    assert "--untie-embeddings-and-output-weights" in line


def test_mtp_settings_megatron_checkpoints_are_accepted() -> None:
    from types import SimpleNamespace

    from megatron.rectify.training.option_checks import _mtp_checkpoint_problems

    def problems(**changes) -> list[str]:
        settings = dict(
            mtp_num_layers=1,
            pipeline_model_parallel_size=2,
            untie_embeddings_and_output_weights=False,
            pipeline_model_parallel_layout=None,
            ckpt_format="torch_dist",
            save="ckpt",
            load=None,
        )
        return _mtp_checkpoint_problems(SimpleNamespace(**{**settings, **changes}))

    assert len(problems()) == 1
    assert len(problems(save=None, load="ckpt")) == 1
    assert problems(untie_embeddings_and_output_weights=True) == []  # tested end to end
    assert problems(pipeline_model_parallel_size=1) == []  # tested end to end
    assert problems(save=None) == []  # training alone works (seen on CPU)
    assert problems(mtp_num_layers=None) == []
