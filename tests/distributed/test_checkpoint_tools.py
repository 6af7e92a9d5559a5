"""End-to-end tests of tools/checkpoint on tiny random HF models built locally (no download).

Every tool runs as a user runs it (a subprocess; torchrun for other layouts), and every claim is
checked against an independent reference: the HF model's own logits (computed by transformers
in a clean process), the HF safetensors files, or a training run that never went through a
conversion.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from megatron.rectify.checkpoint.hf_reference import hf_logits  # noqa: E402
from megatron.rectify.checkpoint.layout import read_full_tensors  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
TOOLS = REPO / "tools" / "checkpoint"
pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

TINY_SHAPE = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def run_tool(
    script: str, *args: str, nproc: int = 1, timeout: int = 300
) -> subprocess.CompletedProcess:
    from megatron.rectify.dev.multiprocess import find_free_port

    launcher = [sys.executable]
    if nproc > 1:
        launcher += [
            "-m",
            "torch.distributed.run",
            f"--nproc-per-node={nproc}",
            f"--master-port={find_free_port()}",
        ]
    command = [*launcher, str(TOOLS / script), *args]
    return subprocess.run(
        command, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout
    )


def ok(run: subprocess.CompletedProcess) -> str:
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    return run.stdout + run.stderr


def failed_with(run: subprocess.CompletedProcess, message: str) -> None:
    assert run.returncode == 2, run.stdout[-2000:] + run.stderr[-3000:]
    assert message in run.stderr, run.stderr[-3000:]


@pytest.fixture(scope="module")
def hf_mixtral(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    config = transformers.MixtralConfig(
        vocab_size=512, num_local_experts=4, num_experts_per_tok=2, rope_theta=1e6, **TINY_SHAPE
    )
    model = transformers.MixtralForCausalLM(config)
    folder = tmp_path_factory.mktemp("hf") / "mixtral"
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Dense; a vocabulary (500) that megatron pads (to 512), so padding and cropping are hit."""
    torch.manual_seed(1)
    config = transformers.LlamaConfig(vocab_size=500, rms_norm_eps=1e-6, **TINY_SHAPE)
    model = transformers.LlamaForCausalLM(config)
    folder = tmp_path_factory.mktemp("hf") / "llama"
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def mixtral_checkpoint(hf_mixtral: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    save = tmp_path_factory.mktemp("mg") / "mixtral"
    recorded = [
        "--moe-rectify",
        "ir+fr",
        "--moe-rectify-ir-trigger",
        "ignore_kth",
        "--moe-expert-capacity-factor",
        "1.0",
        "--moe-token-dispatcher-type",
        "alltoall",
    ]
    run = run_tool(
        "convert_hf.py",
        "import",
        "--hf-dir",
        str(hf_mixtral),
        "--save-dir",
        str(save),
        "--target-expert-parallel-size",
        "2",
        *recorded,
    )
    ok(run)
    wrote = re.search(r"wrote (\d+) tensors", run.stdout)
    assert wrote is not None, run.stdout
    # progress on stderr: phases and a summary with the tensor count (bytes, rate, time)
    assert "convert_hf.py import: building the megatron model" in run.stderr
    assert f"convert_hf.py import: filled {wrote.group(1)} tensors, " in run.stderr, run.stderr
    assert "convert_hf.py import: saved in " in run.stderr
    return save


def hf_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return tensors


@pytest.mark.parametrize(
    "layout",
    [
        ["--expert-model-parallel-size", "2"],
        ["--tensor-model-parallel-size", "2", "--sequence-parallel"],
    ],
    ids=["EP2", "TP2+SP"],
)
def test_mixtral_import_gives_the_hf_logits_in_two_processes(
    hf_mixtral: Path, mixtral_checkpoint: Path, layout: list[str], tmp_path: Path
) -> None:
    saved = tmp_path / "logits.pt"
    out = ok(
        run_tool(
            "convert_hf.py",
            "verify",
            "--hf-dir",
            str(hf_mixtral),
            "--load-dir",
            str(mixtral_checkpoint),
            "--save-logits",
            str(saved),
            *layout,
            nproc=2,
        )
    )
    assert "MATCH" in out
    result = torch.load(saved)
    reference = hf_logits(str(hf_mixtral), result["tokens"])
    torch.testing.assert_close(result["megatron"], reference, atol=1e-5, rtol=1e-5)
    assert reference.abs().max() > 0.1  # a real comparison, not of two near-zero tensors


def test_every_expert_and_router_lands_in_its_own_slot(
    hf_mixtral: Path, mixtral_checkpoint: Path
) -> None:
    """The upstream bug class: MoE expert weights silently left uninitialised or shuffled."""
    hf = hf_tensors(hf_mixtral)
    megatron = read_full_tensors(mixtral_checkpoint)
    fc1 = megatron["decoder.layers.mlp.experts.experts.linear_fc1.weight"]  # [layer, expert, ...]
    fc2 = megatron["decoder.layers.mlp.experts.experts.linear_fc2.weight"]
    router = megatron["decoder.layers.mlp.router.weight"]
    for layer in range(2):
        source = f"model.layers.{layer}.block_sparse_moe"
        torch.testing.assert_close(router[layer], hf[f"{source}.gate.weight"], rtol=0, atol=0)
        for expert in range(4):
            w1, w2, w3 = (hf[f"{source}.experts.{expert}.w{i}.weight"] for i in (1, 2, 3))
            assert torch.equal(fc1[layer, expert], torch.cat([w1, w3])), (layer, expert)
            assert torch.equal(fc2[layer, expert], w2), (layer, expert)
        for a in range(4):
            for b in range(a + 1, 4):
                assert not torch.equal(fc1[layer, a], fc1[layer, b]), "two experts identical"


def test_checkpoint_records_layout_and_rectify_settings_for_inspect(
    mixtral_checkpoint: Path,
) -> None:
    run = run_tool("inspect.py", str(mixtral_checkpoint), "--json")
    ok(run)
    summary = json.loads(run.stdout)
    assert summary["trained_layout"]["EP"] == 2
    assert summary["moe"]["num_experts"] == 4 and summary["moe"]["moe_router_topk"] == 2
    assert summary["rectify"]["moe_rectify"] == "ir+fr"
    assert summary["moe"]["moe_expert_capacity_factor"] == 1.0
    shapes = {t["key"]: t["shape"] for t in summary["tensors"]}
    assert shapes["decoder.layers.mlp.experts.experts.linear_fc1.weight"] == [2, 4, 192, 64]
    # MoE layers keep a separate pre-MLP norm, as the Transformer Engine spec names it
    assert "decoder.layers.pre_mlp_layernorm.weight" in shapes
    text = ok(run_tool("inspect.py", str(mixtral_checkpoint), "--no-tensors"))
    assert "moe_rectify = ir+fr" in text


def test_hf_to_megatron_to_hf_is_bit_identical(
    hf_mixtral: Path, mixtral_checkpoint: Path, tmp_path: Path
) -> None:
    out_dir = tmp_path / "hf"
    run = run_tool(
        "convert_hf.py",
        "export",
        "--load-dir",
        str(mixtral_checkpoint),
        "--hf-dir",
        str(out_dir),
        "--dtype",
        "fp32",
        "--max-shard-size-gb",
        "0.0004",
    )
    ok(run)
    wrote = re.search(r"wrote (\d+) tensors", run.stdout)
    assert wrote is not None, run.stdout
    assert f"convert_hf.py export: wrote {wrote.group(1)} tensors, " in run.stderr, run.stderr
    assert (out_dir / "model.safetensors.index.json").is_file()  # sharded: several files
    original, exported = hf_tensors(hf_mixtral), hf_tensors(out_dir)
    assert sorted(original) == sorted(exported)
    for name, tensor in original.items():
        assert torch.equal(tensor, exported[name]), name
    config = json.loads((out_dir / "config.json").read_text())
    reference = json.loads((hf_mixtral / "config.json").read_text())
    for key in ("num_local_experts", "num_experts_per_tok", "num_key_value_heads", "vocab_size"):
        assert config[key] == reference[key], key
    assert config["rope_theta"] == 1e6


def test_dense_llama_round_trip_crops_the_padded_vocabulary(hf_llama: Path, tmp_path: Path) -> None:
    save, out_dir = tmp_path / "mg", tmp_path / "hf"
    out = ok(
        run_tool("convert_hf.py", "import", "--hf-dir", str(hf_llama), "--save-dir", str(save))
    )
    assert "padded vocabulary 512" in out
    quiet = run_tool(
        "convert_hf.py",
        "export",
        "--load-dir",
        str(save),
        "--hf-dir",
        str(out_dir),
        "--dtype",
        "fp32",
        "--quiet",
    )
    ok(quiet)  # --quiet: no progress, no summary (megatron's own log lines may remain)
    assert "convert_hf.py" not in quiet.stdout + quiet.stderr, quiet.stdout + quiet.stderr
    original, exported = hf_tensors(hf_llama), hf_tensors(out_dir)
    assert sorted(original) == sorted(exported)
    assert all(torch.equal(original[name], exported[name]) for name in original)
    assert json.loads((out_dir / "config.json").read_text())["architectures"] == [
        "LlamaForCausalLM"
    ]


def test_upcycled_llama_reproduces_the_dense_logits_at_step_zero(
    hf_llama: Path, tmp_path: Path
) -> None:
    """Top-1, every expert a copy of the dense FFN: with the rectified straight-through weight
    (forward exactly 1; megatron's plain pre-softmax top-1 would weigh by p) the MoE computes the
    dense function, also at capacity 1.0 because IR+FR keep every token (IR's experts on the
    token's own rank are copies too)."""
    save = tmp_path / "moe"
    out = ok(
        run_tool(
            "upcycle_dense_to_moe.py",
            "--hf-dir",
            str(hf_llama),
            "--save-dir",
            str(save),
            "--num-experts",
            "4",
            "--moe-router-topk",
            "1",
            "--target-expert-parallel-size",
            "2",
        )
    )
    assert re.search(r"upcycle_dense_to_moe\.py: filled \d+ tensors, ", out), out[-3000:]
    megatron = read_full_tensors(save)
    hf = hf_tensors(hf_llama)
    fc1 = megatron["decoder.layers.mlp.experts.experts.linear_fc1.weight"]
    for layer in range(2):
        dense = torch.cat([hf[f"model.layers.{layer}.mlp.{p}_proj.weight"] for p in ("gate", "up")])
        for expert in range(4):
            assert torch.equal(fc1[layer, expert], dense), (layer, expert)
    router = megatron["decoder.layers.mlp.router.weight"]
    assert 0.01 < router.std().item() < 0.03  # megatron's init_method: normal(0, 0.02)
    rectified = [
        "--moe-rectify",
        "ir+fr",
        "--moe-rectify-ir-trigger",
        "ignore_kth",
        "--moe-expert-capacity-factor",
        "1.0",
        "--moe-pad-expert-input-to-capacity",
    ]
    out = ok(
        run_tool(
            "convert_hf.py",
            "verify",
            "--hf-dir",
            str(hf_llama),
            "--load-dir",
            str(save),
            "--expert-model-parallel-size",
            "2",
            *rectified,
            nproc=2,
        )
    )
    assert "MATCH" in out
    # without IR, a capacity of 0.5 loses tokens: no longer the dense function, and verify says so
    lossy = run_tool(
        "convert_hf.py",
        "verify",
        "--hf-dir",
        str(hf_llama),
        "--load-dir",
        str(save),
        "--expert-model-parallel-size",
        "2",
        "--moe-rectify",
        "fr",
        "--moe-expert-capacity-factor",
        "0.5",
        nproc=2,
    )
    assert lossy.returncode == 1 and "MISMATCH" in lossy.stdout


def test_upcycling_every_other_layer_keeps_the_dense_layers_dense(
    hf_llama: Path, tmp_path: Path
) -> None:
    save = tmp_path / "moe"
    ok(run_tool("upcycle_dense_to_moe.py", "--hf-dir", str(hf_llama), "--save-dir", str(save),
                "--num-experts", "2", "--moe-layer-freq", "[0,1]"))  # fmt: skip
    keys = set(read_full_tensors(save))
    assert "decoder.layers.1.mlp.experts.experts.linear_fc1.weight" in keys  # layer 1: MoE
    assert "decoder.layers.0.mlp.linear_fc1.weight" in keys  # layer 0: dense FFN
    assert not any(key.startswith("decoder.layers.0.mlp.experts") for key in keys)
    rectified = ["--moe-rectify", "ir", "--moe-expert-capacity-factor", "1.0"]
    out = ok(run_tool("convert_hf.py", "verify", "--hf-dir", str(hf_llama), "--load-dir",
                      str(save), *rectified))  # fmt: skip
    assert "MATCH" in out


def test_bf16_import_and_export(hf_mixtral: Path, tmp_path: Path) -> None:
    save, out_dir = tmp_path / "mg", tmp_path / "hf"
    ok(run_tool("convert_hf.py", "import", "--hf-dir", str(hf_mixtral), "--save-dir", str(save),
                "--dtype", "bf16"))  # fmt: skip
    megatron = read_full_tensors(save)
    assert megatron["embedding.word_embeddings.weight"].dtype == torch.bfloat16
    ok(run_tool("convert_hf.py", "export", "--load-dir", str(save), "--hf-dir", str(out_dir),
                "--dtype", "bf16"))  # fmt: skip
    original, exported = hf_tensors(hf_mixtral), hf_tensors(out_dir)
    assert json.loads((out_dir / "config.json").read_text())["torch_dtype"] == "bfloat16"
    for name, tensor in original.items():
        assert exported[name].dtype == torch.bfloat16
        assert torch.equal(tensor.to(torch.bfloat16), exported[name]), name


def test_bad_inputs_fail_early_and_leave_nothing_behind(hf_llama: Path, tmp_path: Path) -> None:
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(
        json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})
    )
    target = tmp_path / "out"
    failed_with(
        run_tool("convert_hf.py", "import", "--hf-dir", str(gpt2), "--save-dir", str(target)),
        "unsupported Hugging Face architecture model_type='gpt2'",
    )
    assert not target.exists()

    failed_with(
        run_tool(
            "convert_hf.py",
            "import",
            "--hf-dir",
            str(hf_llama),
            "--save-dir",
            str(target),
            "--target-tensor-parallel-size",
            "3",
        ),
        "not divisible by the target TP size 3",
    )

    broken = tmp_path / "broken"
    broken.mkdir()
    from safetensors.torch import save_file

    tensors = hf_tensors(hf_llama)
    tensors["model.layers.1.mlp.down_proj.weight"] = torch.zeros(64, 95)
    save_file(tensors, str(broken / "model.safetensors"))
    (broken / "config.json").write_text((hf_llama / "config.json").read_text())
    failed_with(
        run_tool("convert_hf.py", "import", "--hf-dir", str(broken), "--save-dir", str(target)),
        "shape mismatch for decoder.layers.1.mlp.linear_fc2.weight",
    )
    assert not target.exists() and not list(tmp_path.glob(".out.partial-*"))

    target.mkdir()
    (target / "keep.txt").write_text("user data")
    failed_with(
        run_tool("convert_hf.py", "import", "--hf-dir", str(hf_llama), "--save-dir", str(target)),
        "exists and is not empty",
    )
    assert (target / "keep.txt").read_text() == "user data"

    failed_with(
        run_tool(
            "convert_hf.py",
            "import",
            "--hf-dir",
            str(hf_llama),
            "--save-dir",
            str(tmp_path / "x"),
            "--hidden-size",
            "32",
        ),
        "--hidden-size come from",
    )
    failed_with(
        run_tool(
            "upcycle_dense_to_moe.py", "--hf-dir", str(hf_llama), "--save-dir", str(tmp_path / "y")
        ),
        "upcycling needs --num-experts",
    )


# ---- megatron -> HF -> megatron, and training resumes from the converted checkpoint ------------

MIXTRAL_LIKE_TRAINING = [
    "--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "96",
    "--num-attention-heads", "4", "--group-query-attention", "--num-query-groups", "2",
    "--seq-length", "64", "--max-position-embeddings", "64",
    "--position-embedding-type", "rope", "--normalization", "RMSNorm", "--swiglu",
    "--disable-bias-linear", "--untie-embeddings-and-output-weights",
    "--hidden-dropout", "0", "--attention-dropout", "0",
    "--num-experts", "4", "--moe-router-topk", "2", "--moe-token-dispatcher-type", "alltoall",
    "--moe-expert-capacity-factor", "1.0", "--moe-rectify", "fr", "--moe-aux-loss-coeff", "0.01",
    "--micro-batch-size", "4", "--global-batch-size", "8", "--lr", "1e-3",
    "--log-interval", "1", "--eval-interval", "1000", "--eval-iters", "0", "--cpu-emulation",
]  # fmt: skip


def pretrain(*extra: str, nproc: int = 2) -> str:
    from megatron.rectify.dev.multiprocess import find_free_port

    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={nproc}",
        f"--master-port={find_free_port()}",
        str(REPO / "pretrain_gpt_rectify.py"),
        *MIXTRAL_LIKE_TRAINING,
        "--expert-model-parallel-size",
        str(nproc),
        *extra,
    ]
    return ok(
        subprocess.run(command, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    )


def losses(log: str) -> dict[int, float]:
    pattern = re.compile(r"iteration\s+(\d+)/\s*\d+ \|.*?lm loss: ([0-9.E+-]+)")
    return {int(i): float(v) for i, v in pattern.findall(log)}


def test_trained_checkpoint_round_trips_bit_identically_and_resumes(tmp_path: Path) -> None:
    trained, hf_dir, reimported = tmp_path / "trained", tmp_path / "hf", tmp_path / "reimported"
    pretrain("--train-iters", "3", "--save", str(trained), "--save-interval", "3")
    ok(
        run_tool(
            "convert_hf.py",
            "export",
            "--load-dir",
            str(trained),
            "--hf-dir",
            str(hf_dir),
            "--dtype",
            "fp32",
        )
    )
    ok(
        run_tool(
            "convert_hf.py",
            "import",
            "--hf-dir",
            str(hf_dir),
            "--save-dir",
            str(reimported),
            "--moe-token-dispatcher-type",
            "alltoall",
        )
    )

    before, after = read_full_tensors(trained), read_full_tensors(reimported)
    model_keys = sorted(key for key in after if "_extra_state" not in key)
    assert model_keys and set(model_keys) <= set(before)
    for key in model_keys:
        assert torch.equal(before[key], after[key]), key

    # The same first steps from the original (--finetune: weights only, iteration 0) and from
    # the converted release checkpoint: same weights, same batches -> the same losses.
    original = losses(
        pretrain(
            "--train-iters",
            "2",
            "--load",
            str(trained),
            "--finetune",
            "--no-load-optim",
            "--no-load-rng",
        )
    )
    converted = losses(pretrain("--train-iters", "2", "--load", str(reimported)))
    assert original.keys() == converted.keys() == {1, 2}
    assert original == converted
