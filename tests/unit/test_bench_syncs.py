"""The host-sync counter of ``benchmarks/perf/syncs.py`` (single process).

The counter's rules on plain tensors (what is counted, what is not, forward and backward), then
the counts of one MoE layer call at EP = TP = 1 (``single_rank``): FR and static IR
(``--moe-rectify-ir-capacity-factor``) against megatron's path, and dynamic IR at its measured
count. The expert-TP = 2 rows are in ``docs/results/perf.md`` (``--parts syncs``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # benchmarks/ is not installed
    sys.path.insert(0, str(REPO))

from benchmarks.perf import syncs  # noqa: E402
from benchmarks.perf.sweeps import SyncCase  # noqa: E402


def _forward_kinds(fn) -> list[str]:
    counter = syncs.SyncCounter(use_cuda_debug_mode=False)
    with counter.phase("forward"):
        fn()
    return sorted(kind for (_, _, kind), n in counter.counts.items() for _ in range(n))


def test_host_reads_and_data_dependent_shapes_are_counted() -> None:
    x = torch.arange(6.0)
    mask = x > 2
    assert _forward_kinds(lambda: x.sum().item()) == ["item"]
    assert _forward_kinds(lambda: mask.nonzero()) == ["nonzero"]
    assert _forward_kinds(lambda: x[mask]) == ["mask indexing"]
    assert _forward_kinds(lambda: x.tolist()) == ["tolist"]
    assert _forward_kinds(lambda: bool(mask.any())) == ["bool"]
    assert _forward_kinds(lambda: torch.bincount(mask.long(), minlength=2)) == ["bincount"]
    assert _forward_kinds(lambda: torch.repeat_interleave(x, x.long())) == ["repeat_interleave"]
    # torch's own factory: the CPU emulation (switched on by earlier tests of this session)
    # replaces ``torch.tensor`` by a wrapper the counter does not see as the factory
    factory = torch._C._VariableFunctions.tensor
    assert _forward_kinds(lambda: factory([x[0], x[1]])) == ["tensor(list of tensors)"]
    assert _forward_kinds(lambda: x.to("cpu")) == ["to(cpu)"]


def test_device_side_work_is_not_counted() -> None:
    x = torch.arange(6.0)
    mask = x > 2
    assert _forward_kinds(lambda: (x * 2 + 1).sum()) == []
    assert _forward_kinds(lambda: x.masked_fill(mask, 0).topk(2)) == []
    assert _forward_kinds(lambda: torch.repeat_interleave(x, x.long(), output_size=15)) == []
    assert _forward_kinds(lambda: x[torch.tensor([0, 2])]) == []
    assert _forward_kinds(lambda: x.to("cpu", non_blocking=True)) == []


def test_backward_is_counted_at_the_aten_level_and_attributed() -> None:
    x = torch.arange(6.0, requires_grad=True)
    y = x[x.detach() > 2].sum()  # its gradient scatters through the boolean mask
    counter = syncs.SyncCounter(use_cuda_debug_mode=False)
    with counter.phase("backward"):
        syncs._backward(y)  # as the benchmark calls it (the engine runs the op)
    assert counter.total("backward") == 1
    ((phase, site, kind),) = counter.counts
    assert (phase, kind) == ("backward", "mask indexing") and site.startswith("autograd engine")


def test_call_sites_name_the_calling_function() -> None:
    counter = syncs.SyncCounter(use_cuda_debug_mode=False)
    with counter.phase("forward"):
        torch.ones(2).sum().item()
    ((_, site, _),) = counter.counts
    assert (
        site
        == f"tests/unit/{Path(__file__).name}:{test_call_sites_name_the_calling_function.__name__}"
    )


@pytest.mark.usefixtures("single_rank")
def test_rectify_syncs_come_from_our_code_only() -> None:
    row = syncs.count_case(SyncCase(tp=1, ep=1, pad=True))
    modes = row["modes"]
    assert modes["none"]["rectify"] == 0 and modes["none"]["total"] == modes["none"]["megatron"]
    for mode in syncs.MODES[1:]:
        assert modes[mode]["megatron"] == modes["none"]["megatron"], modes[mode]["sites"]


@pytest.mark.usefixtures("single_rank")
def test_fr_adds_no_sync_to_the_padded_path() -> None:
    """FR only changes the routing map and the weights: megatron's padded path stays as it is
    (slot ranking counts per expert with scatter_add; no IR side batch is built)."""
    modes = syncs.count_case(SyncCase(tp=1, ep=1, pad=True))["modes"]
    assert modes["none"]["rectify"] == 0
    assert modes["fr"]["total"] == modes["none"]["total"], modes["fr"]["sites"]


@pytest.mark.parametrize("pad", [True, False], ids=["pad", "nopad"])
@pytest.mark.usefixtures("single_rank")
def test_static_ir_adds_no_sync(pad: bool) -> None:
    """Static IR (a fixed B rows per local expert, chosen on the device) adds nothing to
    megatron's path, padded or not: the side batch is built, merged and split with scatters and
    gathers of host-known sizes. The count is real work: the case drops tokens for IR."""
    from benchmarks.perf.layer import rank_inputs

    case = SyncCase(tp=1, ep=1, pad=pad)
    modes = syncs.count_case(case)["modes"]
    for mode in ("ir static", "ir+fr static"):
        assert modes[mode]["rectify"] == 0, modes[mode]["sites"]
        assert modes[mode]["total"] == modes["none"]["total"], modes[mode]["sites"]
    layer = syncs.build(case, "ir static")
    x, _ = rank_inputs(syncs._layer_case(case))
    layer(x)
    decision = layer.router.last_routing
    assert decision.ir_capacity and int((decision.ir_expert >= 0).sum()) > 0


@pytest.mark.usefixtures("single_rank")
def test_dynamic_ir_stays_at_its_measured_sync_count() -> None:
    """Dynamic IR (flag unset) keeps its variable-sized batch: 4 syncs per layer call at TP 1
    (``intra_gpu_batch``: nonzero, bincount, tolist; ``interleave``: tolist), as recorded in
    docs/results/perf.md. A change here must update that table (and the flag's help)."""
    modes = syncs.count_case(SyncCase(tp=1, ep=1, pad=True))["modes"]
    for mode in ("ir", "ir+fr"):
        sites = {(s["site"].rsplit(":", 1)[-1], s["kind"]) for s in modes[mode]["sites"]}
        assert modes[mode]["rectify"] == 4, modes[mode]["sites"]
        assert {("intra_gpu_batch", "nonzero"), ("intra_gpu_batch", "bincount")} <= sites
