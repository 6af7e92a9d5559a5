"""The tiny MoE GPT that tests, the compatibility table and the scripts run, in named pieces.

Many command lines train or parse the same 2-layer, 4-expert GPT; each used to spell it out
and the copies drifted. They now compose these pieces and state only what they change (e.g.
``[*TINY_MODEL, *tiny_schedule(train_iters=3), *TOP1_ROUTING, *MOCK_DATA]``), so a change to
the tiny model is made once. Pieces are tuples: they are shared, and a caller must not be able
to change another caller's command line. Imports neither torch nor megatron (the compatibility
table and ``scripts/`` read it before either is set up).
"""

from __future__ import annotations

import os

#: Model size: small enough for a CPU training step in well under a second, with 4 experts so
#: that expert parallelism 2 and 4 both divide them.
TINY_MODEL = (
    "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
    "--seq-length", "64", "--max-position-embeddings", "64",
    "--num-experts", "4",
)  # fmt: skip


def tiny_schedule(*, train_iters: int = 20, micro_batch_size: int = 4) -> tuple[str, ...]:
    """Global batch 8 at learning rate 1e-3, for ``train_iters`` iterations of micro-batches of
    ``micro_batch_size``: the two values the command lines choose differently (a short run,
    or more micro-batches per step)."""
    return (
        "--micro-batch-size", str(micro_batch_size), "--global-batch-size", "8",
        "--train-iters", str(train_iters), "--lr", "1e-3",
    )  # fmt: skip


#: :func:`tiny_schedule` with its defaults: 20 iterations of 2 micro-batches of 4.
TINY_SCHEDULE = tiny_schedule()

#: The routing rectification acts on: top-1 (pre-softmax, so the one weight is not always 1),
#: capacity factor 1.0 (tokens are dropped) and the alltoall dispatcher.
TOP1_ROUTING = (
    "--moe-router-topk", "1", "--moe-router-pre-softmax",
    "--moe-expert-capacity-factor", "1.0", "--moe-token-dispatcher-type", "alltoall",
)  # fmt: skip

#: Both rectifications, with IR triggered as FR needs it (``ignore_kth``).
RECTIFY_IR_FR = ("--moe-rectify", "ir+fr", "--moe-rectify-ir-trigger", "ignore_kth")

#: The full rectified routing of a training run: :data:`TOP1_ROUTING` padded to capacity (the
#: layout FR fills in) and :data:`RECTIFY_IR_FR`.
RECTIFIED_ROUTING = (
    *TOP1_ROUTING,
    "--moe-pad-expert-input-to-capacity",
    *RECTIFY_IR_FR,
)

#: A tokenizer with no files: token ids below 256.
NULL_TOKENIZER = ("--tokenizer-type", "NullTokenizer", "--vocab-size", "256")

#: Generated data: no dataset files to write or find.
MOCK_DATA = ("--mock-data", *NULL_TOKENIZER)

#: What a run whose losses are read adds: a decaying learning rate, the load-balancing loss,
#: no dropout (so losses reproduce) and a log line every iteration.
TRAINING_RUN = (
    "--min-lr", "1e-4", "--lr-decay-style", "cosine", "--lr-warmup-iters", "2",
    "--moe-aux-loss-coeff", "0.01",
    "--hidden-dropout", "0", "--attention-dropout", "0",
    "--log-interval", "1",
)  # fmt: skip

#: No evaluation: its iterations only cost time in runs that do not look at them.
NO_EVAL = ("--eval-interval", "1000", "--eval-iters", "0")


def subprocess_env(*, one_cpu_thread: bool = True, **extra: str) -> dict[str, str]:
    """The environment of a ``pretrain_gpt_rectify.py`` child process: this one's, plus
    ``CUDA_DEVICE_MAX_CONNECTIONS=1`` (megatron asks for it with tensor or sequence
    parallelism), unbuffered output (the parent reads the log as it comes), one OpenMP thread
    per process where ``one_cpu_thread`` (ranks share a few CPU cores), and ``extra``."""
    env = {**os.environ, "CUDA_DEVICE_MAX_CONNECTIONS": "1", "PYTHONUNBUFFERED": "1"}
    if one_cpu_thread:
        env["OMP_NUM_THREADS"] = "1"
    return {**env, **extra}
