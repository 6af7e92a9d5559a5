"""Print a megatron-rectify checkpoint's layout, parameter shapes and the settings it was
trained with - without building the model or starting megatron.

    python tools/checkpoint/inspect.py ckpt/run            # summary + every tensor
    python tools/checkpoint/inspect.py ckpt/run --json     # the same, machine-readable
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
    options = parser.parse_args()
    summary = checkpoint_summary(options.checkpoint, with_tensors=not options.no_tensors)
    print(json.dumps(summary, indent=2) if options.json else format_summary(summary))


if __name__ == "__main__":
    run_tool(PROG, main)
