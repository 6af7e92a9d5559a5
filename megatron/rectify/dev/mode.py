"""The CPU development mode's switches, in one place: the ``--cpu-emulation`` flag, its
environment variable, the megatron flags it implies, and the post-training replica check hook.

Everything here is a constant or a cheap test of ``sys.argv`` / ``os.environ``: importing this
module imports neither torch nor megatron, and the emulation itself
(:mod:`megatron.rectify.dev.cpu_emulation`) is imported only by :func:`activate_cpu_emulation`,
i.e. only when a run asks for it. GPU runs never load it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

#: The command-line flag (``pretrain_gpt_rectify.py`` and the checkpoint tools) and its
#: environment-variable form; either one asks for the CPU emulation.
CPU_EMULATION_FLAG = "--cpu-emulation"
CPU_EMULATION_ENV = "MEGATRON_RECTIFY_CPU_EMULATION"

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

#: Test hook: with ``MEGATRON_RECTIFY_CHECK_REPLICAS=1`` the training entry point checks after
#: training that data-parallel replicas hold identical weights
#: (:mod:`megatron.rectify.dev.replica_check`; the end-to-end tests set it).
CHECK_REPLICAS_ENV = "MEGATRON_RECTIFY_CHECK_REPLICAS"


def cpu_emulation_requested(argv: Sequence[str] | None = None) -> bool:
    """Whether ``argv`` (default ``sys.argv``) has ``--cpu-emulation`` or the environment has
    ``MEGATRON_RECTIFY_CPU_EMULATION=1``."""
    argv = sys.argv if argv is None else argv
    return CPU_EMULATION_FLAG in argv or os.environ.get(CPU_EMULATION_ENV, "").strip() == "1"


def replica_check_requested() -> bool:
    """Whether the environment asks for the post-training replica check."""
    return os.environ.get(CHECK_REPLICAS_ENV) == "1"


def activate_cpu_emulation() -> None:
    """Import and activate the CPU emulation (idempotent; refuses on a machine with CUDA)."""
    from megatron.rectify.dev import cpu_emulation

    cpu_emulation.activate()
