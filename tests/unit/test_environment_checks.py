"""What this machine cannot run stops before start-up with one line, in every mode
(``environment_problems`` and ``transformer_config_problems``, called by
``parse_and_validate_args``): megatron-core 0.19.2 finds these only when each rank builds its
model or takes its first step, as a traceback on every rank. Run on the CPU machine, where
neither Transformer Engine nor CUDA is present; on a machine with them the refusals do not
apply and the tests skip."""

from __future__ import annotations

import sys

import pytest

from megatron.rectify.dev.compatibility_table import BASE as COMPATIBILITY_BASE

PROG = "pretrain_gpt_rectify.py"
#: The tiny MoE command line the compatibility table's rows are checked on (2 iterations,
#: mock data, alltoall, capacity 1.0): one definition for both.
BASE = list(COMPATIBILITY_BASE)

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]


def _have_te() -> bool:
    from megatron.core.extensions.transformer_engine import HAVE_TE

    return bool(HAVE_TE)


@pytest.fixture
def refusal(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture):
    import megatron.training.global_vars as megatron_globals

    monkeypatch.setattr(megatron_globals, "set_global_variables", lambda *a, **k: None)

    def run(*flags: str) -> str | None:
        """The one error line of ``parse_and_validate_args`` on BASE + flags, or None when it
        accepts them."""
        from megatron.rectify.dev.mode import CPU_EMULATION_DEFAULT_ARGS
        from megatron.rectify.training import parse_and_validate_args

        argv = [PROG, *CPU_EMULATION_DEFAULT_ARGS, *BASE, *flags]
        monkeypatch.setattr(sys, "argv", argv)
        monkeypatch.setenv("WORLD_SIZE", "1")
        monkeypatch.setenv("RANK", "0")
        try:
            parse_and_validate_args(training_data=True)
        except SystemExit as exited:
            err = capsys.readouterr().err
            assert exited.code == 2, err[-2000:]
            errors = [line for line in err.splitlines() if line.startswith(f"{PROG}: error: ")]
            assert errors == [err.strip().splitlines()[-1]], err[-2000:]
            return errors[0]
        return None

    return run


@pytest.mark.skipif(_have_te(), reason="Transformer Engine is installed here")
@pytest.mark.parametrize("mode", ["none", "fr"])
@pytest.mark.parametrize(
    "flags",
    [["--moe-permute-fusion"], ["--moe-router-fusion"], ["--fp8-format", "e4m3", "--bf16"]],
    ids=["permute-fusion", "router-fusion", "fp8"],
)
def test_kernels_of_a_missing_transformer_engine_are_refused(refusal, mode, flags) -> None:
    line = refusal(*flags, "--moe-rectify", mode)
    assert line is not None and flags[0] in line and "Transformer Engine is not installed" in line


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has CUDA GPUs")
@pytest.mark.parametrize(
    "flags",
    [["--cuda-graph-impl", "local", "--cuda-graph-modules", "attn"], ["--enable-cuda-graph"]],
    ids=["local-attn", "deprecated-enable"],
)
def test_cuda_graphs_without_a_gpu_are_refused(refusal, flags) -> None:
    line = refusal(*flags)
    assert line is not None and "CUDA graphs" in line and "need CUDA GPUs" in line


def test_a_setting_megatrons_transformer_config_refuses_is_named_before_start_up(
    refusal,
) -> None:
    """An example megatron checks only in ``TransformerConfig.__post_init__``: the shared-expert
    overlap with the allgather dispatcher (megatron-core 0.19.2)."""
    line = refusal(
        "--moe-shared-expert-intermediate-size", "64", "--moe-shared-expert-overlap",
        "--moe-token-dispatcher-type", "allgather",
    )  # fmt: skip
    assert line is not None and "megatron's TransformerConfig refuses these settings:" in line
    assert "moe_shared_expert_overlap only works with alltoall or flex" in line
    assert refusal("--moe-rectify", "ir+fr", "--moe-rectify-ir-trigger", "ignore_kth") is None


def test_the_flex_dispatcher_without_its_kernels_is_refused(refusal) -> None:
    from megatron.core.transformer.moe import fused_a2a

    if getattr(fused_a2a, "HAVE_DEEP_EP", False):
        pytest.skip("DeepEP is installed here")
    line = refusal("--moe-token-dispatcher-type", "flex", "--moe-rectify", "none")
    assert line is not None and "flex with the deepep backend" in line and "alltoall" in line
