"""Pretrain a GPT whose MoE layers use the Rectify-Router, on megatron-core's training loop.

    torchrun --nproc-per-node 8 pretrain_gpt_rectify.py <megatron flags> \
        --num-experts 8 --moe-router-topk 1 --moe-expert-capacity-factor 1.0 \
        --moe-token-dispatcher-type alltoall --moe-rectify ir+fr ...

Every megatron flag works as in Megatron-LM's pretrain_gpt.py; the rectify flags are listed in
``--help`` under "rectify-router". ``--cpu-emulation`` (or MEGATRON_RECTIFY_CPU_EMULATION=1) runs
on a machine without GPUs over gloo: slow, for development and CI only.
"""

from megatron.rectify.training import main

if __name__ == "__main__":
    main()
