"""Host synchronisations of the MoE layer on a real GPU (CUDA only; run by scripts/gpu_check.sh).

A host sync makes the CPU wait for the GPU, so the launch queue drains and the GPU idles until
the host catches up. Fill-in Rectification (FR) must add none to megatron's padded layer: its
slot ranking is sort / scatter on the device, and the padded dispatcher's sizes are known on the
host from the capacity. ``torch.cuda.set_sync_debug_mode("error")`` turns every synchronising
CUDA call (device-to-host copies, ``item``, ``nonzero``, ...) into an exception, so a forward +
backward that completes under it synchronised nowhere. The CPU counter of
``benchmarks.perf.syncs`` judges the same by rule; these tests are the GPU's word on it.

The static IR mode (``moe_rectify_ir_capacity_factor``: a fixed-size IR side batch) is held to
the same standard once the config has that field; until then its test skips with the reason.
One process, EP = 1, NCCL world of one, bf16.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # benchmarks/ is not installed
    sys.path.insert(0, str(REPO))

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

#: Capacity 1.0 = the mean load: random routing leaves some experts over it (dropped tokens: IR's
#: work) and some under it (padding slots: FR's work).
CASE = dict(ep=1, tokens=4096, hidden=256, experts=8, topk=2, capacity_factor=1.0)
STATIC_IR_FIELD = "moe_rectify_ir_capacity_factor"


def _has_static_ir() -> bool:
    from megatron.rectify.config import RectifyTransformerConfig

    return STATIC_IR_FIELD in {f.name for f in dataclasses.fields(RectifyTransformerConfig)}


@pytest.fixture(scope="module", autouse=True)
def nccl_world() -> Iterator[None]:
    """A one-process NCCL world with megatron's parallel state (TP = EP = 1); no default
    device (the benchmark's inputs come from a CPU generator)."""
    from megatron.core import parallel_state

    from megatron.rectify.dev.multiprocess import find_free_port

    torch.cuda.set_device(0)
    torch.distributed.init_process_group(
        "nccl", init_method=f"tcp://127.0.0.1:{find_free_port()}", rank=0, world_size=1
    )
    parallel_state.initialize_model_parallel()
    yield
    parallel_state.destroy_model_parallel()
    torch.distributed.destroy_process_group()


@contextmanager
def sync_debug_mode(mode: str) -> Iterator[None]:
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode(mode)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


def _layer(mode: str, **fields: object) -> torch.nn.Module:
    """The benchmark's layer (megatron's local spec, alltoall dispatcher, padded to capacity,
    bf16) in routing ``mode`` with extra config ``fields``."""
    from benchmarks.perf import layer as bench_layer
    from benchmarks.perf.common import reseed
    from benchmarks.perf.sweeps import LayerCase

    reseed()
    case = LayerCase(**CASE)
    config = bench_layer.layer_config(case, mode, bf16=True)
    if fields:
        config = dataclasses.replace(config, **fields)
    spec = bench_layer.layer_spec(mode, case.experts)
    return spec.submodules.mlp(config=config, layer_number=1).cuda().train()


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    shape = (CASE["tokens"], 1, CASE["hidden"])
    x = torch.randn(shape, generator=gen).to("cuda", torch.bfloat16)
    upstream = torch.randn(shape, generator=gen).to("cuda", torch.bfloat16)
    return x, upstream


def _forward_backward(layer: torch.nn.Module, x: torch.Tensor, upstream: torch.Tensor) -> None:
    x = x.detach().requires_grad_()
    output, _ = layer(x)
    (output * upstream).sum().backward()


@pytest.mark.parametrize(
    ("mode", "fields"),
    [
        pytest.param("none", {}, id="megatron"),
        pytest.param("fr", {}, id="fr"),
        pytest.param("ir+fr", {STATIC_IR_FIELD: 0.25}, id="ir+fr-static"),
    ],
)
def test_padded_layer_forward_backward_has_no_host_sync(mode: str, fields: dict) -> None:
    """megatron's padded layer (the baseline: if it fails, megatron syncs and FR is judged by
    the comparison test below), FR, and static IR+FR run a forward + backward with every
    synchronising CUDA call raising."""
    if STATIC_IR_FIELD in fields and not _has_static_ir():
        pytest.skip(
            f"RectifyTransformerConfig has no {STATIC_IR_FIELD} field yet (the static IR "
            "mode, --moe-rectify-ir-capacity-factor, is not merged)"
        )
    layer = _layer(mode, **fields)
    x, upstream = _inputs()
    _forward_backward(layer, x, upstream)  # warm-up: first calls set up buffers and handles
    torch.cuda.synchronize()
    with sync_debug_mode("error"):
        _forward_backward(layer, x, upstream)
    torch.cuda.synchronize()
    if mode != "none":  # the rectification had work to do (read after the checked call)
        stats = layer.router.statistics().as_percentages()
        assert stats["dropped_pct"] > 0 and stats["filled_in_pct"] > 0, stats


def test_fill_in_adds_no_host_sync_to_megatron() -> None:
    """Counted the benchmark's way (sync debug mode "warn" plus explicit stream / event waits),
    per call site: FR's forward + backward has exactly megatron's syncs, none of its own (nor
    static IR's, where the benchmark has those modes)."""
    from benchmarks.perf import syncs
    from benchmarks.perf.sweeps import SyncCase

    row = syncs.count_case(SyncCase(tp=1, ep=1, pad=True, **_sync_case_fields()))
    vanilla, fill_in = row["modes"]["none"], row["modes"]["fr"]
    assert fill_in["rectify"] == 0, fill_in["sites"]
    assert fill_in["total"] == vanilla["total"], (vanilla["sites"], fill_in["sites"])
    for mode in ("ir static", "ir+fr static"):  # where the benchmark counts static IR too
        if mode in row["modes"]:
            assert row["modes"][mode]["rectify"] == 0, (mode, row["modes"][mode]["sites"])


def _sync_case_fields() -> dict:
    keep = {"tokens", "hidden", "experts", "topk", "capacity_factor"}
    return {k: v for k, v in CASE.items() if k in keep}
