"""Canary for the ``--yaml-cfg`` refusal (``megatron.rectify.training.args.yaml_cfg_problem``).

``pretrain_gpt_rectify.py`` refuses ``--yaml-cfg`` because megatron-core 0.19.2's experimental
YAML mode cannot train a GPT even without rectification. This test runs megatron's own YAML path
(``parse_args`` -> ``load_yaml``, ``validate_yaml``, then the optimizer set-up of its training
loop) on a YAML file holding every setting of the tiny test model, laid out as ``validate_yaml``
needs it. It fails when megatron's YAML path gets through: then the refusal must be revisited
(and rectification's flags read from the YAML).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import pytest

from megatron.rectify.dev.tiny_model import MOCK_DATA, TINY_MODEL, TOP1_ROUTING, tiny_schedule

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]

#: The tiny model, 3 iterations, top-1 routing, no rectify flags (megatron's YAML path knows
#: none) and no CPU emulation (only megatron's parse, validation and optimizer set-up run).
TINY = [*TINY_MODEL, *tiny_schedule(train_iters=3), *TOP1_ROUTING, *MOCK_DATA]

#: Read by ``validate_yaml`` at the top level although they are ``TransformerConfig`` fields;
#: ``validate_yaml`` refuses a key that is both at the top level and in ``language_model``.
_TOP_LEVEL_CONFIG_FIELDS = {
    "account_for_embedding_in_pipeline_split",
    "account_for_loss_in_pipeline_split",
}


def _yaml_safe(value: Any) -> bool:
    import yaml

    try:
        json.dumps(value)
        yaml.safe_dump(value)
    except (TypeError, yaml.YAMLError):
        return False
    return True


def _complete_yaml(args: Any) -> dict[str, Any]:
    """Every parsed setting, in megatron's YAML layout: ``model_parallel`` (its
    ``ModelParallelConfig`` fields), ``language_model`` (the other ``TransformerConfig``
    fields) and the rest at the top level, no key twice."""
    from megatron.core.model_parallel_config import ModelParallelConfig
    from megatron.core.transformer import TransformerConfig

    parallel = {f.name for f in dataclasses.fields(ModelParallelConfig)}
    model_parallel = {
        name: getattr(args, name, None) if _yaml_safe(getattr(args, name, None)) else None
        for name in parallel
    }
    language_model = {}
    for field in dataclasses.fields(TransformerConfig):
        if field.name in parallel or field.name in _TOP_LEVEL_CONFIG_FIELDS:
            continue
        name = "num_experts" if field.name == "num_moe_experts" else field.name
        if hasattr(args, name):
            value = getattr(args, name)
        elif field.default is not dataclasses.MISSING and not callable(field.default):
            value = field.default
        else:
            value = None
        if _yaml_safe(value):
            language_model[field.name] = value
    top = {
        name: value
        for name, value in vars(args).items()
        if name not in parallel and name not in language_model and _yaml_safe(value)
    }
    top.pop("yaml_cfg", None)
    return {**top, "language_model": language_model, "model_parallel": model_parallel}


def test_megatrons_own_yaml_path_cannot_train_a_gpt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import yaml
    from megatron.training.arguments import parse_args
    from megatron.training.training import get_megatron_optimizer_config
    from megatron.training.yaml_arguments import validate_yaml

    from megatron.rectify.training.args import add_rectify_args

    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(sys, "argv", ["pretrain_gpt_rectify.py", *TINY])
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(_complete_yaml(parse_args(add_rectify_args))))

    monkeypatch.setattr(sys, "argv", ["pretrain_gpt_rectify.py", "--yaml-cfg", str(config)])
    args = validate_yaml(parse_args(add_rectify_args))  # megatron's steps: load, validate
    assert args.num_layers == 2 and args.num_experts == 4  # the file was read and validated
    with pytest.raises(AssertionError, match="main_grads_dtype"):
        get_megatron_optimizer_config(args)  # what pretrain() builds its optimizer from
