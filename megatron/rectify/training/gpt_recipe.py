"""megatron's GPT recipe on the rectified layer specs: what ``pretrain`` is given to build,
feed and train the model.

Owns: the model provider (a ``GPTModel`` whose MoE layers are ``RectifyMoELayer``; every chunk
it builds goes into :data:`~megatron.rectify.training.built_models.BUILT_MODELS`), inference-only
rectification for evaluation passes, the micro-batch on this rank, the loss, the forward step,
and the datasets provider (with ``--eval-data-seed``).
Must not touch: routing math, dispatcher, layer internals.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator
from functools import partial
from typing import Any

import torch

from megatron.rectify.config import RectifyOptions
from megatron.rectify.training.args import eval_rectify_options
from megatron.rectify.training.built_models import BUILT_MODELS

# ---- model --------------------------------------------------------------------------------------

#: Settings that mean something only for an MoE model, and their dense-model values.
_MOE_ONLY_ARGS = {"moe_ffn_hidden_size": None, "moe_rectify": "none", "moe_rectify_eval": "train"}


def model_provider(
    pre_process: bool = True,
    post_process: bool = True,
    vp_stage: int | None = None,
    config: Any = None,
    pg_collection: Any = None,
):
    """A ``GPTModel`` whose MoE layers are ``RectifyMoELayer`` (local or TE spec, as megatron
    would choose from ``--transformer-impl``; ``--moe-layer-freq`` respected).

    Every chunk built is registered in :data:`~megatron.rectify.training.built_models.
    BUILT_MODELS`, whose callbacks (``add_model_built_callback``) see it before it runs.

    A dense model (``args.num_experts`` None) is built with the MoE-only settings hidden: with
    ``--moe-use-upcycling``, megatron-core 0.19.2 builds the dense model to upcycle from by
    setting ``args.num_experts = None`` and leaves ``moe_ffn_hidden_size`` (filled in by its own
    argument validation), which ``TransformerConfig`` refuses ("moe_ffn_hidden_size is set but
    num_moe_experts is None"), and ``--moe-rectify`` (a dense model has no router to rectify).
    That temporary dense model is not registered: megatron deletes it after upcycling.
    """
    from megatron.training import get_args

    args = get_args()
    with _dense_model_settings(args):
        model = _build_gpt_model(args, pre_process, post_process, vp_stage, pg_collection)
    if not (args.num_experts is None and getattr(args, "moe_use_upcycling", False)):
        BUILT_MODELS.register(model)
    return model


@contextlib.contextmanager
def _dense_model_settings(args: argparse.Namespace) -> Iterator[None]:
    """Without experts, :data:`_MOE_ONLY_ARGS` at their dense values (restored afterwards)."""
    if args.num_experts is not None:
        yield
        return
    saved = {name: getattr(args, name) for name in _MOE_ONLY_ARGS}
    for name, dense_value in _MOE_ONLY_ARGS.items():
        setattr(args, name, dense_value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(args, name, value)


def _build_gpt_model(
    args: argparse.Namespace,
    pre_process: bool,
    post_process: bool,
    vp_stage: int | None,
    pg_collection: Any,
) -> torch.nn.Module:
    from megatron.core.models.gpt import GPTModel, gpt_layer_specs
    from megatron.training.argument_utils import core_transformer_config_from_args

    from megatron.rectify.config import RectifyTransformerConfig
    from megatron.rectify.layer_specs import get_gpt_decoder_block_spec_rectify

    config = core_transformer_config_from_args(args, RectifyTransformerConfig)
    use_te = args.transformer_impl == "transformer_engine"
    if args.num_experts:
        layer_spec = get_gpt_decoder_block_spec_rectify(
            config,
            use_transformer_engine=use_te,
            normalization=args.normalization,
            vp_stage=vp_stage,
        )
    elif use_te:
        layer_spec = gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec()
    else:
        layer_spec = gpt_layer_specs.get_gpt_layer_local_spec(normalization=args.normalization)
    mtp_block_spec = _mtp_block_spec(args, config, layer_spec, use_te, vp_stage)
    if not use_te and args.sequence_parallel:
        from megatron.rectify.norms import use_sequence_parallel_torch_norm

        use_sequence_parallel_torch_norm(layer_spec)
        if mtp_block_spec is not None:
            use_sequence_parallel_torch_norm(mtp_block_spec)
    model = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec,
        mtp_block_spec=mtp_block_spec,
        vocab_size=args.padded_vocab_size,
        max_sequence_length=args.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        fp16_lm_cross_entropy=args.fp16_lm_cross_entropy,
        parallel_output=True,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        position_embedding_type=args.position_embedding_type,
        rotary_percent=args.rotary_percent,
        rotary_base=args.rotary_base,
        pg_collection=pg_collection,
        vp_stage=vp_stage,
    )
    eval_options = eval_rectify_options(args)
    if eval_options is not None:
        install_eval_rectification(model, eval_options)
    return model


def _mtp_block_spec(
    args: argparse.Namespace,
    config: Any,
    layer_spec: Any,
    use_te: bool,
    vp_stage: int | None,
) -> Any:
    """The multi-token-prediction block of ``--mtp-num-layers`` (None without it, or where this
    pipeline stage builds no MTP layer), as megatron's GPT builder makes it: each MTP layer wraps
    the spec of the model's *last* decoder layer, here the rectified one, so an MTP layer of an
    MoE model routes through ``RectifyMoELayer`` too.

    megatron-core 0.19.2's ``GPTModel`` trusts ``config.mtp_num_layers`` in its loss even when no
    MTP block was built, and then fails deep in the cross entropy (an IndexError): the block
    must be built whenever the flag is set.
    """
    if not config.mtp_num_layers:
        return None
    from megatron.core.models.gpt import gpt_layer_specs

    from megatron.rectify.layer_specs import rectify_layer_spec

    if config.num_moe_experts:
        # the model-wide list (not this stage's slice, which may be empty on early stages)
        last_layer = gpt_layer_specs.get_gpt_decoder_layer_specs(
            config, use_te, normalization=args.normalization
        )[-1]
        last_layer = rectify_layer_spec(last_layer)
    else:
        last_layer = layer_spec
    return gpt_layer_specs.get_gpt_mtp_block_spec(
        config, last_layer, use_transformer_engine=use_te, vp_stage=vp_stage
    )


def install_eval_rectification(model: torch.nn.Module, eval_options: RectifyOptions) -> None:
    """Rectify with ``eval_options`` whenever the model is in eval mode (evaluation passes),
    and with the training options otherwise."""
    from megatron.rectify.router import RectifyRouter

    routers = [m for m in model.modules() if isinstance(m, RectifyRouter)]

    def switch(module: torch.nn.Module, args: tuple) -> None:
        for router in routers:
            router.set_rectify_options(
                router.training_rectify_options if module.training else eval_options
            )

    for router in routers:
        router.training_rectify_options = router.rectify_options
    model.register_forward_pre_hook(switch)


# ---- data and step ------------------------------------------------------------------------------


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Token-summed LM loss and the token count, as megatron's GPT recipe reports them."""
    losses = output_tensor.view(-1).float()
    loss_mask = loss_mask.view(-1).float()
    loss = torch.sum(losses * loss_mask)
    num_tokens = loss_mask.sum().clone().detach().to(torch.int)
    report = {"lm loss": torch.cat([loss.clone().detach().view(1), num_tokens.view(1)])}
    return loss, num_tokens, report


BATCH_KEYS = ("tokens", "labels", "loss_mask", "position_ids", "attention_mask")


def get_batch(
    data_iterator, vp_stage: int | None = None, mtp_on_this_rank: bool = False
) -> dict[str, torch.Tensor | None]:
    """The micro-batch on this rank: read on TP rank 0, broadcast over TP, sliced for CP
    (megatron-core 0.19's ``get_batch_on_this_tp_rank`` / ``get_batch_on_this_cp_rank``).

    ``mtp_on_this_rank``: this chunk holds multi-token-prediction layers, which need the input
    tokens and positions (shifted) besides the labels, also on a last pipeline stage."""
    from megatron.core import parallel_state as mpu
    from megatron.core.utils import get_batch_on_this_cp_rank, get_batch_on_this_tp_rank
    from megatron.training import get_args
    from megatron.training.utils import is_first_or_last_pipeline_stage

    if not (is_first_or_last_pipeline_stage(vp_stage) or mtp_on_this_rank):
        return dict.fromkeys(BATCH_KEYS)
    args = get_args()
    tp_rank = mpu.get_tensor_model_parallel_rank()
    batch: dict = {}
    if tp_rank == 0:
        batch = next(data_iterator)
        for key in BATCH_KEYS:
            if batch.get(key) is not None:
                batch[key] = batch[key].cuda(non_blocking=True)
    batch = get_batch_on_this_tp_rank(
        batch,
        has_cu_seqlens=False,
        is_hybrid_cp=False,
        create_attention_mask_in_dataloader=args.create_attention_mask_in_dataloader,
        broadcast_src_rank=mpu.get_tensor_model_parallel_src_rank(),
        broadcast_group=mpu.get_tensor_model_parallel_group(),
        cp_size=args.context_parallel_size,
        tp_rank=tp_rank,
        micro_batch_size=args.micro_batch_size,
        seq_length=args.seq_length,
        mtp_on_this_rank=mtp_on_this_rank,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        is_pipeline_first_stage=mpu.is_pipeline_first_stage(),
        is_pipeline_last_stage=mpu.is_pipeline_last_stage(),
    )
    return get_batch_on_this_cp_rank(
        batch, is_hybrid_cp=False, cp_group=mpu.get_context_parallel_group()
    )


def forward_step(data_iterator, model, return_schedule_plan: bool = False):
    """One micro-batch: batch on this rank -> model -> loss function.

    ``return_schedule_plan``: megatron's overlapped expert-parallel schedule
    (``--overlap-moe-expert-parallel-comm``, ``combined_1f1b``) asks for the model's schedule
    plan (its layers split into nodes) instead of the output, as Megatron-LM's GPT recipe gives
    it."""
    from megatron.core.utils import get_attr_wrapped_model
    from megatron.training import get_timers

    timers = get_timers()
    timers("batch-generator", log_level=2).start()
    batch = get_batch(
        data_iterator,
        get_attr_wrapped_model(model, "vp_stage"),
        mtp_on_this_rank=bool(get_attr_wrapped_model(model, "mtp_process")),
    )
    timers("batch-generator").stop()
    if return_schedule_plan:
        schedule_plan = model.build_schedule_plan(
            batch["tokens"],
            batch["position_ids"],
            batch["attention_mask"],
            labels=batch["labels"],
            loss_mask=batch["loss_mask"],
        )
        return schedule_plan, partial(loss_func, batch["loss_mask"])
    output_tensor = model(
        batch["tokens"],
        batch["position_ids"],
        batch["attention_mask"],
        labels=batch["labels"],
        loss_mask=batch["loss_mask"],
    )
    return output_tensor, partial(loss_func, batch["loss_mask"])


def train_valid_test_datasets_provider(train_val_test_num_samples, vp_stage=None):
    """megatron's GPT datasets (``--data-path`` / ``--mock-data``) via its blended builder;
    with ``--eval-data-seed`` the validation and test splits come from a second build under
    that seed (an index over the same documents, so only their sample order changes)."""
    from megatron.core import parallel_state
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset
    from megatron.training import get_args, get_tokenizer, print_rank_0
    from megatron.training.utils import (
        get_blend_and_blend_per_split,
        is_first_or_last_pipeline_stage,
    )

    args = get_args()
    blend, blend_per_split = get_blend_and_blend_per_split(args)

    def config_with_seed(random_seed: int) -> GPTDatasetConfig:
        return GPTDatasetConfig(
            random_seed=random_seed,
            sequence_length=args.seq_length,
            blend=blend,
            blend_per_split=blend_per_split,
            split=args.split,
            num_dataset_builder_threads=args.num_dataset_builder_threads,
            path_to_cache=args.data_cache_path,
            mmap_bin_files=args.mmap_bin_files,
            tokenizer=get_tokenizer(),
            reset_position_ids=args.reset_position_ids,
            reset_attention_mask=args.reset_attention_mask,
            eod_mask_loss=args.eod_mask_loss,
            create_attention_mask=args.create_attention_mask_in_dataloader,
        )

    dataset_type = MockGPTDataset if args.mock_data else GPTDataset

    def built_on_this_rank() -> bool:
        return (
            is_first_or_last_pipeline_stage(vp_stage)
            and parallel_state.get_tensor_model_parallel_rank() == 0
        )

    def build(random_seed: int) -> list:
        return BlendedMegatronDatasetBuilder(
            dataset_type,
            train_val_test_num_samples,
            built_on_this_rank,
            config_with_seed(random_seed),
        ).build()

    print_rank_0("> building train, validation, and test datasets for GPT ...")
    datasets = build(args.seed)
    eval_seed = getattr(args, "eval_data_seed", None)
    if eval_seed is not None and eval_seed != args.seed:
        # megatron draws every split's sample order from one seed; held-out splits get their own
        print_rank_0(f"> validation and test sample order from --eval-data-seed {eval_seed}")
        datasets = [datasets[0], *build(eval_seed)[1:]]
    print_rank_0("> finished creating GPT datasets ...")
    return datasets


train_valid_test_datasets_provider.is_distributed = True
