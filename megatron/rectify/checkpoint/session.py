"""A megatron process for the checkpoint tools: parsed flags, initialised globals, a model.

The tools build the *same* ``GPTModel`` that ``pretrain_gpt_rectify.py`` trains (same flag
parser, same model provider, same layer specs) and save and load through megatron's own
``save_checkpoint`` / ``load_checkpoint``, so a converted checkpoint is exactly what a training
run writes and reads.

Conversion is a CPU job (host memory, any target layout on any machine): the scripts in
``tools/checkpoint`` hide the GPUs (``CUDA_VISIBLE_DEVICES=''``) before torch is imported. On a
machine without CUDA megatron-core cannot start on its own, so a session always runs it under
the CPU development mode (:mod:`megatron.rectify.dev`: the emulation layer, gloo, the local
spec), in one process (``convert_hf.py import``) or under ``torchrun`` in any TP/EP layout
(``convert_hf.py verify``). This is the one product path that uses the development mode, and
the reason it is explicit here: :func:`start_megatron` refuses to start where CUDA is visible
(the emulation never shadows a real GPU) and switches the emulation on otherwise.

megatron keeps its state in module globals (args, timers, parallel groups), so one process
holds one session; the command-line tools are one process per command.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from megatron.rectify.checkpoint.errors import CheckpointToolError

#: Flags every tool session adds in front of the user's: a checkpoint carries no optimizer or
#: RNG state from a conversion, and torch_dist is the resharding-capable format.
SESSION_DEFAULT_ARGS = (
    "--cpu-emulation",
    "--use-cpu-initialization",
    "--micro-batch-size",
    "1",
    "--ckpt-format",
    "torch_dist",
    "--no-save-optim",
    "--no-save-rng",
    "--no-load-optim",
    "--no-load-rng",
    "--train-iters",
    "1",
    "--lr",
    "0",
    "--save-interval",
    "1",
)


def _single_process_environment() -> None:
    """Without torchrun, be rank 0 of a world of one."""
    if "RANK" in os.environ:
        return
    from megatron.rectify.dev.multiprocess import find_free_port

    os.environ.update(
        RANK="0",
        LOCAL_RANK="0",
        WORLD_SIZE="1",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(find_free_port()),
    )


def start_megatron(
    flags: Sequence[str],
    padded_vocab_size: int | None = None,
    prog: str = "checkpoint tool",
    routing_from_checkpoint: bool = True,
) -> argparse.Namespace:
    """Parse ``flags`` as ``pretrain_gpt_rectify.py`` would, then initialise megatron.

    ``padded_vocab_size``: the embedding rows to build. Conversions know it from the source
    checkpoint, so no tokenizer is built; ``None`` takes it from a ``--load`` checkpoint's args.
    ``routing_from_checkpoint``: with ``--use-checkpoint-args``, restore the saved routing
    (capacity, dispatcher, rectify...) too, not only the architecture.
    """
    if torch.cuda.is_available():
        raise CheckpointToolError(
            "checkpoint tools run on the CPU: start them with CUDA_VISIBLE_DEVICES='' "
            "(the tools in tools/checkpoint do this themselves)."
        )
    from megatron.rectify.dev.mode import CPU_EMULATION_DEFAULT_ARGS, activate_cpu_emulation
    from megatron.rectify.megatron_patches import use_prebuilt_dataset_helpers
    from megatron.rectify.training.args import parse_and_validate_args
    from megatron.rectify.training.checkpoint_args import architecture_only

    activate_cpu_emulation()  # no CUDA here (refused above): megatron needs the emulation
    _single_process_environment()

    sys.argv = [prog, *CPU_EMULATION_DEFAULT_ARGS, *SESSION_DEFAULT_ARGS, *flags]
    with contextlib.nullcontext() if routing_from_checkpoint else architecture_only():
        args = parse_and_validate_args(build_tokenizer=False, prog=prog)
    if padded_vocab_size is None:
        padded_vocab_size = _padded_vocab_size_of_checkpoint(args.load)
    args.padded_vocab_size = padded_vocab_size

    from megatron.training import initialize

    use_prebuilt_dataset_helpers()
    initialize.initialize_megatron(allow_no_cuda=True)
    return args


def _padded_vocab_size_of_checkpoint(load_dir: str | None) -> int:
    if load_dir is None:
        raise CheckpointToolError("internal: a session without --load must be given the vocab size")
    from megatron.rectify.checkpoint.layout import read_checkpoint_args

    return int(read_checkpoint_args(load_dir).padded_vocab_size)


def build_model() -> torch.nn.Module:
    """The training run's model (``model_provider``), unwrapped, on this rank."""
    from megatron.core import parallel_state

    from megatron.rectify.training.gpt_recipe import model_provider

    return model_provider(
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
    )


def save_release_checkpoint(model: torch.nn.Module, recorded_save_dir: Path | None = None) -> None:
    """Write ``model`` to ``--save`` as megatron's ``release`` checkpoint: training that loads it
    starts at iteration 0 with a fresh optimizer, as after megatron's own converters.

    ``recorded_save_dir``: the ``--save`` the checkpoint's args should name. The tools write
    into a staging folder that is renamed when complete; the saved args must name the final
    folder, so megatron's ``generate_state_dict`` is given a copy of the args that says so.
    """
    from megatron.training import checkpointing

    from megatron.rectify.megatron_patches import recording_save_dir

    with recording_save_dir(recorded_save_dir):
        checkpointing.save_checkpoint(0, [model], None, None, 0, release=True)


def load_model_weights(model: torch.nn.Module) -> None:
    """Read ``--load`` into ``model`` (any saved layout: dist-checkpointing reshards)."""
    from megatron.training.checkpointing import load_checkpoint

    load_checkpoint([model], None, None, strict=True)


def megatron_state_dict(model: torch.nn.Module) -> dict[str, Any]:
    """Parameters and persistent buffers under their module names, ``_extra_state`` dropped."""
    return {
        name: tensor
        for name, tensor in model.state_dict().items()
        if not name.endswith("_extra_state")
    }
