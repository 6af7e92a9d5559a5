"""``make fuzz-options``: random combinations of the megatron options in docs/compatibility.md,
each with a random ``--moe-rectify`` mode, trained for 2 iterations of a tiny MoE GPT on CPU.

Every combination must either train (every rank exits 0 and iteration 2 is logged) or stop
before start-up with one line (``pretrain_gpt_rectify.py: error: ...``, the same on every rank
that printed one, no traceback). A run that crashes, hangs, exits 0 without training, or trains
although a row of the table says the combination is refused, fails the script (exit 1) after
all runs, with the command to rerun each failure. The seed fixes the draw, so a failure
reproduces: ``python scripts/fuzz_options.py --seed S --only N``.

Not part of CI (it trains: about 30 s per combination on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from megatron.rectify.dev.compatibility_table import MODES, Row, command_for, read_table  # noqa: E402
from megatron.rectify.dev.tiny_model import subprocess_env  # noqa: E402


@dataclass
class Outcome:
    index: int
    rows: list[str]
    mode: str
    processes: int
    command: str
    result: str  # trained | stopped | FAILED
    expected: str  # trains | refused
    detail: str
    seconds: float


#: Flags whose kernels need Transformer Engine or CUDA: on a CPU machine every run with them
#: stops with one line (``environment_problems``), so ``--trainable`` leaves them out.
GPU_ONLY_FLAGS = (
    "--moe-permute-fusion",
    "--moe-router-fusion",
    "--fp8-format",
    "--cuda-graph-impl",
    "--delay-wgrad-compute",
)


def draw(rows: list[Row], rng: random.Random, trainable: bool) -> tuple[list[Row], str]:
    """One to three rows and a mode, none of whose cells is ``n/a`` (drawn again until so);
    ``trainable``: only cells the table says train (``tested`` / ``untested``), without
    :data:`GPU_ONLY_FLAGS` on a machine without CUDA."""
    import torch

    wanted = ("tested", "untested") if trainable else ("tested", "refused", "untested")
    skip = GPU_ONLY_FLAGS if trainable and not torch.cuda.is_available() else ()
    while True:
        chosen = rng.sample(rows, k=rng.choice((1, 1, 2, 2, 3)))
        mode = rng.choice(MODES)
        if all(row.cells[mode].kind in wanted for row in chosen) and not any(
            flag in skip for row in chosen for flag in row.flags
        ):
            return chosen, mode


def _env(rank: int, world: int, port: int) -> dict[str, str]:
    """The child-process environment plus what torchrun would export for one local rank."""
    return subprocess_env(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )


def launch(
    flags: list[str], world: int, timeout: float, folder: Path
) -> list[tuple[int, str, str]]:
    """Run ``pretrain_gpt_rectify.py flags`` as ``world`` ranks; (exit code, stdout, stderr) per
    rank. A rank still running ``timeout`` s after the start, or 60 s after another rank
    failed, is killed (exit code -9)."""
    from megatron.rectify.dev.multiprocess import find_free_port

    port = find_free_port()
    processes, files = [], []
    for rank in range(world):
        out, err = open(folder / f"{rank}.out", "w+"), open(folder / f"{rank}.err", "w+")
        files.append((out, err))
        processes.append(
            subprocess.Popen(
                [sys.executable, str(REPO / "pretrain_gpt_rectify.py"), *flags],
                cwd=REPO,
                env=_env(rank, world, port),
                stdout=out,
                stderr=err,
                start_new_session=True,
            )
        )
    start, first_failure = time.monotonic(), None
    while any(p.poll() is None for p in processes):
        now = time.monotonic()
        if first_failure is None and any(p.returncode not in (None, 0) for p in processes):
            first_failure = now
        if now - start > timeout or (first_failure is not None and now - first_failure > 60):
            for p in processes:
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait()
            break
        time.sleep(0.5)
    results = []
    for p, (out, err) in zip(processes, files, strict=True):
        out.seek(0), err.seek(0)
        results.append((p.returncode, out.read(), err.read()))
        out.close(), err.close()
    return results


def classify(results: list[tuple[int, str, str]]) -> tuple[str, str]:
    """``trained`` / ``stopped`` (one line) / ``FAILED``, with a detail line."""
    codes = [code for code, _, _ in results]
    logs = "".join(out + err for _, out, err in results)
    if all(code == 0 for code in codes):
        if " iteration        2/" in logs:
            return "trained", ""
        return "FAILED", "exit 0 on every rank, but iteration 2 was never logged"
    errors: set[str] = set()
    for code, _, err in results:
        if code in (0, -9) and "error:" not in err:
            continue  # a rank that finished, or was stopped after another one failed
        lines = [line for line in err.strip().splitlines() if line.strip()]
        mine = [line for line in lines if line.startswith("pretrain_gpt_rectify.py: error:")]
        if code != 2 or "Traceback" in err or len(mine) != 1 or lines[-1] != mine[0]:
            tail = lines[-1] if lines else "(no output)"
            return "FAILED", f"exit {code}: {tail[:300]}"
        errors.add(mine[0])
    if len(errors) != 1:
        return "FAILED", f"different error lines on different ranks: {sorted(errors)}"
    return "stopped", errors.pop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=50, help="combinations to run (>= 50)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the draw (default 0)")
    parser.add_argument("--only", type=int, default=None, help="rerun combination N only")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per combination")
    parser.add_argument("--out", type=Path, default=None, help="write the outcomes as JSON here")
    parser.add_argument(
        "--trainable",
        action="store_true",
        help="draw only combinations the table says train (and, without CUDA, no GPU-only flag)",
    )
    args = parser.parse_args(argv)
    rows = read_table()
    rng = random.Random(args.seed)
    outcomes: list[Outcome] = []
    for index in range(args.count):
        chosen, mode = draw(rows, rng, args.trainable)
        if args.only is not None and index != args.only:
            continue
        flags, world = command_for(chosen, mode)
        refused_by = [row.option for row in chosen if row.cells[mode].kind == "refused"]
        expected = "refused" if refused_by else "trains"
        started = time.monotonic()
        with tempfile.TemporaryDirectory(prefix="fuzz-options-") as folder:
            result, detail = classify(launch(flags, world, args.timeout, Path(folder)))
        if result == "trained" and refused_by:
            result, detail = "FAILED", f"trained, but the table says refused: {refused_by}"
        outcome = Outcome(
            index=index,
            rows=[row.option for row in chosen],
            mode=mode,
            processes=world,
            command=f"WORLD_SIZE={world} pretrain_gpt_rectify.py {shlex.join(flags)}",
            result=result,
            expected=expected,
            detail=detail,
            seconds=round(time.monotonic() - started, 1),
        )
        outcomes.append(outcome)
        print(
            f"[{index:3d}] {result:8s} {outcome.seconds:6.1f} s  {mode:6s} x{world}  "
            f"{' + '.join(outcome.rows)}{'  -- ' + detail if detail else ''}",
            flush=True,
        )
    counts = {kind: sum(o.result == kind for o in outcomes) for kind in ("trained", "stopped")}
    failed = [o for o in outcomes if o.result == "FAILED"]
    print(
        f"fuzz-options: {len(outcomes)} combinations (seed {args.seed}"
        f"{', trainable only' if args.trainable else ''}): {counts['trained']} "
        f"trained, {counts['stopped']} stopped with one line, {len(failed)} failed",
        flush=True,
    )
    for o in failed:
        again = f"--seed {args.seed}{' --trainable' if args.trainable else ''} --only {o.index}"
        print(f"  FAILED [{o.index}] rerun: python scripts/fuzz_options.py {again}")
        print(f"    {o.command}\n    {o.detail}")
    if args.out is not None:
        args.out.write_text(json.dumps([asdict(o) for o in outcomes], indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
