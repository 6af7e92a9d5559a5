"""Quality reproduction of the Rectify-Router paper's routing experiments.

``python -m benchmarks.quality`` (``make bench-quality``) trains small MoE GPTs from scratch (or
upcycled from a dense model) for the paper's grid, a capacity sweep, inference-only
rectification and load-balancing on/off, several seeds each, then writes
``docs/results/quality.md`` and its plots. Modules, in the order a run travels:

- ``plan``: run specifications, the experiment grid, megatron command lines, cache keys;
- ``runner``: launch one run (``pretrain_observed.py`` on 2 gloo processes or torchrun on GPUs),
  cache its parsed result;
- ``pretrain_observed``: ``pretrain_gpt_rectify.py`` plus routing statistics for evaluation
  passes and dropless runs (a product routing observer), the gate-1 control, and paired
  inference-only evaluation;
- ``logparse``: megatron's log -> JSON record;
- ``stats``: records -> statistics over seeds (mean, spread, paired deltas, the target);
- ``tables`` / ``plots``: the report's markdown tables and PNG plots;
- ``report``: the document ``docs/results/quality.md``;
- ``cli``: the command line.
"""
