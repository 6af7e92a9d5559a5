"""Run one :class:`~benchmarks.quality.plan.RunSpec`: launch, log, parse, cache.

Each run lives in ``<out>/<slug>_<key>/``: ``train.log`` (everything the ranks printed),
``command.txt`` and, once the run finished and its log parsed, ``result.json``. A run directory
with a ``result.json`` is reused as is (the key hashes every setting that changes the result),
so an interrupted benchmark resumes where it stopped; ``force`` deletes and retrains.

Launchers (``launcher``):

- ``torchrun`` (``python -m torch.distributed.run``): the default on GPUs;
- ``spawn``: the ranks are started directly with the ``env://`` variables torchrun sets (the
  same processes without torchrun's own start-up);
- ``fork`` (CPU default): this process imports torch, megatron and the CPU emulation once, then
  forks the ranks of every run from that warm state. Importing the stack costs ~10 s of CPU per
  rank, a quarter of a default run on two cores; megatron's global state is still untouched in
  the parent (it never initialises anything), so each forked run starts as fresh as a new
  process would. Results are identical to ``spawn`` (same seeds, same code path).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from benchmarks.quality.logparse import AS_TRAINED, parse_log
from benchmarks.quality.plan import RunSpec, Settings, run_key, training_args
from megatron.rectify.atomic import write_text_atomically

REPO = Path(__file__).resolve().parents[2]
ENTRY = REPO / "benchmarks" / "quality" / "pretrain_observed.py"
RESULT = "result.json"


class RunFailed(RuntimeError):
    """A run exited non-zero or its log lacks the held-out loss."""


def run_dir(spec: RunSpec, settings: Settings, out_dir: Path) -> Path:
    return out_dir / f"{spec.slug}_{run_key(spec, settings)}"


def load_result(path: Path) -> dict[str, Any] | None:
    """The cached record of a finished run, or None."""
    try:
        return json.loads((path / RESULT).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (``MASTER_PORT``)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rank_env(rank: int, world: int, port: int, gpus: bool) -> dict[str, str]:
    """What torchrun would export for one local rank (plus the CPU thread cap)."""
    env = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "WORLD_SIZE": str(world),
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "LOCAL_WORLD_SIZE": str(world),
        "CUDA_DEVICE_MAX_CONNECTIONS": "1",
        "PYTHONUNBUFFERED": "1",
    }
    if not gpus:
        env["OMP_NUM_THREADS"] = "1"  # one core per rank: two ranks on two cores
    return env


def torchrun_command(settings: Settings, args: list[str], port: int) -> list[str]:
    """The equivalent torchrun command line (what GPU runs execute; recorded for CPU runs)."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={settings.nproc}",
        f"--master-port={port}",
        str(ENTRY),
        *args,
    ]


LAUNCHERS = ("fork", "spawn", "torchrun")


def launch(
    settings: Settings, args: list[str], log_path: Path, timeout_s: float, launcher: str
) -> int:
    """Run the ranks to completion with all output in ``log_path``; return the exit status.

    If one rank fails, the others are stopped (they would wait forever in a collective).
    """
    port = free_port()
    if launcher == "fork":
        return launch_forked(settings.nproc, args, log_path, port, timeout_s)
    with open(log_path, "ab", buffering=0) as log:
        if launcher == "torchrun":
            command = torchrun_command(settings, args, port)
            env = {**os.environ, "CUDA_DEVICE_MAX_CONNECTIONS": "1", "PYTHONUNBUFFERED": "1"}
            return subprocess.run(
                command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=timeout_s
            ).returncode
        ranks = [
            subprocess.Popen(
                [sys.executable, str(ENTRY), *args],
                cwd=REPO,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=rank_env(rank, settings.nproc, port, gpus=False),
            )
            for rank in range(settings.nproc)
        ]
        return _wait_all(ranks, time.monotonic() + timeout_s)


_FORK_READY = []


def prepare_fork_launcher() -> None:
    """Import what every CPU run imports (once per benchmark, in this process). The imports'
    warnings and the emulation banner go to /dev/null here: every run's log repeats them."""
    if _FORK_READY:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 1)
        os.dup2(null, 2)
        from megatron.rectify.dev import cpu_emulation

        cpu_emulation.activate()
        import megatron.core.datasets.blended_megatron_dataset_builder  # noqa: F401
        import megatron.core.datasets.gpt_dataset  # noqa: F401
        import megatron.core.models.gpt  # noqa: F401
        import megatron.training.training  # noqa: F401

        import benchmarks.quality.pretrain_observed  # noqa: F401
        import megatron.rectify.moe_layer  # noqa: F401
        import megatron.rectify.training  # noqa: F401
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, null):
            os.close(fd)
    _FORK_READY.append(True)


def launch_forked(world: int, args: list[str], log_path: Path, port: int, timeout_s: float) -> int:
    """Fork one child per rank from this (pre-imported) process; see the module docstring."""
    prepare_fork_launcher()
    sys.stdout.flush()
    sys.stderr.flush()
    pids: list[int] = []
    try:
        for rank in range(world):
            pid = os.fork()
            if pid == 0:
                os.setpgid(0, 0)
                _forked_rank(rank, world, port, args, log_path)  # never returns
            with contextlib.suppress(OSError):  # the child may have done it already
                os.setpgid(pid, pid)
            pids.append(pid)
        return _wait_pids(pids, time.monotonic() + timeout_s)
    finally:
        for pid in pids:
            _kill_process_group(pid)


def _kill_process_group(pgid: int) -> None:
    """Kill what a forked rank left behind. A rank ends with ``os._exit`` (no teardown), so
    helper processes it started (the multiprocessing worker and resource tracker behind
    megatron's checkpoint saving, ~300 MB each) would outlive it, every saving run, until a
    sweep runs out of memory: each rank leads its own process group so that the group can be
    removed with it. Also stops the ranks themselves when the benchmark is interrupted (they
    are outside the terminal's process group)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _forked_rank(rank: int, world: int, port: int, args: list[str], log_path: Path) -> None:
    """Body of a forked rank: output to the log, torchrun's environment, the entry point."""
    code = 1
    try:
        fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        sys.stdout.reconfigure(line_buffering=True)  # whole lines: the ranks share the file
        sys.stderr.reconfigure(line_buffering=True)
        os.environ.update(rank_env(rank, world, port, gpus=False))
        import torch

        torch.set_num_threads(1)
        sys.argv = [str(ENTRY), *args]
        from benchmarks.quality import pretrain_observed

        pretrain_observed.main()
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else int(exit_.code is not None)
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)  # no interpreter teardown (seconds with torch loaded), no atexit


def _wait_pids(pids: list[int], deadline: float) -> int:
    """``_wait_all`` for forked children."""
    codes: dict[int, int] = {}
    while len(codes) < len(pids):
        for pid in pids:
            if pid not in codes:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    codes[pid] = os.waitstatus_to_exitcode(status)
        failed = [code for code in codes.values() if code != 0]
        if failed or time.monotonic() > deadline:
            for pid in pids:
                if pid not in codes:
                    _stop(pid)
            return failed[0] if failed else 124
        time.sleep(0.2)
    return 0


def _stop(pid: int) -> None:
    """SIGTERM, then SIGKILL after 20 s; reaps the child."""
    os.kill(pid, signal.SIGTERM)
    for _ in range(100):
        if os.waitpid(pid, os.WNOHANG)[0]:
            return
        time.sleep(0.2)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)


def _wait_all(ranks: list[subprocess.Popen], deadline: float) -> int:
    """Wait for every rank; on the first failure (or the deadline) stop the rest."""
    while True:
        codes = [rank.poll() for rank in ranks]
        failed = [code for code in codes if code not in (None, 0)]
        if failed or time.monotonic() > deadline:
            for rank in ranks:
                if rank.poll() is None:
                    rank.terminate()
            for rank in ranks:
                try:
                    rank.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    rank.kill()
                    rank.wait()
            return failed[0] if failed else 124
        if all(code == 0 for code in codes):
            return 0
        time.sleep(0.2)


def execute(
    spec: RunSpec,
    settings: Settings,
    out_dir: Path,
    dense_dir: Path | None = None,
    force: bool = False,
    timeout_s: float = 3600.0,
    launcher: str | None = None,
) -> dict[str, Any]:
    """Train (or reuse) one run and return its record; raise :class:`RunFailed` on failure."""
    directory = run_dir(spec, settings, out_dir)
    if not force and (cached := load_result(directory)) is not None:
        cached["cached"] = True
        return cached
    shutil.rmtree(directory, ignore_errors=True)  # megatron's upcycling refuses an old --save
    directory.mkdir(parents=True)
    args = training_args(
        spec, settings, str(directory), None if dense_dir is None else str(dense_dir)
    )
    (directory / "command.txt").write_text(shlex.join(torchrun_command(settings, args, 0)) + "\n")
    started = time.time()
    launcher = launcher or ("torchrun" if settings.gpus else "fork")
    status = launch(settings, args, directory / "train.log", timeout_s, launcher)
    wall_s = time.time() - started
    log = (directory / "train.log").read_text(errors="replace")
    record = parse_log(log)
    if status != 0 or record["heldout"].get(AS_TRAINED, {}).get("loss") is None:
        tail = "\n".join(log.splitlines()[-25:])
        raise RunFailed(f"{spec.slug}: exit {status}; log {directory / 'train.log'}:\n{tail}")
    record.update(
        spec=dataclasses.asdict(spec),
        variant=spec.variant,
        key=run_key(spec, settings),
        settings=dataclasses.asdict(settings),
        command=shlex.join(torchrun_command(settings, args, 0)),
        wall_s=round(wall_s, 1),
        finished=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        cached=False,
    )
    if not spec.dense:  # only the dense model is ever loaded again
        shutil.rmtree(directory / "checkpoint", ignore_errors=True)
    write_text_atomically(directory / RESULT, json.dumps(record, indent=1))
    return record
