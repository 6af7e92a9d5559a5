"""The post-training replica check of the end-to-end tests (``MEGATRON_RECTIFY_CHECK_REPLICAS=1``).

After training, every replica of a parameter must hold the same values. A silent divergence
(from RNG initialisation, or a missing gradient all-reduce) trains on without any error, so the
end-to-end tests ask the training entry point to compare replicas after ``pretrain`` returns.
Development only: imported by the entry point only when the environment asks for it.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


def check_data_parallel_replicas(models: Iterable[torch.nn.Module]) -> None:
    """Compare every parameter of ``models`` (the model chunks this rank built) with its
    replicas: dense parameters across the data-parallel group (and across the tensor-parallel
    group when they are not TP-sharded, e.g. norms under sequence parallelism), expert
    parameters across the expert-data-parallel group. Prints one line; raises if any parameter
    differs."""
    from megatron.core import parallel_state

    mismatched = []
    for model in models:
        for name, param in model.named_parameters():
            is_expert = not getattr(param, "allreduce", True)
            if is_expert:
                groups = [parallel_state.get_expert_data_parallel_group()]
            else:
                groups = [parallel_state.get_data_parallel_group()]
                if not getattr(param, "tensor_model_parallel", False):
                    groups.append(parallel_state.get_tensor_model_parallel_group())
            mine = param.detach().double().sum().reshape(1)
            for group in groups:
                if group.size() == 1:
                    continue
                every = [torch.zeros_like(mine) for _ in range(group.size())]
                torch.distributed.all_gather(every, mine, group=group)
                if any(not torch.equal(other, mine) for other in every):
                    mismatched.append(name)
    rank = torch.distributed.get_rank()
    if mismatched:
        raise RuntimeError(f"rank {rank}: replicas differ in {sorted(set(mismatched))[:5]}")
    print(f"replica check (rank {rank}): data-parallel replicas hold identical weights", flush=True)
