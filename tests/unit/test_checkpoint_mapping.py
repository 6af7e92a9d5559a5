"""Unit tests of the checkpoint tools' pure parts: architecture mapping, tensor layouts, files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from megatron.rectify.checkpoint.atomic import atomic_output_dir
from megatron.rectify.checkpoint.convert import ParallelLayout, padded_vocab_size
from megatron.rectify.checkpoint.errors import CheckpointToolError
from megatron.rectify.checkpoint.hf_architecture import (
    Architecture,
    architecture_from_hf_config,
    hf_config_from_architecture,
    megatron_model_flags,
)
from megatron.rectify.checkpoint.hf_files import HFCheckpointReader, write_hf_checkpoint
from megatron.rectify.checkpoint.hf_weights import (
    fuse_qkv,
    hf_tensors_from_megatron,
    megatron_tensor_from_hf,
    split_qkv,
)

MIXTRAL = {
    "model_type": "mixtral",
    "architectures": ["MixtralForCausalLM"],
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "vocab_size": 500,
    "max_position_embeddings": 128,
    "rope_parameters": {"rope_theta": 1e6, "rope_type": "default"},
    "rms_norm_eps": 1e-5,
    "num_local_experts": 4,
    "num_experts_per_tok": 2,
    "hidden_act": "silu",
    "sliding_window": None,
}


def test_qkv_rows_are_grouped_per_key_value_head() -> None:
    """megatron's layout: [q heads of group g, k_g, v_g] per group g, as its attention splits."""
    arch = architecture_from_hf_config(MIXTRAL)  # 8 query heads, 2 groups, head_dim 8
    d, hidden = arch.head_dim, arch.hidden_size
    q = torch.arange(8).repeat_interleave(d).float().unsqueeze(1).expand(-1, hidden)
    k = 100 + torch.arange(2).repeat_interleave(d).float().unsqueeze(1).expand(-1, hidden)
    v = 200 + torch.arange(2).repeat_interleave(d).float().unsqueeze(1).expand(-1, hidden)
    fused = fuse_qkv(q, k, v, arch)
    head_of_row = fused[::d, 0].tolist()
    assert head_of_row == [0, 1, 2, 3, 100, 200, 4, 5, 6, 7, 101, 201]
    for original, recovered in zip((q, k, v), split_qkv(fused, arch), strict=True):
        assert torch.equal(original, recovered)


def test_random_qkv_round_trip() -> None:
    arch = architecture_from_hf_config(MIXTRAL)
    q, k, v = torch.randn(64, 64), torch.randn(16, 64), torch.randn(16, 64)
    assert all(
        torch.equal(a, b)
        for a, b in zip((q, k, v), split_qkv(fuse_qkv(q, k, v, arch), arch), strict=True)
    )


@pytest.mark.parametrize(
    "change, message",
    [
        ({"model_type": "gpt2"}, "unsupported Hugging Face architecture"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"attention_bias": True}, "attention_bias"),
        ({"sliding_window": 4096}, "sliding_window"),
        ({"rope_parameters": {"rope_theta": 5e5, "rope_type": "llama3"}}, "RoPE scaling 'llama3'"),
        ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "RoPE scaling 'linear'"),
    ],
)
def test_inexact_architectures_are_refused(change: dict, message: str) -> None:
    with pytest.raises(CheckpointToolError, match=message):
        architecture_from_hf_config({**MIXTRAL, **change})


def test_hub_and_transformers5_rope_settings_are_both_read() -> None:
    hub = {**MIXTRAL, "rope_theta": 1e6}
    del hub["rope_parameters"]
    assert architecture_from_hf_config(hub).rope_theta == 1e6
    assert architecture_from_hf_config(MIXTRAL).rope_theta == 1e6


def test_exported_config_describes_the_same_architecture() -> None:
    arch = architecture_from_hf_config(MIXTRAL)
    config = hf_config_from_architecture(arch, "bfloat16")
    assert architecture_from_hf_config(config) == arch
    dense = Architecture(2, 64, 96, 4, 4, 16, 300, 128, 1e4, 1e-6, True)
    assert architecture_from_hf_config(hf_config_from_architecture(dense, "float32")) == dense


def test_megatron_flags_name_every_architecture_setting() -> None:
    flags = megatron_model_flags(architecture_from_hf_config(MIXTRAL))
    pairs = dict(zip(flags, flags[1:], strict=False))
    assert pairs["--num-query-groups"] == "2" and pairs["--rotary-base"] == "1000000"
    assert pairs["--num-experts"] == "4" and pairs["--moe-router-topk"] == "2"
    assert pairs["--kv-channels"] == "8" and pairs["--norm-epsilon"] == "1e-05"
    assert "--untie-embeddings-and-output-weights" in flags and "--swiglu" in flags


def test_padded_vocabulary_and_layout_checks() -> None:
    assert padded_vocab_size(500, 128, 1) == 512
    assert padded_vocab_size(32000, 128, 8) == 32768  # why TP must be fixed at conversion
    arch = architecture_from_hf_config(MIXTRAL)
    assert ParallelLayout(2, 2, 4).problems(arch, 4) == []
    problems = ParallelLayout(3, 3, 3).problems(arch, 4)
    assert any("TP size 3" in p for p in problems) and any("EP size 3" in p for p in problems)
    assert any("PP size 3" in p for p in problems)


def test_every_megatron_parameter_needs_a_source() -> None:
    arch = architecture_from_hf_config(MIXTRAL)
    with pytest.raises(CheckpointToolError, match="no Hugging Face source"):
        megatron_tensor_from_hf("decoder.layers.0.mlp.shared_experts.linear_fc1.weight", arch,
                                lambda name: torch.zeros(1), 512)  # fmt: skip


def test_export_refuses_leftover_parameters() -> None:
    arch = Architecture(1, 8, 8, 1, 1, 8, 4, 8, 1e4, 1e-5, True)
    state = {
        "embedding.word_embeddings.weight": torch.zeros(8, 8),
        "decoder.final_layernorm.weight": torch.zeros(8),
        "decoder.layers.0.input_layernorm.weight": torch.zeros(8),
        "decoder.layers.0.self_attention.linear_qkv.weight": torch.zeros(24, 8),
        "decoder.layers.0.self_attention.linear_proj.weight": torch.zeros(8, 8),
        "decoder.layers.0.pre_mlp_layernorm.weight": torch.zeros(8),
        "decoder.layers.0.mlp.linear_fc1.weight": torch.zeros(16, 8),
        "decoder.layers.0.mlp.linear_fc2.weight": torch.zeros(8, 8),
    }
    names = [name for name, _ in hf_tensors_from_megatron(state, arch)]
    assert "lm_head.weight" not in names  # tied
    with pytest.raises(CheckpointToolError, match="no Hugging Face counterpart"):
        list(
            hf_tensors_from_megatron(
                {**state, "decoder.layers.0.extra.weight": torch.zeros(1)}, arch
            )
        )


def test_sharded_safetensors_write_read_round_trip(tmp_path: Path) -> None:
    tensors = {f"t{i}": torch.randn(16, 16) for i in range(5)}
    folder = tmp_path / "hf"
    count = write_hf_checkpoint(folder, {"model_type": "llama"}, tensors.items(), "fp32", 2048)
    assert count == 5
    assert json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(list(folder.glob("model-*-of-*.safetensors"))) == 3  # 1 KiB each, 2 per shard
    assert not list(folder.glob("*.partial"))
    reader = HFCheckpointReader(folder)
    assert all(torch.equal(reader.read(name), tensor) for name, tensor in tensors.items())
    assert reader.unused() == []


def test_failed_writes_leave_no_output_and_keep_the_old_one(tmp_path: Path) -> None:
    destination = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_output_dir(destination) as staging:
            (staging / "half.bin").write_text("partial")
            raise RuntimeError("conversion failed")
    assert not destination.exists() and list(tmp_path.iterdir()) == []
    destination.mkdir()
    (destination / "old.txt").write_text("old")
    with pytest.raises(CheckpointToolError, match="--overwrite"):
        with atomic_output_dir(destination):
            pass
    with atomic_output_dir(destination, overwrite=True) as staging:
        (staging / "new.txt").write_text("new")
    assert sorted(p.name for p in destination.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
