"""What ``pretrain_gpt_rectify.py`` plugs into ``megatron.training.pretrain``.

Owns: the ``--moe-rectify*`` CLI flags (added next to megatron's own through its
``extra_args_provider`` hook), the early validation that turns a bad combination into one line
naming the flag, the GPT model provider on the rectified layer specs, the dataset provider and
forward step (megatron's GPT recipe), inference-only rectification for evaluation passes, and
the optional CPU development mode.
Must not touch: routing math, dispatcher, layer internals.
"""

from __future__ import annotations

import argparse
import os
import sys
from functools import partial
from typing import Any

import torch

from megatron.rectify.config import (
    FILL_IN_CANDIDATES,
    IR_TRIGGERS,
    RECTIFY_MODES,
    RectifyConfigError,
    RectifyOptions,
    validate_rectify_settings,
)

CPU_EMULATION_ENV = "MEGATRON_RECTIFY_CPU_EMULATION"
CHECK_REPLICAS_ENV = "MEGATRON_RECTIFY_CHECK_REPLICAS"
#: What ``--cpu-emulation`` implies: gloo, the local (non-TE) spec, and no CUDA-only fusions.
#: Prepended to the command line, so an explicit flag of the user's still wins.
CPU_EMULATION_DEFAULT_ARGS = (
    "--distributed-backend",
    "gloo",
    "--transformer-impl",
    "local",
    "--no-gradient-accumulation-fusion",
    "--no-masked-softmax-fusion",
    "--no-bias-gelu-fusion",
    "--no-bias-dropout-fusion",
    "--no-rope-fusion",
    "--no-persist-layer-norm",
)
_LIVE_MODELS: list = []  # the model chunks this rank built, for the replica check


# ---- command line -------------------------------------------------------------------------------


def add_rectify_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The Rectify-Router flags, in their own group of megatron's ``--help``."""
    group = parser.add_argument_group(title="rectify-router (megatron-rectify)")
    group.add_argument(
        "--moe-rectify",
        choices=RECTIFY_MODES,
        default="none",
        help="Rectify top-k routing after capacity truncation: ir = Intra-GPU Rectification "
        "(dropped tokens go to the best expert on their own GPU), fr = Fill-in Rectification "
        "(padding slots take the best unrouted tokens), ir+fr = both. Needs "
        "--moe-expert-capacity-factor and --moe-token-dispatcher-type alltoall.",
    )
    group.add_argument(
        "--moe-rectify-ir-trigger",
        choices=IR_TRIGGERS,
        default="all",
        help="Which tokens IR rescues: all = every top-k choice dropped (and no fill-in slot "
        "won); any / ignore_kth = at least one top-k choice dropped (ignore_kth is the "
        "setting for ir+fr).",
    )
    group.add_argument(
        "--moe-rectify-fill-in-candidates",
        choices=FILL_IN_CANDIDATES,
        default="next",
        help="Fill-in candidates: next = only each token's (k+1)-th choice; any = any expert "
        "outside its top-k.",
    )
    group.add_argument(
        "--no-moe-rectify-straight-through",
        dest="moe_rectify_straight_through",
        action="store_false",
        help="Ablation: back-propagate through the gate-weight denominator (a token with one "
        "surviving choice then gives the router no gradient).",
    )
    group.add_argument(
        "--moe-rectify-eval",
        choices=("train", *RECTIFY_MODES),
        default="train",
        help="Rectification during evaluation passes only (train = as in training). The paper "
        "shows rectification applied only at inference already helps.",
    )
    group.add_argument(
        "--eval-data-seed",
        type=int,
        default=None,
        help="Seed of the validation and test sample order (default: --seed, megatron's "
        "behaviour). Fixing it gives runs with different --seed the same held-out batches, so "
        "their losses differ by the model only, not by which held-out sequences were drawn.",
    )
    group.add_argument(
        "--cpu-emulation",
        action="store_true",
        help=f"Run on a machine without GPUs through megatron-rectify's CPU emulation layer "
        f"(gloo). Slow; for development and CI only. Same as {CPU_EMULATION_ENV}=1. Implies "
        f"{' '.join(CPU_EMULATION_DEFAULT_ARGS)}.",
    )
    _escape_unformattable_help(parser)
    return parser


def _escape_unformattable_help(parser: argparse.ArgumentParser) -> None:
    """megatron-core 0.19.2 has a help text with a bare '%' (``--moe-paged-stash-buffer-size-
    factor-cuda``) that makes ``--help`` crash in argparse; escape such texts."""
    formatter = parser._get_formatter()
    for action in parser._actions:
        if action.help and "%" in action.help:
            try:
                formatter._expand_help(action)
            except (ValueError, TypeError, KeyError):
                action.help = action.help.replace("%", "%%")


class _ArgsAsConfig:
    """Read CLI args under ``TransformerConfig`` names (``--num-experts`` -> num_moe_experts)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self._args = args

    def __getattr__(self, name: str) -> Any:
        if name == "num_moe_experts":
            return self._args.num_experts
        return getattr(self._args, name)


def rectify_arg_problems(args: argparse.Namespace) -> list[str]:
    """Everything wrong with the rectify-related flags, as messages naming flag and fix."""
    topk = args.moe_router_topk
    if args.num_experts and not 1 <= topk <= args.num_experts:  # the checks below assume it
        return [
            f"--moe-router-topk {topk} is out of range for --num-experts {args.num_experts}: set "
            f"it between 1 and {args.num_experts} (the number of experts each token is routed to)."
        ]
    problems = []
    try:
        validate_rectify_settings(_ArgsAsConfig(args))
    except RectifyConfigError as error:
        problems.append(str(error))
    # megatron-core 0.19.2 finds this only in initialize_model_parallel, as a RuntimeError on
    # every rank; args.world_size is megatron's reading of WORLD_SIZE (1 without a launcher).
    expert_grid = (
        args.expert_model_parallel_size
        * (args.expert_tensor_parallel_size or args.tensor_model_parallel_size)
        * args.pipeline_model_parallel_size
        * (getattr(args, "expert_gtp_weight_remat_size", None) or 1)
    )
    if args.world_size % expert_grid:
        problems.append(
            f"--expert-model-parallel-size {args.expert_model_parallel_size} does not fit "
            f"{args.world_size} processes (WORLD_SIZE): expert-model x expert-tensor x pipeline "
            f"parallel sizes = {expert_grid} must divide the number of processes. Launch a "
            f"multiple of {expert_grid} processes or lower --expert-model-parallel-size."
        )
    if args.num_experts is not None and args.num_experts % args.expert_model_parallel_size:
        problems.append(
            f"--num-experts {args.num_experts} is not divisible by "
            f"--expert-model-parallel-size {args.expert_model_parallel_size}: every EP rank "
            "must hold the same number of experts."
        )
    expert_tp = args.expert_tensor_parallel_size or args.tensor_model_parallel_size
    if args.num_experts and args.add_bias_linear and expert_tp > 1:
        # megatron-core 0.19.2 asserts this in TransformerConfig.__post_init__, at model build.
        problems.append(
            f"expert tensor parallel size {expert_tp} (--expert-tensor-parallel-size, default "
            "--tensor-model-parallel-size) with expert biases: megatron-core supports MoE "
            "biases only at expert-TP 1. Add --disable-bias-linear or set "
            "--expert-tensor-parallel-size 1."
        )
    if args.num_experts and args.moe_router_topk == 1 and not args.moe_router_pre_softmax:
        problems.append(
            "--moe-router-topk 1 needs --moe-router-pre-softmax (megatron-core refuses top-1 "
            "without it: a softmax over the one chosen logit is always 1 and trains no router)."
        )
    rectifying = args.moe_rectify != "none" or args.moe_rectify_eval not in ("train", "none")
    if rectifying and args.moe_token_dispatcher_type != "alltoall":
        problems.append(
            f"--moe-rectify needs --moe-token-dispatcher-type alltoall (got "
            f"{args.moe_token_dispatcher_type}): only the rectified alltoall dispatcher keeps "
            "intra-GPU-rectified tokens off the all-to-all."
        )
    if rectifying and args.num_experts is None:
        problems.append("--moe-rectify needs an MoE model: set --num-experts.")
    if args.moe_rectify_eval not in ("train", "none") and args.num_experts is not None:
        try:
            validate_rectify_settings(_EvalModeArgs(args))
        except RectifyConfigError as error:
            problems.append(str(error).replace("--moe-rectify ", "--moe-rectify-eval "))
    return problems


class _EvalModeArgs(_ArgsAsConfig):
    def __getattr__(self, name: str) -> Any:
        if name == "moe_rectify":
            return self._args.moe_rectify_eval
        return super().__getattr__(name)


def eval_rectify_options(args: argparse.Namespace) -> RectifyOptions | None:
    """Options for evaluation passes, or None when they are the training ones."""
    if args.moe_rectify_eval == "train":
        return None
    return RectifyOptions.from_mode(
        args.moe_rectify_eval,
        ir_trigger=args.moe_rectify_ir_trigger,
        fill_in_candidates=args.moe_rectify_fill_in_candidates,
        straight_through=args.moe_rectify_straight_through,
        drop_policy=args.moe_token_drop_policy,
    )


def cpu_emulation_requested(argv: list[str] | None = None) -> bool:
    argv = sys.argv if argv is None else argv
    return "--cpu-emulation" in argv or os.environ.get(CPU_EMULATION_ENV) == "1"


def parse_and_validate_args(
    args_defaults: dict | None = None,
    build_tokenizer: bool = True,
    prog: str = "pretrain_gpt_rectify.py",
    training_data: bool = False,
) -> argparse.Namespace:
    """megatron's parse -> our checks (exit 2 with a message) -> megatron's validation.

    ``training_data`` (``pretrain_gpt_rectify.py``, not the checkpoint tools): a run given no
    data source trains on the embedded corpus, and the data it names is checked (prefixes exist,
    files are whole, every split megatron builds has tokens) before anything is built.
    """
    from megatron.training.arguments import parse_args, validate_args
    from megatron.training.global_vars import set_global_variables

    from megatron.rectify.data import install_byte_level_tokenizer
    from megatron.rectify.data_checks import data_source_problem

    install_byte_level_tokenizer()  # --tokenizer-type ByteLevel; before megatron's parser exists
    args_defaults = args_defaults or {}
    args = parse_args(add_rectify_args)
    _restore_model_args_from_checkpoint(args, prog)
    problems = rectify_arg_problems(args)
    if problems:
        for problem in problems:
            print(f"{prog}: error: {problem}", file=sys.stderr)
        sys.exit(2)
    if training_data:
        _default_to_the_embedded_corpus(args)
    try:
        validate_args(args, args_defaults)
    except AssertionError as error:  # megatron's checks are bare asserts: say which one failed
        print(
            f"{prog}: error: megatron argument check failed: {_failed_assertion(error)}",
            file=sys.stderr,
        )
        sys.exit(2)
    problem = data_source_problem(args) if training_data else None  # needs validate's --split
    if problem:
        print(f"{prog}: error: {problem}", file=sys.stderr)
        sys.exit(2)
    set_global_variables(args, build_tokenizer=build_tokenizer)
    return args


def _restore_model_args_from_checkpoint(args: argparse.Namespace, prog: str) -> None:
    """``--load`` before megatron starts: the tracker file checked, ``--use-checkpoint-args``
    (architecture and routing) restored, unreadable checkpoint files reported in one line; see
    :mod:`megatron.rectify.checkpoint_args`."""
    from megatron.rectify.checkpoint_args import prepare_checkpoint_load

    prepare_checkpoint_load(args, prog)


def _failed_assertion(error: AssertionError) -> str:
    """The assertion's message, or its source line when it has none."""
    import traceback

    if str(error):
        return str(error)
    frame = traceback.extract_tb(error.__traceback__)[-1]
    return f"`{frame.line}` ({os.path.basename(frame.filename)}:{frame.lineno})"


# ---- model, data, step --------------------------------------------------------------------------


def model_provider(
    pre_process: bool = True,
    post_process: bool = True,
    vp_stage: int | None = None,
    config: Any = None,
    pg_collection: Any = None,
):
    """A ``GPTModel`` whose MoE layers are ``RectifyMoELayer`` (local or TE spec, as megatron
    would choose from ``--transformer-impl``; ``--moe-layer-freq`` respected)."""
    from megatron.core.models.gpt import GPTModel, gpt_layer_specs
    from megatron.training import get_args
    from megatron.training.argument_utils import core_transformer_config_from_args

    from megatron.rectify.config import RectifyTransformerConfig
    from megatron.rectify.layer_specs import get_gpt_decoder_block_spec_rectify

    args = get_args()
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
    if not use_te and args.sequence_parallel:
        from megatron.rectify.norms import use_sequence_parallel_torch_norm

        use_sequence_parallel_torch_norm(layer_spec)
    model = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec,
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
    _LIVE_MODELS.append(model)
    return model


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


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Token-summed LM loss and the token count, as megatron's GPT recipe reports them."""
    losses = output_tensor.view(-1).float()
    loss_mask = loss_mask.view(-1).float()
    loss = torch.sum(losses * loss_mask)
    num_tokens = loss_mask.sum().clone().detach().to(torch.int)
    report = {"lm loss": torch.cat([loss.clone().detach().view(1), num_tokens.view(1)])}
    return loss, num_tokens, report


BATCH_KEYS = ("tokens", "labels", "loss_mask", "position_ids", "attention_mask")


def get_batch(data_iterator, vp_stage: int | None = None) -> dict[str, torch.Tensor | None]:
    """The micro-batch on this rank: read on TP rank 0, broadcast over TP, sliced for CP
    (megatron-core 0.19's ``get_batch_on_this_tp_rank`` / ``get_batch_on_this_cp_rank``)."""
    from megatron.core import parallel_state as mpu
    from megatron.core.utils import get_batch_on_this_cp_rank, get_batch_on_this_tp_rank
    from megatron.training import get_args
    from megatron.training.utils import is_first_or_last_pipeline_stage

    if not is_first_or_last_pipeline_stage(vp_stage):
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
        mtp_on_this_rank=False,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        is_pipeline_first_stage=mpu.is_pipeline_first_stage(),
        is_pipeline_last_stage=mpu.is_pipeline_last_stage(),
    )
    return get_batch_on_this_cp_rank(
        batch, is_hybrid_cp=False, cp_group=mpu.get_context_parallel_group()
    )


def forward_step(data_iterator, model):
    """One micro-batch: batch on this rank -> model -> loss function."""
    from megatron.core.utils import get_attr_wrapped_model
    from megatron.training import get_timers

    timers = get_timers()
    timers("batch-generator", log_level=2).start()
    batch = get_batch(data_iterator, get_attr_wrapped_model(model, "vp_stage"))
    timers("batch-generator").stop()
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


# ---- entry point --------------------------------------------------------------------------------


def main() -> None:
    """``pretrain_gpt_rectify.py``: megatron's pretrain loop on the rectified MoE GPT."""
    cpu = cpu_emulation_requested()
    if cpu:
        from megatron.rectify.testing import cpu_emulation

        cpu_emulation.activate()
        sys.argv[1:1] = list(CPU_EMULATION_DEFAULT_ARGS)
    from megatron.core.enums import ModelType
    from megatron.training import training
    from megatron.training.argument_utils import pretrain_cfg_container_from_args

    args = parse_and_validate_args(training_data=True)
    _use_prebuilt_dataset_helpers()
    from megatron.rectify.router import routing_statistics_available

    if routing_statistics_available(args):
        _report_routing_statistics_with_the_moe_metrics()
    if cpu:
        _allow_cpu_only_initialisation(training)
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
    print_routing_summary()
    if os.environ.get(CHECK_REPLICAS_ENV) == "1":
        check_data_parallel_replicas()
    _shut_down_distributed()


def check_data_parallel_replicas() -> None:
    """After training, every replica of a parameter must hold the same values: dense parameters
    across the data-parallel group (and across the tensor-parallel group when they are not
    TP-sharded, e.g. norms under sequence parallelism), expert parameters across the
    expert-data-parallel group. Prints one line; raises if any parameter differs (a silent
    divergence, e.g. from RNG initialisation or a missing gradient all-reduce, would otherwise
    go unnoticed)."""
    from megatron.core import parallel_state

    mismatched = []
    for model in _LIVE_MODELS:
        for name, param in model.named_parameters():
            is_expert = not getattr(param, "allreduce", True)
            if is_expert:
                groups = [parallel_state.get_expert_data_parallel_group()]
            else:
                groups = [parallel_state.get_data_parallel_group()]
                if not getattr(param, "tensor_model_parallel", False):
                    groups.append(parallel_state.get_tensor_model_parallel_group())
            mine = param.detach().double().sum().reshape(1)
            for group in groups:
                if group.size() == 1:
                    continue
                every = [torch.zeros_like(mine) for _ in range(group.size())]
                torch.distributed.all_gather(every, mine, group=group)
                if any(not torch.equal(other, mine) for other in every):
                    mismatched.append(name)
    rank = torch.distributed.get_rank()
    if mismatched:
        raise RuntimeError(f"rank {rank}: replicas differ in {sorted(set(mismatched))[:5]}")
    print(f"replica check (rank {rank}): data-parallel replicas hold identical weights", flush=True)


def print_routing_summary() -> None:
    """Per MoE layer on this rank: dropped / padded / filled-in / rectified % over training.

    Printed by the first data-parallel rank of each pipeline stage, for the tokens it routed.
    """
    from megatron.core import parallel_state

    from megatron.rectify.moe_layer import LIVE_LAYERS

    if (
        parallel_state.get_data_parallel_rank() != 0
        or parallel_state.get_tensor_model_parallel_rank()
    ):
        return
    layers = sorted(LIVE_LAYERS, key=lambda layer: layer.layer_number or 0)
    summaries = [(layer.layer_number, layer.statistics_summary()) for layer in layers]
    summaries = [(number, summary) for number, summary in summaries if summary]
    if not summaries:
        return
    stage = parallel_state.get_pipeline_model_parallel_rank()
    print(
        f"rectify routing summary (pipeline stage {stage}, this rank's tokens, all training "
        "iterations):",
        flush=True,
    )
    for number, summary in summaries:
        print(
            f"  MoE layer {number}: dropped {summary['dropped_pct']:.2f} % | padded "
            f"{summary['padded_pct']:.2f} % | filled-in {summary['filled_in_pct']:.2f} % | "
            f"rectified {summary['rectified_pct']:.2f} %",
            flush=True,
        )


def _default_to_the_embedded_corpus(args: argparse.Namespace) -> None:
    """With no data source at all, train on the embedded corpus (Python's standard library,
    byte-level tokens; built once and cached), with its ``--split`` and ``--tokenizer-type
    ByteLevel`` unless the user gave them.

    Decided from the parsed arguments, so every spelling of a data flag (``--data-path=P``,
    ``--train-data-path``, ``--data-args-path``, ``--per-split-data-args-path``,
    ``--mock-data``) counts; megatron's ``validate_args`` then sees the data as if given.
    """
    from megatron.rectify.data import (
        BYTE_LEVEL_TOKENIZER_TYPE,
        EMBEDDED_CORPUS_SPLIT,
        ensure_embedded_corpus,
    )

    sources = (
        args.data_path,
        args.data_args_path,
        args.train_data_path,
        args.valid_data_path,
        args.test_data_path,
        args.per_split_data_args_path,
    )
    if args.mock_data or any(source is not None for source in sources):
        return
    args.data_path = [ensure_embedded_corpus()]
    if args.split is None:
        args.split = EMBEDDED_CORPUS_SPLIT
    if args.tokenizer_type is None:
        args.tokenizer_type = BYTE_LEVEL_TOKENIZER_TYPE


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


def _report_routing_statistics_with_the_moe_metrics() -> None:
    """megatron's training log reports only the MoE metric names it knows (aux losses); add
    ours so that dropped / padded / filled-in / rectified % appear in the iteration log line and
    in TensorBoard (per layer with ``--moe-per-layer-logging``).

    Call it only where ``router.routing_statistics_available`` holds (``main`` does): megatron
    reports a registered name that no layer recorded as 0.00, which reads as "nothing dropped"
    (the old ``--moe-rectify none --moe-rectify-eval ...`` log). Unrectified training calls are
    counted too (megatron's own routing), so a vanilla run logs its real rates as a baseline."""
    from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker

    from megatron.rectify.moe_layer import STATISTIC_NAMES

    tracker = get_moe_metrics_tracker()
    report = tracker.report

    def report_with_rectify_statistics(*args: Any, track_names: Any = None, **kwargs: Any):
        if track_names is not None:
            track_names = [*track_names, *STATISTIC_NAMES]
        return report(*args, track_names=track_names, **kwargs)

    tracker.report = report_with_rectify_statistics


def _use_prebuilt_dataset_helpers() -> None:
    """The megatron-core wheel ships its C++ dataset helpers compiled but not their Makefile, so
    megatron's start-up ``make`` fails; skip it when the compiled module is importable."""
    import importlib.util

    from megatron.core.datasets import utils as dataset_utils

    if importlib.util.find_spec("megatron.core.datasets.helpers_cpp") is not None:
        dataset_utils.compile_helpers = lambda: None


def _allow_cpu_only_initialisation(training_module: Any) -> None:
    """CPU mode: megatron asserts CUDA in ``initialize_megatron`` unless told otherwise."""
    original = training_module.initialize_megatron
    training_module.initialize_megatron = partial(original, allow_no_cuda=True)
