"""The local spec's expert ``linear_fc2``, made to work with biases at expert-TP = EP = 1.

Owns: one class. Works around a megatron-core 0.19.2 bug that crashes every local-spec MoE run
with biases (megatron's default; i.e. without ``--disable-bias-linear``) whose experts are
neither expert-parallel nor expert-tensor-parallel, with
``Output 0 of _ReduceFromModelParallelRegion is a view and is being modified inplace``:

* ``RowParallelLinear.forward`` (megatron/core/tensor_parallel/layers.py) skips its output
  all-reduce only when ``explicit_expert_comm`` (``is_expert and (tp_size > 1 or EP > 1)``);
  otherwise it calls ``reduce_from_tensor_model_parallel_region``, whose autograd Function
  returns its input as-is for a group of one, so autograd marks the output a view;
* ``MLP.forward`` (megatron/core/transformer/mlp.py, line 354) then adds an expert's bias to
  that output in place (``output += output_bias.unsqueeze(0) * per_token_scale.unsqueeze(-1)``),
  which autograd forbids on such a view.

megatron's own local spec (``get_gpt_layer_local_spec`` -> ``SequentialMLP``) crashes the same
way. For an expert over a one-rank expert-TP group the all-reduce (or, with sequence
parallelism, the reduce-scatter) is the identity, so marking the layer ``explicit_expert_comm``
(as megatron's ``SharedExpertMLP`` does for its overlapped linears) skips an operation that
does nothing and leaves the output a plain tensor: same values, same gradients, no copy.
"""

from __future__ import annotations

from typing import Any

from megatron.core.tensor_parallel.layers import RowParallelLinear
from megatron.core.utils import get_pg_size


class ExpertRowParallelLinear(RowParallelLinear):
    """``RowParallelLinear`` for experts whose output may take their bias in place.

    Differs from megatron's only for an expert layer with ``skip_bias_add`` over an expert-TP
    group of one rank, where it skips the no-op output reduction (see the module docstring).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.is_expert and self.skip_bias_add and get_pg_size(self.tp_group) == 1:
            self.explicit_expert_comm = True
