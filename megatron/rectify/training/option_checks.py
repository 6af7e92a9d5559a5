"""megatron MoE options against rectification: what works, and one line for what cannot.

Read against megatron-core 0.19.2 (``training/arguments.py``, ``transformer/moe/*.py``,
``transformer/cuda_graphs.py``, ``transformer/transformer_layer.py``,
``models/gpt/fine_grained_callables.py``, ``models/common/model_chunk_schedule_plan.py``).
:func:`megatron_option_problems` runs on the parsed arguments, before megatron's
``validate_args`` (so deprecated spellings are read too); ``rectify_arg_problems`` collects its
lines. Decisions, per option (the tests are ``tests/unit/test_option_checks.py``):

* ``--moe-permute-fusion``: allowed in every mode. TE's fused permute packs the expert columns
  of the map back to back, by their entry counts. Unpadded, megatron takes those counts from
  the same map; padded, the router hands over exactly ``C`` entries per column (the pad
  contract, docs/routing.md). The IR side batch never goes through megatron's permute: it is
  cut out of the layer input by index and joined to the received tokens after megatron's
  permutations, and taken off again before their inverses.
* ``--moe-router-fusion``: allowed in every mode. With rectification on, megatron's fused
  kernels compute what they compute for megatron's own router: the aux-loss scores
  (``fused_compute_score_for_moe_aux_loss``) and the aux losses (``fused_moe_aux_loss``). The
  rectified decision (scores over all experts, top-k with the (k+1)-th choice, FR, IR, gate
  weights) runs as torch operations: TE's fused top-k returns only the k chosen experts.
* CUDA graphs (``--cuda-graph-impl local|transformer_engine|full_iteration``,
  ``--cuda-graph-modules`` / ``--cuda-graph-scope``, ``--enable-cuda-graph``,
  ``--external-cuda-graph``): FR is allowed everywhere. It adds no host sync and its dispatch
  needs only the ``probs`` / ``routing_map`` a replayed router returns. Graphs that leave the
  MoE layer out (``attn``, ``mlp``, ``mamba``) are fine in every mode. IR is refused where
  a graph holds the MoE router: its side batch has a data-dependent size, and the decision
  and side batch are Python state that a replay skips. Static IR
  (``--moe-rectify-ir-capacity-factor``) lifts the refusal where the graph holds the whole
  MoE layer (``moe``, whole layers, ``full_iteration``); a partial MoE graph (``moe_router``,
  ``moe_preprocess``) still replays without that state. Also refused: a
  ``--moe-rectify-eval`` mode other than the training one with local graphs holding the
  router, because megatron's local graphs replay the training capture in evaluation passes
  too. Transformer Engine graphs are training-only, so evaluation there runs eagerly.
* ``--overlap-moe-expert-parallel-comm`` (and ``--delay-wgrad-compute``, which needs it): FR
  is allowed. The fine-grained schedule splits the layer into nodes (attention + router +
  preprocess, dispatch, experts, combine) joined by detached tensors, and FR changes only the
  map and the weights those nodes already carry. IR is refused in training because its side
  batch crosses the nodes outside those tensors: its outputs reach the combine node straight
  from the experts' graph, so backward runs through that graph twice. Evaluation passes are
  forward-only, do not use the split, and may use IR.
* ``--moe-router-padding-for-quantization`` (``--moe-router-padding-for-fp8``): allowed with
  FR without padding to capacity. megatron adds zero-weight pairs to the map, and a filled-in
  pair stays as it is. Refused with ``--moe-pad-expert-input-to-capacity``: megatron's padded
  dispatcher keeps the first ``C`` entries of each column by token index, and the added pairs
  sit at the lowest free token indices, so they can push routed tokens out. Refused with IR:
  megatron's experts then skip their own FP8/FP4 padding, and IR rows added per local expert
  leave the splits unaligned.
* ``--fp8-format`` / ``--fp4-format`` without that flag: allowed in every mode. megatron's
  experts pad each expert's rows (IR rows included) to the FP8/FP4 alignment themselves.
* ``--context-parallel-size`` > 1 with ``--transformer-impl local`` (the spec without
  Transformer Engine, and the CPU emulation's): refused, as megatron itself fails there, with
  or without rectification: its local ``DotProductAttention`` asserts a context-parallel size
  of 1 ("Context parallelism is only supported by TEDotProductAttention!") when the model is
  built, on every rank, after start-up. With Transformer Engine it is megatron's own support.
* ``--mtp-num-layers`` with ``--pipeline-model-parallel-size`` > 1, tied embeddings and a
  distributed checkpoint (``--save`` / ``--load``, ``--ckpt-format`` other than ``torch``):
  refused, as megatron itself fails there, rectified or not: the MTP layers sit on the last
  stage, whose output layer megatron allocates a weight for while its checkpoint code asserts
  that an MTP stage has none (seen on CPU: the first save, after training up to it, stops
  every rank). Untied embeddings work (tests/distributed/test_megatron_options_e2e.py).
"""

from __future__ import annotations

from typing import Any

from megatron.rectify.config import IR_CAPACITY_FLAG, mode_parts, rectifying_modes

#: The MoE parts of a layer a per-layer CUDA graph (local / transformer_engine) can hold.
MOE_GRAPH_MODULES = ("moe", "moe_router", "moe_preprocess")
#: The partial MoE graphs: the graph ends inside the MoE layer (after the router or preprocess).
PARTIAL_MOE_GRAPH_MODULES = ("moe_router", "moe_preprocess")
#: Deprecated ``--cuda-graph-modules`` values that are no layer part (megatron migrates them).
_DEPRECATED_SCOPES = ("full", "full_iteration", "full_iteration_inference")
#: What to capture instead when the MoE layer must stay out of the graph.
_KEEP_MOE_OUT = "keep the MoE layer out of the graph (e.g. --cuda-graph-modules attn)"


def megatron_option_problems(args: Any) -> list[str]:
    """Every megatron option in ``args`` (parsed, not yet validated by megatron) that does not
    work with the rectification ``--moe-rectify`` / ``--moe-rectify-eval`` turn on, as one line
    each naming the flag and the fix; plus context parallelism on the local spec, which
    megatron cannot build in any mode."""
    if getattr(args, "num_experts", None) is None:
        return []
    modes = rectifying_modes(args)
    if not modes:
        return _context_parallel_problems(args)  # megatron's own failure, in every mode
    return [
        *_context_parallel_problems(args),
        *_cuda_graph_problems(args, modes),
        *_ep_overlap_problems(args, modes),
        *_quantization_padding_problems(args, modes),
        *_probs_on_input_problems(args, modes),
    ]


def _probs_on_input_problems(args: Any, modes: dict[str, str]) -> list[str]:
    """``--moe-apply-probs-on-input`` (megatron: top-1 only) scales each token's input by its
    gate weight, f(w x), where the rectified routing (docs/routing.md) weights the expert's
    output, w f(x). The two differ for a non-linear expert, and a token an IR merge sends to
    the same expert twice would be computed as f((w + w') x) by the allgather dispatcher and
    f(w x) + f(w' x) by alltoall: the dispatchers would disagree."""
    if not getattr(args, "moe_apply_probs_on_input", False):
        return []
    flag, mode = next(iter(modes.items()))
    return [
        f"{flag} {mode} with --moe-apply-probs-on-input: rectified routing weights each "
        "expert's output by the gate weight (w f(x)); scaling the input instead (f(w x)) is not "
        f"the rectified layer. Drop --moe-apply-probs-on-input, or use {flag} none."
    ]


# ---- CUDA graphs -------------------------------------------------------------------------------


def cuda_graph_setup(args: Any) -> tuple[str, tuple[str, ...], str]:
    """``(impl, modules, flags)`` as megatron will read them after its migrations:
    ``--enable-cuda-graph`` -> local, ``--external-cuda-graph`` -> transformer_engine, module
    ``full_iteration`` -> impl full_iteration; ``modules`` are the layer parts named
    (``()``: whole layers); ``flags`` spells what was given, for the messages."""
    impl = getattr(args, "cuda_graph_impl", "none") or "none"
    given = []
    if getattr(args, "enable_cuda_graph", False):
        impl = "local"
        given.append("--enable-cuda-graph")
    elif getattr(args, "external_cuda_graph", False):
        impl = "transformer_engine"
        given.append("--external-cuda-graph")
    else:
        given.append(f"--cuda-graph-impl {impl}")
    raw = getattr(args, "cuda_graph_scope_deprecated", None)
    flag = "--cuda-graph-scope"
    if not raw:
        raw, flag = getattr(args, "cuda_graph_modules", None) or [], "--cuda-graph-modules"
    if isinstance(raw, str):
        raw = raw.split(",") if raw else []
    names = tuple(getattr(value, "name", value) for value in raw)
    if names:
        given.append(f"{flag} {' '.join(names)}")
    if "full_iteration" in names and impl in ("none", "local"):
        impl = "full_iteration"
    modules = tuple(name for name in names if name not in _DEPRECATED_SCOPES)
    if "full_iteration_inference" in names and not modules:
        modules = ("inference_only",)  # megatron's inference graphs; training runs eagerly
    return impl, modules, ", ".join(given)


def graph_holds_moe_router(impl: str, modules: tuple[str, ...]) -> bool:
    """Whether training-step CUDA graphs contain the MoE router: the whole iteration, whole
    layers (no module named), or an MoE part of the layer."""
    if impl == "full_iteration":
        return True
    if impl not in ("local", "transformer_engine"):
        return False
    return not modules or any(module in MOE_GRAPH_MODULES for module in modules)


def _cuda_graph_problems(args: Any, modes: dict[str, str]) -> list[str]:
    impl, modules, given = cuda_graph_setup(args)
    if not graph_holds_moe_router(impl, modules):
        return []
    partial = any(module in PARTIAL_MOE_GRAPH_MODULES for module in modules)
    static_ir = getattr(args, "moe_rectify_ir_capacity_factor", None) is not None
    problems = []
    for flag, mode in modes.items():
        # Evaluation passes: transformer_engine graphs are training-only (evaluation is eager);
        # local graphs replay the training capture (checked below); full_iteration captures a
        # separate validation graph, with the evaluation mode in it.
        in_graph = flag == "--moe-rectify" or impl == "full_iteration"
        if not in_graph or "ir" not in mode_parts(mode):
            continue
        if static_ir and not partial:
            continue  # the whole MoE layer in one graph: static IR's state stays inside it
        if static_ir:
            problems.append(
                f"{flag} {mode} with {IR_CAPACITY_FLAG} and {given}: the graph ends inside the "
                "MoE layer, and the IR decision and side batch are Python state between the "
                "router, preprocess and the experts that a replay skips. Capture the whole MoE "
                f"layer (--cuda-graph-modules moe), use {flag} fr, or {_KEEP_MOE_OUT}."
            )
            continue
        static_fix = f"the static IR mode {IR_CAPACITY_FLAG}"
        if partial:  # static IR needs the whole MoE layer in the graph
            static_fix += " with the whole MoE layer in the graph (--cuda-graph-modules moe)"
        problems.append(
            f"{flag} {mode} with CUDA graphs holding the MoE router ({given}): IR's side batch "
            f"has a data-dependent size; use {flag} fr with CUDA graphs, or {static_fix}, or "
            f"{_KEEP_MOE_OUT}."
        )
    eval_mode = getattr(args, "moe_rectify_eval", "train")
    train_mode = getattr(args, "moe_rectify", "none")
    if impl == "local" and eval_mode not in ("train", train_mode):
        problems.append(
            f"--moe-rectify-eval {eval_mode} with local CUDA graphs holding the MoE router "
            f"({given}): evaluation passes replay the graphs captured in training, so they "
            f"would route as --moe-rectify {train_mode}. Use --cuda-graph-impl "
            "transformer_engine (its graphs are training-only: evaluation runs eagerly), "
            f"{_KEEP_MOE_OUT}, or drop --moe-rectify-eval."
        )
    return problems


# ---- expert-parallel communication overlap -----------------------------------------------------


def _ep_overlap_problems(args: Any, modes: dict[str, str]) -> list[str]:
    mode = modes.get("--moe-rectify")  # evaluation is forward-only: megatron does not split it
    if not getattr(args, "overlap_moe_expert_parallel_comm", False) or mode is None:
        return []
    if "ir" not in mode_parts(mode):
        return []
    also = " and --delay-wgrad-compute" if getattr(args, "delay_wgrad_compute", False) else ""
    return [
        f"--moe-rectify {mode} with --overlap-moe-expert-parallel-comm: megatron's overlapped "
        "schedule splits the MoE layer into nodes (router, dispatch, experts, combine) joined "
        "by detached tensors, and IR's side batch crosses them outside those tensors (its "
        "outputs reach the combine node straight from the experts' graph, so backward runs "
        "through that graph twice). Use --moe-rectify fr with the overlap, or drop "
        f"--overlap-moe-expert-parallel-comm{also}."
    ]


# ---- routing-map padding for FP8 / FP4 ---------------------------------------------------------


def _quantization_padding_flag(args: Any) -> str | None:
    if getattr(args, "moe_router_padding_for_quantization", False):
        return "--moe-router-padding-for-quantization"
    if getattr(args, "moe_router_padding_for_fp8", False):
        return "--moe-router-padding-for-fp8"
    return None


def _quantization_padding_problems(args: Any, modes: dict[str, str]) -> list[str]:
    padding = _quantization_padding_flag(args)
    if padding is None:
        return []
    flag, mode = next(iter(modes.items()))
    problems = []
    if getattr(args, "moe_pad_expert_input_to_capacity", False):
        problems.append(
            f"{padding} with --moe-pad-expert-input-to-capacity and {flag} {mode}: megatron "
            "adds the quantization padding pairs at the lowest free token indices of each "
            "expert column, and its padded dispatcher then keeps only the first C entries of "
            "each column by token index, so padding can push routed (kept or filled-in) tokens "
            f"out of their expert. Drop {padding}: the padded buffers are static already and "
            "megatron's experts pad each expert's rows for FP8/FP4 themselves."
        )
    for flag, mode in modes.items():
        if "ir" in mode_parts(mode):
            problems.append(
                f"{flag} {mode} with {padding}: megatron pads each expert's all-to-all rows to "
                "the FP8/FP4 alignment and its experts then skip their own padding, but IR adds "
                "a data-dependent number of rows per local expert, so the expert GEMMs get "
                f"unaligned splits. Drop {padding} (megatron's experts then pad every expert's "
                f"rows, IR rows included), or use {flag} fr."
            )
    return problems


# ---- what this machine cannot run ---------------------------------------------------------------


def environment_problems(args: Any) -> list[str]:
    """Settings this machine cannot run, rectified or not: megatron-core 0.19.2 finds each of
    them only after start-up (building the model or in the first step), as a traceback on
    every rank. Checked for every run of the entry point, so ``--moe-rectify none`` stops the
    same way."""
    problems = [*_mtp_checkpoint_problems(args)]
    kernels = [
        flag
        for flag, wanted in (
            ("--moe-permute-fusion", getattr(args, "moe_permute_fusion", False)),
            ("--moe-router-fusion", getattr(args, "moe_router_fusion", False)),
            ("--fp8-format", getattr(args, "fp8", None)),
            ("--fp4-format", getattr(args, "fp4", None)),
        )
        if wanted
    ]
    if kernels and not _have_transformer_engine():
        problems.append(
            f"{', '.join(kernels)} need{'s' if len(kernels) == 1 else ''} Transformer Engine's "
            "kernels, and Transformer Engine is not installed: install it (a GPU extra), or "
            "drop the flag."
        )
    if getattr(args, "moe_token_dispatcher_type", None) == "flex":
        backend = getattr(args, "moe_flex_dispatcher_backend", "deepep") or "deepep"
        if not _have_flex_backend(backend):
            problems.append(
                f"--moe-token-dispatcher-type flex with the {backend} backend "
                "(--moe-flex-dispatcher-backend) needs its kernels, which are not installed "
                "(DeepEP for deepep / hybridep, Transformer Engine's EP for ncclep): install "
                "them on a GPU machine, or use --moe-token-dispatcher-type alltoall."
            )
    impl, _, given = cuda_graph_setup(args)
    if impl != "none" and not _have_cuda():
        problems.append(
            f"CUDA graphs ({given}) need CUDA GPUs, and this machine has none (CPU emulation "
            "runs eagerly): drop the CUDA-graph flags on CPU."
        )
    return problems


def _have_transformer_engine() -> bool:
    from megatron.core.extensions.transformer_engine import HAVE_TE

    return bool(HAVE_TE)


def _have_flex_backend(backend: str) -> bool:
    """Whether megatron's flex dispatcher finds the ``backend``'s kernels (the imports its
    ``fused_a2a`` module tries)."""
    from megatron.core.transformer.moe import fused_a2a

    if backend == "deepep":
        return bool(getattr(fused_a2a, "HAVE_DEEP_EP", False))
    if backend == "hybridep":
        return bool(getattr(fused_a2a, "HAVE_HYBRIDEP", False))
    try:
        import transformer_engine.pytorch.ep  # noqa: F401  (the ncclep backend)
    except ImportError:
        return False
    return True


def _have_cuda() -> bool:
    import torch

    return torch.cuda.is_available()  # False under the CPU emulation (it stubs the rest)


# ---- context parallelism -----------------------------------------------------------------------


def _context_parallel_problems(args: Any) -> list[str]:
    size = getattr(args, "context_parallel_size", 1) or 1
    if size <= 1 or getattr(args, "transformer_impl", None) != "local":
        return []
    return [
        f"--context-parallel-size {size} with --transformer-impl local: megatron-core's local "
        "attention (DotProductAttention) supports no context parallelism and fails when the "
        "model is built. Use --transformer-impl transformer_engine (Transformer Engine "
        "installed), or --context-parallel-size 1."
    ]


# ---- multi-token prediction --------------------------------------------------------------------


def _mtp_checkpoint_problems(args: Any) -> list[str]:
    layers = getattr(args, "mtp_num_layers", None)
    stages = getattr(args, "pipeline_model_parallel_size", 1) or 1
    if not layers or stages <= 1 or getattr(args, "untie_embeddings_and_output_weights", False):
        return []
    if getattr(args, "pipeline_model_parallel_layout", None) is not None:
        return []  # a custom layout may put the MTP layers next to the embedding
    if getattr(args, "ckpt_format", "torch_dist") == "torch":
        return []  # not the sharded checkpoint code
    flags = [
        flag for flag, name in (("--save", "save"), ("--load", "load")) if getattr(args, name, None)
    ]
    if not flags:
        return []
    return [
        f"--mtp-num-layers {layers} with --pipeline-model-parallel-size {stages}, tied "
        f"embeddings and {' / '.join(flags)}: megatron-core's distributed checkpoint of the last "
        "pipeline stage (the one holding the MTP layers) fails on its output-layer weight. Add "
        "--untie-embeddings-and-output-weights."
    ]
