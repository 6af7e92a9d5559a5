"""Run a test body in N gloo processes with megatron's ``parallel_state`` initialised.

Every rank process activates the CPU emulation (:mod:`megatron.rectify.dev.cpu_emulation`),
joins a gloo process group, initialises megatron's model-parallel groups for the requested
layout, seeds the RNGs the way megatron does, and calls ``fn(rank, world_size, **kwargs)``.
The parent collects the per-rank return values, and raises :class:`DistributedTestError`
(an ``AssertionError``, so pytest shows it as a test failure) naming the failing rank with its
full traceback, or the ranks that hung past ``timeout_s`` with the Python stack each was in.
No rank process outlives the call. Each rank's stdout/stderr is collected and re-emitted by the
parent with a ``[rank N]`` prefix, so pytest captures it with the right test.

Start methods: ``"forkserver"`` (default) forks the ranks from a server process that imported
torch and megatron-core once (:data:`FORKSERVER_PRELOAD`; about 6 s on the first call of a
session, then about 0.2 s per run instead of about 5 s of imports per rank); each rank still
starts from that pristine state, activates the emulation itself and gets the parent's current
environment variables. ``"spawn"`` starts fresh interpreters (activation before megatron import).

``fn`` must be picklable, i.e. a module-level function, and so must its kwargs and return values.
Prefer plain Python values as return values: megatron-core registers its own pickler for tensor
storages (``megatron.core.safe_globals``), so unpickling a returned tensor imports megatron-core
into the parent process.
"""

from __future__ import annotations

import datetime
import faulthandler
import os
import pickle
import queue as queue_module
import signal
import socket
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch.multiprocessing as mp

__all__ = ["FORKSERVER_PRELOAD", "DistributedTestError", "find_free_port", "run_distributed"]

#: Modules the forkserver imports once (before any emulation: ranks activate it themselves).
FORKSERVER_PRELOAD = (
    "torch",
    "megatron.core.parallel_state",
    "megatron.core.tensor_parallel",
    "megatron.core.transformer.moe.moe_layer",
    "megatron.core.models.gpt.gpt_layer_specs",
    "megatron.rectify.dev.cpu_emulation",
)
_ERROR_GRACE_S = 2.0  # once a rank failed, how long the others get to finish before being killed
_DEAD_GRACE_S = 1.0  # how long a dead rank's report may still be in flight
_STACK_DUMP_WAIT_S = 1.0  # how long hung ranks get to write their stacks before being killed
_STACK_SIGNAL = signal.SIGUSR1


class DistributedTestError(AssertionError):
    """A rank raised, died or hung in :func:`run_distributed`."""


def find_free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for ``MASTER_PORT``)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _worker(
    rank: int,
    world_size: int,
    fn: Callable[..., Any],
    layout: dict[str, Any],
    seed: int,
    timeout_s: float,
    kwargs: dict[str, Any],
    env: dict[str, str],
    log_path: str,
    results: Any,
) -> None:
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    faulthandler.register(_STACK_SIGNAL, file=sys.stderr, all_threads=True)
    os.environ.clear()
    os.environ.update(env)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))
    try:
        import random

        import numpy as np
        import torch

        from megatron.rectify.dev import cpu_emulation

        torch.set_num_threads(1)
        cpu_emulation.activate()
        torch.distributed.init_process_group(
            "gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=timeout_s)
        )
        from megatron.core import parallel_state
        from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

        parallel_state.initialize_model_parallel(
            distributed_timeout_minutes=int(timeout_s // 60) + 1, **layout
        )
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        model_parallel_cuda_manual_seed(seed)
        payload = ("ok", rank, pickle.dumps(fn(rank, world_size, **kwargs)))
    except BaseException:  # noqa: BLE001 - everything is reported to the parent
        payload = ("error", rank, traceback.format_exc())
    sys.stdout.flush()
    sys.stderr.flush()
    results.put(payload)
    _cleanup()


def _cleanup() -> None:
    try:
        from megatron.core import parallel_state

        parallel_state.destroy_model_parallel()
    except Exception:  # noqa: BLE001 - best effort, the process is about to exit
        pass
    try:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001
        pass


def _stop(processes: list[Any]) -> None:
    processes = [proc for proc in processes if proc.pid is not None]  # started ones only
    for proc in processes:
        if proc.is_alive():
            proc.terminate()
    for proc in processes:
        proc.join(timeout=5)
        if proc.is_alive():
            proc.kill()
            proc.join(timeout=5)


def _collect(
    processes: list[Any], results: Any, timeout_s: float
) -> tuple[dict[int, Any], dict[int, str]]:
    """Per-rank return values and error texts, until all reported or the deadline passed."""
    outputs: dict[int, Any] = {}
    errors: dict[int, str] = {}
    dead_since: dict[int, float] = {}
    deadline = time.monotonic() + timeout_s
    while len(outputs) + len(errors) < len(processes) and time.monotonic() < deadline:
        try:
            kind, rank, payload = results.get(timeout=0.05)
        except queue_module.Empty:
            now = time.monotonic()
            for rank, proc in enumerate(processes):
                if rank in outputs or rank in errors or proc.is_alive():
                    continue
                if now - dead_since.setdefault(rank, now) > _DEAD_GRACE_S:
                    errors[rank] = f"exited with code {proc.exitcode} without reporting"
                    deadline = min(deadline, now + _ERROR_GRACE_S)
            continue
        if kind == "ok":
            outputs[rank] = pickle.loads(payload)
        else:
            errors[rank] = payload
            deadline = min(deadline, time.monotonic() + _ERROR_GRACE_S)
    return outputs, errors


def _dump_stacks(processes: list[Any], ranks: list[int]) -> None:
    for rank in ranks:
        if processes[rank].is_alive():
            os.kill(processes[rank].pid, _STACK_SIGNAL)
    time.sleep(_STACK_DUMP_WAIT_S)


def _tail(text: str, lines: int = 60) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *,
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    expert_model_parallel_size: int = 1,
    expert_tensor_parallel_size: int | None = None,
    timeout_s: float = 120.0,
    seed: int = 1234,
    parallel_kwargs: dict[str, Any] | None = None,
    start_method: Literal["forkserver", "spawn"] = "forkserver",
    **kwargs: Any,
) -> list[Any]:
    """Run ``fn(rank, world_size, **kwargs)`` in ``world_size`` gloo processes.

    Args:
        fn: module-level (picklable) function; its return value must be picklable.
        world_size: number of processes.
        tensor_model_parallel_size, pipeline_model_parallel_size, expert_model_parallel_size,
            expert_tensor_parallel_size: passed to ``parallel_state.initialize_model_parallel``.
        timeout_s: wall-clock limit, counted from the moment all ranks are started (rank
            start-up included); hung ranks have their stacks dumped, are killed and reported.
        seed: seeds python, numpy, torch and ``model_parallel_cuda_manual_seed``.
        parallel_kwargs: further ``initialize_model_parallel`` arguments
            (e.g. ``context_parallel_size``, ``virtual_pipeline_model_parallel_size``).
        start_method: ``"forkserver"`` (fast, see the module docstring) or ``"spawn"``.
        **kwargs: passed to ``fn``.

    Returns:
        The return values of ``fn``, indexed by rank.

    Raises:
        DistributedTestError: a rank raised (its traceback is included), died, or hung.
    """
    layout = dict(
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        expert_model_parallel_size=expert_model_parallel_size,
        expert_tensor_parallel_size=expert_tensor_parallel_size,
        **(parallel_kwargs or {}),
    )
    ctx = mp.get_context(start_method)
    if start_method == "forkserver":
        ctx.set_forkserver_preload(list(FORKSERVER_PRELOAD))
    env = dict(os.environ)
    env.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(find_free_port()),
        CUDA_DEVICE_MAX_CONNECTIONS="1",
        OMP_NUM_THREADS="1",
    )
    results = ctx.Queue()
    shared = (world_size, fn, layout, seed, timeout_s, kwargs, env)
    with tempfile.TemporaryDirectory(prefix="megatron-rectify-ranks-") as log_dir:
        logs = [Path(log_dir) / f"rank{rank}.log" for rank in range(world_size)]
        processes = [
            ctx.Process(
                target=_worker,
                args=(rank, *shared, str(log), results),
                name=f"megatron-rectify-rank{rank}",
                daemon=True,
            )
            for rank, log in enumerate(logs)
        ]
        try:
            for proc in processes:
                proc.start()
            outputs, errors = _collect(processes, results, timeout_s)
            hung = [r for r in range(world_size) if r not in outputs and r not in errors]
            if hung and not errors:
                _dump_stacks(processes, hung)
        finally:
            _stop(processes)
            results.close()
            results.join_thread()
            texts = [log.read_text(errors="replace") if log.exists() else "" for log in logs]
            for rank, text in enumerate(texts):
                for line in text.splitlines():
                    print(f"[rank {rank}] {line}", file=sys.stderr)

    if errors or hung:
        lines = [f"run_distributed(world_size={world_size}, {layout}) failed:"]
        for rank in sorted(errors):
            lines.append(f"--- rank {rank} failed:\n{errors[rank].rstrip()}")
        if hung and errors:
            lines.append(f"ranks {hung} did not finish and were killed after a rank failed")
        elif hung:
            lines.append(
                f"timed out after {timeout_s:g} s: ranks {hung} hung (did not finish) "
                "and were killed"
            )
            for rank in hung:
                lines.append(
                    f"--- rank {rank} output tail (stack at timeout):\n{_tail(texts[rank])}"
                )
        raise DistributedTestError("\n".join(lines))
    return [outputs[rank] for rank in range(world_size)]
