"""Print a megatron-rectify checkpoint's layout, parameter shapes and the settings it was
trained with - without building the model or starting megatron.

    python tools/checkpoint/inspect.py ckpt/run            # summary + every tensor
    python tools/checkpoint/inspect.py ckpt/run --json     # the same, machine-readable
    python tools/checkpoint/inspect.py ckpt/run --verify   # also read every tensor

Without --verify the shard files' sizes are checked against the index but their tensor data is
not read. Exit 1 when a shard file is missing, truncated or (--verify) unreadable.
"""

import os
import sys

if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)  # this file must not shadow the standard library's inspect module
os.environ["CUDA_VISIBLE_DEVICES"] = ""

import argparse  # noqa: E402
import json  # noqa: E402

from megatron.rectify.checkpoint.cli import run_tool  # noqa: E402

PROG = "inspect.py"


def main() -> None:
    from megatron.rectify.checkpoint.summary import checkpoint_summary, format_summary

    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", help="megatron checkpoint folder (the --save folder)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    parser.add_argument("--no-tensors", action="store_true", help="summary only")
    parser.add_argument(
        "--verify",
        action="store_true",
        help="also read every tensor of the shard files (on the CPU, a group at a time) and "
        "report the first unreadable file (exit 1); slow for large checkpoints",
    )
    options = parser.parse_args()
    summary = checkpoint_summary(
        options.checkpoint, with_tensors=not options.no_tensors, verify=options.verify
    )
    print(json.dumps(summary, indent=2) if options.json else format_summary(summary))
    if summary["shards"]["problem"]:
        print(f"{PROG}: error: {summary['shards']['problem']}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    run_tool(PROG, main)
