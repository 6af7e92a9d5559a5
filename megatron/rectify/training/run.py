"""The entry point ``pretrain_gpt_rectify.py`` runs: megatron's ``pretrain`` loop on the
rectified MoE GPT, and what happens around it.

Owns: :func:`main` (CPU mode when asked for, parse and check the flags, the megatron patches a
run needs, ``pretrain`` with the GPT recipe), the end-of-run routing summary, and the clean
shutdown of the process groups. (Named ``run``, not ``main``: the package re-exports the
function ``main``, which would shadow a submodule of that name.)
"""

from __future__ import annotations

import sys
from collections.abc import Iterable

import torch

from megatron.rectify import megatron_patches
from megatron.rectify.dev import mode as dev_mode
from megatron.rectify.training.args import parse_and_validate_args
from megatron.rectify.training.built_models import BUILT_MODELS
from megatron.rectify.training.gpt_recipe import (
    forward_step,
    model_provider,
    train_valid_test_datasets_provider,
)


def main() -> None:
    """``pretrain_gpt_rectify.py``: megatron's pretrain loop on the rectified MoE GPT.

    CPU development mode (``--cpu-emulation`` or ``MEGATRON_RECTIFY_CPU_EMULATION=1``, see
    :mod:`megatron.rectify.dev.mode`) is imported and switched on only when asked for."""
    cpu = dev_mode.cpu_emulation_requested()
    if cpu:
        dev_mode.activate_cpu_emulation()
        sys.argv[1:1] = list(dev_mode.CPU_EMULATION_DEFAULT_ARGS)
    from megatron.core.enums import ModelType
    from megatron.training import training
    from megatron.training.argument_utils import pretrain_cfg_container_from_args

    args = parse_and_validate_args(training_data=True)
    megatron_patches.use_prebuilt_dataset_helpers()
    from megatron.rectify.moe_layer import STATISTIC_NAMES
    from megatron.rectify.statistics import routing_statistics_available

    if routing_statistics_available(args):
        # unrectified training calls are counted too (megatron's own routing): a vanilla run
        # logs its real rates as a baseline
        megatron_patches.report_routing_statistics_with_the_moe_metrics(STATISTIC_NAMES)
    if args.moe_use_upcycling:
        megatron_patches.fix_upcycling_load_keyword()
    if args.use_distributed_optimizer:
        megatron_patches.fix_distributed_optimizer_loading()
    if cpu:
        megatron_patches.allow_cpu_only_initialisation(training)
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*recommended to use a ModelConfig.*")
        cfg = pretrain_cfg_container_from_args(args)
    try:
        training.pretrain(
            cfg,
            train_valid_test_datasets_provider,
            ModelType.encoder_or_decoder,
            forward_step,
            model_provider=model_provider,
        )
    except SystemExit as exiting:  # megatron ends --exit-interval/--exit-duration runs this way
        if not exiting.code:
            _shut_down_distributed()
        raise
    print_routing_summary(BUILT_MODELS.moe_layers())
    if dev_mode.replica_check_requested():
        from megatron.rectify.dev.replica_check import check_data_parallel_replicas

        check_data_parallel_replicas(BUILT_MODELS.chunks)
    _shut_down_distributed()


def print_routing_summary(layers: Iterable[torch.nn.Module]) -> None:
    """Per MoE layer of ``layers`` (this rank's ``RectifyMoELayer`` modules, in layer order):
    dropped / padded / filled-in / rectified % over training.

    Printed by the first data-parallel rank of each pipeline stage, for the tokens it routed.
    """
    from megatron.core import parallel_state

    if (
        parallel_state.get_data_parallel_rank() != 0
        or parallel_state.get_tensor_model_parallel_rank()
    ):
        return
    summaries = [(_layer_label(layer), layer.statistics_summary()) for layer in layers]
    summaries = [(label, summary) for label, summary in summaries if summary]
    if not summaries:
        return
    stage = parallel_state.get_pipeline_model_parallel_rank()
    print(
        f"rectify routing summary (pipeline stage {stage}, this rank's tokens, all training "
        "iterations):",
        flush=True,
    )
    for label, summary in summaries:
        print(
            f"  MoE layer {label}: dropped {summary['dropped_pct']:.2f} % | padded "
            f"{summary['padded_pct']:.2f} % | filled-in {summary['filled_in_pct']:.2f} % | "
            f"rectified {summary['rectified_pct']:.2f} %",
            flush=True,
        )


def _layer_label(layer: torch.nn.Module) -> str:
    """``3`` for decoder layer 3; ``3 (MTP 1)`` for multi-token-prediction layer 1 of a
    2-layer decoder (the number megatron's per-layer MoE metrics use)."""
    from megatron.rectify.training.built_models import model_layer_number

    number = model_layer_number(layer)
    if getattr(layer, "is_mtp_layer", False):
        return f"{number} (MTP {layer.layer_number})"
    return str(number)


def _shut_down_distributed() -> None:
    """End of a run that went well: wait for megatron's asynchronous checkpoint writes and
    checkpoint-deletion processes, then tear the process groups down on every rank together.
    Leaving gloo's groups to the interpreter's exit has aborted a process after a checkpoint
    load ("terminate called without an active exception")."""
    if not torch.distributed.is_initialized():
        return
    from megatron.training.async_utils import is_empty_async_queue, maybe_finalize_async_save
    from megatron.training.checkpointing import finalize_deletion_processes

    if not is_empty_async_queue():  # pretrain() already finalised them, unless it was cut short
        maybe_finalize_async_save(blocking=True, terminate=True)
    finalize_deletion_processes(blocking=True)
    torch.distributed.barrier()  # no rank may close its connections while a peer still talks
    torch.distributed.destroy_process_group()
