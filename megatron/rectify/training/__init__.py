"""What ``pretrain_gpt_rectify.py`` plugs into ``megatron.training.pretrain``, by job:

* :mod:`~megatron.rectify.training.args` - the ``--moe-rectify*`` flags and the parse ->
  check -> validate sequence (one line naming the flag for a bad combination);
* :mod:`~megatron.rectify.training.option_checks` - megatron's MoE options (fusions, CUDA
  graphs, EP overlap, FP8 padding) against rectification, one of those lines each;
* :mod:`~megatron.rectify.training.checkpoint_args` - ``--load`` / ``--use-checkpoint-args``
  before megatron starts (tracker file, restored routing, unreadable checkpoint files);
* :mod:`~megatron.rectify.training.gpt_recipe` - megatron's GPT recipe on the rectified layer
  specs (model provider, batch, loss, forward step, datasets) and evaluation-pass rectification;
* :mod:`~megatron.rectify.training.built_models` - the registry of the model chunks built;
* :mod:`~megatron.rectify.training.run` - :func:`main`, the end-of-run summary, the shutdown.

Patches of megatron's own functions live in :mod:`megatron.rectify.megatron_patches`, the CPU
development mode in :mod:`megatron.rectify.dev`. Re-exported here: what callers outside the
package use.
"""

from megatron.rectify.training.args import add_rectify_args, parse_and_validate_args
from megatron.rectify.training.built_models import add_model_built_callback
from megatron.rectify.training.gpt_recipe import install_eval_rectification, model_provider
from megatron.rectify.training.run import main

__all__ = [
    "add_model_built_callback",
    "add_rectify_args",
    "install_eval_rectification",
    "main",
    "model_provider",
    "parse_and_validate_args",
]
