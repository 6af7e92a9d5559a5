"""Hugging Face Mixtral/Llama <-> megatron-rectify checkpoints.

    # HF Mixtral -> megatron (release checkpoint; rectify/capacity flags are training flags and
    # may be given here to be recorded, or later on the training command line)
    python tools/checkpoint/convert_hf.py import --hf-dir Mixtral-8x7B-v0.1 \\
        --save-dir ckpt/mixtral-rectify --target-expert-parallel-size 8 --dtype bf16

    # megatron (any layout it was trained in) -> HF Mixtral (Llama when the model is dense)
    python tools/checkpoint/convert_hf.py export --load-dir ckpt/run --hf-dir out/hf --dtype bf16

    # logits of the megatron checkpoint (in any TP/EP layout, under torchrun) vs the HF model
    torchrun --nproc-per-node 2 tools/checkpoint/convert_hf.py verify --hf-dir out/hf \\
        --load-dir ckpt/run --expert-model-parallel-size 2

Conversion runs on the CPU (GPUs are hidden); flags the tool does not know are megatron /
pretrain_gpt_rectify.py flags. Outputs appear only when complete (staging folder + rename).
import / export report progress on stderr (tensors and bytes done, rate, ETA; --quiet: none).
"""

import os
import sys

if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)  # tools/checkpoint/inspect.py must not shadow the standard library's inspect
os.environ["CUDA_VISIBLE_DEVICES"] = ""  # conversion is a CPU job: hide GPUs before torch loads

import argparse  # noqa: E402

from megatron.rectify.checkpoint.cli import add_layout_args, add_quiet_arg, run_tool  # noqa: E402

PROG = "convert_hf.py"


def parse() -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    imp = commands.add_parser("import", help="HF Mixtral/Llama folder -> megatron checkpoint")
    imp.add_argument("--hf-dir", required=True, help="folder with config.json + safetensors")
    imp.add_argument("--save-dir", required=True, help="megatron checkpoint folder to create")
    imp.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32")
    imp.add_argument("--overwrite", action="store_true", help="replace a non-empty --save-dir")
    add_quiet_arg(imp)
    add_layout_args(imp)

    exp = commands.add_parser("export", help="megatron checkpoint -> HF Mixtral/Llama folder")
    exp.add_argument("--load-dir", required=True, help="megatron checkpoint folder (--save)")
    exp.add_argument("--hf-dir", required=True, help="HF folder to create")
    exp.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="bf16")
    exp.add_argument("--max-shard-size-gb", type=float, default=5.0)
    exp.add_argument(
        "--vocab-size",
        type=int,
        default=None,
        help="tokens of the tokenizer (the padded rows are cropped); default: the HF vocabulary "
        "recorded on import, else megatron's padded size",
    )
    exp.add_argument("--overwrite", action="store_true", help="replace a non-empty --hf-dir")
    add_quiet_arg(exp)

    ver = commands.add_parser(
        "verify", help="compare megatron logits (any TP/EP layout, torchrun) with the HF model's"
    )
    ver.add_argument("--hf-dir", required=True)
    ver.add_argument("--load-dir", required=True)
    ver.add_argument("--seq-length-check", type=int, default=32, help="tokens per sequence")
    ver.add_argument("--batch", type=int, default=2)
    ver.add_argument("--atol", type=float, default=1e-4)
    ver.add_argument("--rtol", type=float, default=1e-4)
    ver.add_argument("--save-logits", default=None, help="write both logits to this .pt file")
    return parser.parse_known_args()


def main() -> None:
    from megatron.rectify.checkpoint import convert
    from megatron.rectify.progress import Progress

    options, megatron_flags = parse()
    if options.command in ("import", "export"):
        progress = Progress(f"{PROG} {options.command}", quiet=options.quiet)
    if options.command == "import":
        layout = convert.ParallelLayout(
            options.target_tensor_parallel_size,
            options.target_pipeline_parallel_size,
            options.target_expert_parallel_size,
        )
        result = convert.import_hf(
            options.hf_dir, options.save_dir, megatron_flags, layout, options.dtype,
            overwrite=options.overwrite, progress=progress,
        )  # fmt: skip
        if not options.quiet:
            print(
                f"{PROG}: wrote {result['tensors']} tensors to {options.save_dir} (release "
                f"checkpoint, padded vocabulary {result['padded_vocab_size']})"
            )
    elif options.command == "export":
        result = convert.export_hf(
            options.load_dir,
            options.hf_dir,
            options.dtype,
            int(options.max_shard_size_gb * 1024**3),
            options.overwrite,
            options.vocab_size,
            megatron_flags,
            progress,
        )
        kind = "Mixtral" if result["architecture"].is_moe else "Llama"
        if not options.quiet:
            print(f"{PROG}: wrote {result['tensors']} tensors to {options.hf_dir} ({kind} format)")
    else:
        from megatron.rectify.checkpoint.verify import verify_logits

        ok = verify_logits(options, megatron_flags)
        sys.exit(0 if ok else 1)


if __name__ == "__main__":
    run_tool(PROG, main)
