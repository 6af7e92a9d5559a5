"""What the quality benchmark trains: run specifications, the experiment grid, command lines.

A *run* is one training process group (one variant, one seed): a :class:`RunSpec`. The
experiments of the paper are sets of runs; runs shared between experiments (vanilla Top-1 at
capacity 1.0 belongs to the grid, the capacity sweep and the inference-only study) are the same
spec, hence trained once. Each spec plus the model/training :class:`Settings` hashes to a key
that names its run directory, so a finished run is never trained twice (the cache).

Naming follows the paper: ``Top-1``, ``Top-1+IR``, ``Top-1+FR``, ``Top-1+FR+IR``; the
``--moe-rectify`` value for ``+FR+IR`` is ``ir+fr``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterable, Sequence

from megatron.rectify.choices import RECTIFY_MODES

#: Bump when a change would make old cached runs incomparable (log format, defaults).
PLAN_VERSION = 2
EXPERIMENTS = ("grid", "capacity", "inference", "lb")
#: Rectifications applied at evaluation only to vanilla runs (inference-only rectification):
#: all three at capacity 1.0 with the load-balancing loss (the paper's table), IR+FR elsewhere
#: (the capacity plot's inference-only line). Each mode costs two extra held-out passes.
INFERENCE_MODES = ("ir", "fr", "ir+fr")
INFERENCE_MODES_ELSEWHERE = ("ir+fr",)
#: The upcycle recipe trains one dense model (with this seed) and fine-tunes every variant and
#: seed from it, as the paper fine-tunes every variant from the same pretrained Llama-2: the
#: seeds then vary the fine-tuning (router initialisation, data order), not the starting point,
#: which would otherwise add the dense models' spread to every variant's.
UPCYCLE_DENSE_SEED = 1
#: The capacity sweep's trained Top-1 variants at each finite capacity factor. The headline
#: Top-1+FR+IR is among them: without it the sweep cannot say whether the headline gain holds
#: away from capacity 1.0 (its cf-1.0 run is the grid's, so the sweep adds 3 runs per seed).
CAPACITY_MODES = ("none", "ir", "fr", "ir+fr")


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One training run. ``capacity`` None is dropless routing; ``dense`` is the dense model
    the upcycle recipe trains first (then ``topk``/``rectify``/``capacity`` are unused).

    ``unit_gate``: vanilla Top-1 with the rectified router's gate weight (forward 1, gradient
    as if ``p``) instead of megatron's ``p``: the control that separates the effect of
    rectification from the effect of the gate scaling every rectified top-1 router has.

    ``ir_capacity``: static IR's budget (``--moe-rectify-ir-capacity-factor``) for an IR
    variant, ``None`` for dynamic IR; named ``Top-1+FR+IR (IR budget 0.25)``.
    """

    topk: int = 1
    rectify: str = "none"
    capacity: float | None = 1.0
    aux_loss: float = 0.01
    seed: int = 1
    recipe: str = "scratch"
    eval_modes: tuple[str, ...] = ()
    dense: bool = False
    unit_gate: bool = False
    ir_capacity: float | None = None

    def __post_init__(self) -> None:
        if self.unit_gate and (self.topk != 1 or self.rectify != "none"):
            raise ValueError("unit_gate is the vanilla Top-1 control (topk 1, rectify none)")
        if self.ir_capacity is not None and "ir" not in self.rectify.split("+"):
            raise ValueError("ir_capacity is static IR's budget: it needs an IR variant")

    @property
    def variant(self) -> str:
        """The paper's name: ``Top-2+FR+IR``."""
        if self.dense:
            return "Dense"
        suffix = {"none": "", "ir": "+IR", "fr": "+FR", "ir+fr": "+FR+IR"}[self.rectify]
        if self.ir_capacity is not None:
            suffix += f" (IR budget {self.ir_capacity:g})"
        return f"Top-{self.topk}{suffix}" + (" (gate 1)" if self.unit_gate else "")

    @property
    def capacity_label(self) -> str:
        return "dropless" if self.capacity is None else f"{self.capacity:g}"

    @property
    def slug(self) -> str:
        """Readable directory prefix: ``top1-fr-ir_cf1_lb_s1``."""
        if self.dense:
            return f"dense_{self.recipe}_s{self.seed}"
        variant = self.variant.lower().replace("+", "-").replace(" (gate 1)", "-gate1")
        variant = variant.replace(" (ir budget ", "-irb").replace(")", "")
        lb = "lb" if self.aux_loss else "nolb"
        recipe = "" if self.recipe == "scratch" else f"_{self.recipe}"
        return f"{variant}_cf{self.capacity_label}_{lb}{recipe}_s{self.seed}"


#: The transformer block every run uses: Llama-style (rotary positions, RMSNorm, SwiGLU experts,
#: no biases, no dropout). megatron's GPT defaults (learned absolute positions, LayerNorm, GeLU,
#: dropout 0.1) leave a 150-iteration byte-level model on a loss plateau (~2.70) that some seeds
#: escape and others do not, so seed spread swamped every routing effect; with this block every
#: run learns from the first iterations (held-out loss ~2.1-2.3) and seeds agree.
LLAMA_STYLE_ARGS = (
    *("--position-embedding-type", "rope"),
    *("--normalization", "RMSNorm"),
    "--swiglu",
    "--disable-bias-linear",
    *("--attention-dropout", "0", "--hidden-dropout", "0"),
)
#: The held-out batches' sample order (``--eval-data-seed``): one fixed set for every seed, so
#: the seed spread measures training (initialisation and data order), not which held-out
#: sequences a seed happened to draw.
EVAL_DATA_SEED = 1234


@dataclasses.dataclass(frozen=True)
class Settings:
    """Model, data and training settings shared by every run of one benchmark invocation.

    Defaults are the CPU size: 2 gloo processes, EP = 2 (4 experts per rank), a 2-layer
    Llama-style MoE GPT with byte-level tokens, chosen so the whole default grid fits in under
    an hour on two cores (72 runs, 38.9 min measured on 2026-12-02) while rectified and
    vanilla routing differ by more than the seed spread.
    """

    num_layers: int = 2
    hidden_size: int = 128
    num_attention_heads: int = 4
    seq_length: int = 128
    micro_batch_size: int = 8
    global_batch_size: int = 16
    num_experts: int = 8
    train_iters: int = 150
    eval_iters: int = 32
    dense_iters: int = 150
    lr: float = 2e-3
    min_lr: float = 2e-4
    warmup_iters: int = 20
    nproc: int = 2
    expert_parallel: int = 2
    gpus: bool = False
    architecture_args: tuple[str, ...] = LLAMA_STYLE_ARGS
    eval_data_seed: int = EVAL_DATA_SEED
    extra_args: tuple[str, ...] = ()

    def megatron_args(self) -> list[str]:
        """The model, optimiser, evaluation and layout flags (no routing flags)."""
        args = [
            *("--num-layers", str(self.num_layers)),
            *("--hidden-size", str(self.hidden_size)),
            *("--num-attention-heads", str(self.num_attention_heads)),
            *("--seq-length", str(self.seq_length)),
            *("--max-position-embeddings", str(self.seq_length)),
            *("--micro-batch-size", str(self.micro_batch_size)),
            *("--global-batch-size", str(self.global_batch_size)),
            *("--lr", f"{self.lr:g}", "--min-lr", f"{self.min_lr:g}"),
            *("--lr-decay-style", "cosine"),
            *("--weight-decay", "0.01", "--clip-grad", "1.0"),
            *("--log-interval", "10", "--eval-iters", str(self.eval_iters)),
            # only the final held-out evaluation (validation + test splits), no periodic one
            *("--eval-interval", "1000000000"),
            *("--num-workers", "0"),
            *self.architecture_args,
            *("--eval-data-seed", str(self.eval_data_seed)),
        ]
        args += ["--bf16"] if self.gpus else ["--cpu-emulation"]
        return args + list(self.extra_args)


def dense_spec(recipe: str = "upcycle") -> RunSpec:
    """The dense model every upcycled run of ``recipe`` starts from."""
    return RunSpec(seed=UPCYCLE_DENSE_SEED, recipe=recipe, capacity=None, dense=True)


def experiment_specs(
    experiments: Iterable[str],
    seeds: Sequence[int],
    variants: Sequence[str] | None = None,
    capacities: Sequence[float | None] = (0.5, 0.75, 1.0, 1.5, None),
    recipe: str = "scratch",
    ir_budgets: Sequence[float] = (),
) -> list[RunSpec]:
    """Every run the selected experiments need, deduplicated, in a stable order.

    - ``grid``: Top-1/Top-2 x {vanilla, +IR, +FR, +FR+IR} at capacity 1.0, load-balancing on;
    - ``capacity``: Top-1, Top-1+IR, Top-1+FR, Top-1+FR+IR at each capacity factor, plus
      dropless Top-1;
    - ``inference``: the vanilla runs with a capacity are also evaluated with IR, FR and IR+FR
      switched on for evaluation only (extra passes on the same batches, no extra training);
    - ``lb``: Top-1 and Top-1+FR+IR at capacity 1.0 without the load-balancing loss.

    ``variants`` (paper names, case-insensitive) keeps only matching runs. ``ir_budgets``
    (``--ir-budgets``): every kept IR variant is also trained with static IR at each budget
    (``Top-1+FR+IR (IR budget 0.25)``), next to its dynamic-IR run.
    """
    experiments = set(experiments)
    unknown = experiments - set(EXPERIMENTS)
    if unknown:
        raise ValueError(f"unknown experiments {sorted(unknown)}; choose from {EXPERIMENTS}")
    wanted = {name.lower() for name in variants} if variants else None
    specs: list[RunSpec] = []
    for seed in seeds:
        runs = [
            spec
            for spec in _candidates(experiments, seed, capacities, recipe)
            if wanted is None or spec.variant.lower() in wanted
        ]
        runs += [
            dataclasses.replace(spec, ir_capacity=budget)
            for spec in list(runs)
            if "ir" in spec.rectify.split("+")
            for budget in ir_budgets
        ]
        if recipe == "upcycle" and runs:
            runs.insert(0, dense_spec(recipe))
        for spec in runs:
            if spec not in specs:
                specs.append(spec)
    return specs


def _candidates(
    experiments: set[str], seed: int, capacities: Sequence[float | None], recipe: str
) -> list[RunSpec]:
    """One seed's runs for the selected experiments (may repeat a spec)."""
    runs: list[RunSpec] = []
    if "grid" in experiments:
        runs += [
            RunSpec(topk=topk, rectify=mode, seed=seed, recipe=recipe)
            for topk in (1, 2)
            for mode in RECTIFY_MODES
        ]
        runs.insert(1, RunSpec(seed=seed, recipe=recipe, unit_gate=True))
    if "capacity" in experiments:
        for capacity in capacities:
            modes = ("none",) if capacity is None else CAPACITY_MODES
            runs += [
                RunSpec(rectify=mode, capacity=capacity, seed=seed, recipe=recipe) for mode in modes
            ]
    if "lb" in experiments:
        runs += [
            RunSpec(rectify=mode, aux_loss=0.0, seed=seed, recipe=recipe)
            for mode in ("none", "ir+fr")
        ]
    if "inference" in experiments:
        if not any(spec.rectify == "none" and spec.capacity for spec in runs):
            runs.append(RunSpec(seed=seed, recipe=recipe))
        runs = [
            dataclasses.replace(spec, eval_modes=_inference_modes(spec))
            if spec.rectify == "none" and spec.capacity
            else spec
            for spec in runs
        ]
    return runs


def _inference_modes(spec: RunSpec) -> tuple[str, ...]:
    headline = spec.capacity == 1.0 and spec.aux_loss > 0
    return INFERENCE_MODES if headline else INFERENCE_MODES_ELSEWHERE


def run_key(spec: RunSpec, settings: Settings) -> str:
    """Hash of everything that changes a run's result (the cache key)."""
    payload = {
        "version": PLAN_VERSION,
        "spec": dataclasses.asdict(spec),
        "settings": dataclasses.asdict(settings),
    }
    if spec.ir_capacity is None:  # runs from before static IR keep their cache keys
        payload["spec"].pop("ir_capacity")
    if spec.recipe == "scratch":  # the dense model's length matters to upcycled runs only
        payload["settings"].pop("dense_iters")
    elif not spec.dense:  # ... and so does which dense model they start from
        payload["dense_seed"] = UPCYCLE_DENSE_SEED
    text = json.dumps(payload, sort_keys=True, default=list)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def routing_args(spec: RunSpec, settings: Settings) -> list[str]:
    """MoE and rectify flags of one run (empty for the dense model)."""
    if spec.dense:
        return []
    args = [
        *("--num-experts", str(settings.num_experts)),
        *("--expert-model-parallel-size", str(settings.expert_parallel)),
        *("--moe-router-topk", str(spec.topk)),
        *("--moe-token-dispatcher-type", "alltoall"),
        *("--moe-aux-loss-coeff", f"{spec.aux_loss:g}"),
        *("--moe-rectify", spec.rectify),
        # one trigger for every variant: "at least one top-k choice dropped" (= `any` without
        # FR, the authors' setting with FR); for top-1 all triggers coincide without FR
        *("--moe-rectify-ir-trigger", "ignore_kth"),
    ]
    if spec.topk == 1:
        args.append("--moe-router-pre-softmax")  # megatron requires it for top-1 softmax
    if spec.capacity is not None:
        args += ["--moe-expert-capacity-factor", f"{spec.capacity:g}"]
        args.append("--moe-pad-expert-input-to-capacity")
    if spec.ir_capacity is not None:
        args += ["--moe-rectify-ir-capacity-factor", f"{spec.ir_capacity:g}"]
    if spec.eval_modes:
        args += ["--quality-eval-modes", ",".join(spec.eval_modes)]
    if spec.unit_gate:
        args.append("--quality-unit-gate")
    return args


def training_args(
    spec: RunSpec, settings: Settings, run_dir: str, dense_dir: str | None = None
) -> list[str]:
    """Every flag after the entry script for one run: size, routing, seed, checkpoints."""
    iters = settings.dense_iters if spec.dense else settings.train_iters
    args = [
        *settings.megatron_args(),
        *routing_args(spec, settings),
        *("--seed", str(spec.seed)),
        *("--train-iters", str(iters)),
        # megatron needs warm-up < decay: short smoke runs shorten the warm-up too
        *("--lr-warmup-iters", str(min(settings.warmup_iters, iters // 2))),
    ]
    if spec.dense:  # the upcycle recipe fine-tunes from it: keep its weights
        args += ["--save", f"{run_dir}/checkpoint", "--save-interval", str(iters)]
    elif spec.recipe == "upcycle":
        if dense_dir is None:
            raise ValueError("the upcycle recipe needs the dense run's directory")
        args += [
            *("--load", f"{dense_dir}/checkpoint", "--moe-use-upcycling"),
            *("--save", f"{run_dir}/checkpoint", "--save-interval", str(10 * iters)),
        ]
    return args
