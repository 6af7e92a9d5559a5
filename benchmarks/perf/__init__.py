"""Cost benchmarks of the Rectify-Router against megatron-core's own top-k routing.

Every time figure is a ratio rectified / vanilla *measured in the same run*: both variants are
built in the same processes, from the same weights, fed the same tokens, and timed alternately
(the order swaps every repeat), so machine drift hits both alike. Medians over repeats; the time
of a repeat is that of the slowest rank.

Parts (one module each), all driven by ``python -m benchmarks.perf`` (:mod:`.run`):

* :mod:`.router` - router forward+backward: ``RectifyRouter`` (IR+FR) / ``TopKRouter``;
* :mod:`.layer` - one MoE layer forward+backward: ``RectifyMoELayer`` / ``MoELayer``, EP ranks;
* :mod:`.iteration` - a full training iteration of a small MoE GPT (forward, backward, gradient
  all-reduce, optimizer step) with megatron's DDP, optimizer and pipeline schedule;
* :mod:`.a2a_bytes` - bytes the EP all-to-all sends to *other* ranks per iteration, for vanilla,
  IR, FR, IR+FR and a comparison-only baseline (:mod:`.redispatch`) that re-dispatches dropped
  tokens to their next choice across GPUs;
* :mod:`.report` - JSON results -> ``docs/results/perf.md`` (:mod:`.tables` for the tables,
  :mod:`.plots` for the PNG plots).

CPU machines run the ranks as gloo processes under the CPU emulation
(:func:`megatron.rectify.dev.multiprocess.run_distributed`); GPU machines run the same code
under ``torchrun`` (NCCL, one process per GPU), see ``scripts/gpu_check.sh``.
"""
