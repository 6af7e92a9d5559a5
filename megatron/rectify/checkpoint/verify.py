"""``convert_hf.py verify``: do a megatron checkpoint and a HF model compute the same function?

The megatron side is loaded in whatever TP/EP layout the command runs in (torchrun; gloo on
the CPU), so one command checks both the conversion and the resharding. The MoE runs without
a capacity limit unless the caller adds one, as HF's Mixtral does: a dropped token would make
the comparison meaningless. Rank 0 has the HF logits computed on the same tokens
(``hf_reference``) and compares.
"""

from __future__ import annotations

import argparse

import torch

from megatron.rectify.checkpoint import session
from megatron.rectify.checkpoint.errors import CheckpointToolError
from megatron.rectify.checkpoint.hf_reference import hf_logits


def verify_logits(options: argparse.Namespace, megatron_flags: list[str]) -> bool:
    from megatron.core import parallel_state

    from megatron.rectify.checkpoint.convert import megatron_logits
    from megatron.rectify.checkpoint.layout import read_checkpoint_args

    saved = read_checkpoint_args(options.load_dir)
    vocab = getattr(saved, "hf_vocab_size", None) or saved.padded_vocab_size
    args = session.start_megatron(
        [
            "--load",
            options.load_dir,
            "--use-checkpoint-args",
            "--no-initialization",
            "--moe-token-dispatcher-type",
            "alltoall",
            *megatron_flags,
        ],  # fmt: skip
        prog="convert_hf.py verify",
        routing_from_checkpoint=False,  # dropless unless the caller gives the routing
    )
    if args.pipeline_model_parallel_size != 1:
        raise CheckpointToolError("verify runs with --pipeline-model-parallel-size 1")
    model = session.build_model()
    session.load_model_weights(model)
    model.eval()
    generator = torch.Generator().manual_seed(1234)
    tokens = torch.randint(0, vocab, (options.batch, options.seq_length_check), generator=generator)
    logits = megatron_logits(tokens, model)[..., :vocab].float()
    ok = True
    if torch.distributed.get_rank() == 0:
        reference = hf_logits(options.hf_dir, tokens)
        difference = (logits - reference).abs()
        ok = bool(torch.allclose(logits, reference, atol=options.atol, rtol=options.rtol))
        layout = (
            f"TP{parallel_state.get_tensor_model_parallel_world_size()} "
            f"EP{parallel_state.get_expert_model_parallel_world_size()}"
        )
        print(
            f"verify ({layout}): max |megatron - HF| = {difference.max().item():.3e} over "
            f"{tuple(logits.shape)} logits (max |HF| = {reference.abs().max().item():.3e}): "
            f"{'MATCH' if ok else 'MISMATCH'} at atol={options.atol} rtol={options.rtol}",
            flush=True,
        )
        if options.save_logits:
            torch.save({"megatron": logits, "hf": reference, "tokens": tokens}, options.save_logits)
    flag = torch.tensor([int(ok)])
    torch.distributed.broadcast(flag, src=0)
    return bool(flag.item())
