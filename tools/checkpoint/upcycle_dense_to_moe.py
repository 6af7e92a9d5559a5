"""Upcycle a dense Hugging Face Llama checkpoint into a rectified MoE GPT megatron checkpoint.

    python tools/checkpoint/upcycle_dense_to_moe.py --hf-dir Llama-2-7b-hf \\
        --save-dir ckpt/llama2-7b-8e --num-experts 8 --moe-router-topk 1 \\
        --target-expert-parallel-size 8 --dtype bf16

Attention, embeddings and norms are copied; every expert of an MoE layer is a copy of that
layer's dense SwiGLU FFN; routers are initialised by megatron's router initialisation.
``--moe-layer-freq`` chooses the MoE layers (default every layer; e.g. ``'([0,1]*16)'`` for
every other layer of a 32-layer model). With top-1 routing (and the straight-through weighting
of ``--moe-rectify``) the upcycled model reproduces the dense model's logits at step 0 - check
with ``convert_hf.py verify --hf-dir <dense> --load-dir <upcycled>``.
Other flags are megatron / pretrain_gpt_rectify.py flags, recorded in the checkpoint's args.
Progress (tensors and bytes done, rate, ETA) goes to stderr; --quiet prints errors only.
"""

import os
import sys

if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)  # tools/checkpoint/inspect.py must not shadow the standard library's inspect
os.environ["CUDA_VISIBLE_DEVICES"] = ""  # conversion is a CPU job: hide GPUs before torch loads

import argparse  # noqa: E402

from megatron.rectify.checkpoint.cli import add_layout_args, add_quiet_arg, run_tool  # noqa: E402

PROG = "upcycle_dense_to_moe.py"


def main() -> None:
    from megatron.rectify.checkpoint import convert
    from megatron.rectify.progress import Progress

    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    parser.add_argument("--hf-dir", required=True, help="dense HF Llama folder")
    parser.add_argument("--save-dir", required=True, help="megatron checkpoint folder to create")
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32")
    parser.add_argument("--overwrite", action="store_true")
    add_quiet_arg(parser)
    add_layout_args(parser)
    options, megatron_flags = parser.parse_known_args()
    layout = convert.ParallelLayout(
        options.target_tensor_parallel_size,
        options.target_pipeline_parallel_size,
        options.target_expert_parallel_size,
    )
    result = convert.import_hf(
        options.hf_dir, options.save_dir, megatron_flags, layout, options.dtype, upcycle=True,
        overwrite=options.overwrite, progress=Progress(PROG, quiet=options.quiet),
    )  # fmt: skip
    if not options.quiet:
        print(f"{PROG}: wrote {result['tensors']} tensors to {options.save_dir} (release "
              "checkpoint)")  # fmt: skip


if __name__ == "__main__":
    run_tool(PROG, main)
