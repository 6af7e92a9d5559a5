"""At-scale cost model of the MoE layer and the training step (``python -m benchmarks.at_scale``).

Why a model: the project's cost benchmarks (``benchmarks/perf``) run on CPUs, and nobody who
wrote this code had a GPU cluster. A user choosing a capacity factor and a routing mode for a
real run needs the other half of the trade-off: what each mode costs on, say, 8 nodes of 8 H100s.
The model prices one MoE layer forward+backward from first principles (expert GEMM FLOPs, EP
all-to-all bytes split into NVLink and InfiniBand, the slowest rank's load, router, host syncs)
with every machine number a stated assumption in one dataclass (:mod:`.cluster`). It is checked
against what *can* be measured here: the CPU layer benchmark, with this machine's GEMM rate and
gloo bandwidth calibrated in a few seconds (:mod:`.calibrate`, :mod:`.validate`).

Modules: :mod:`.cluster` (machine parameters), :mod:`.models` (model sizes, layouts, routing
modes), :mod:`.routing_load` (per-expert load distribution, slowest rank), :mod:`.layer_model`
(FLOPs, bytes, times), :mod:`.inputs` (the project's measured results it reuses),
:mod:`.calibrate`, :mod:`.validate`, :mod:`.predict`, :mod:`.report`, :mod:`.plots`.
"""
