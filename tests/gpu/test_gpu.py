"""GPU-only checks (NCCL, bf16, Transformer Engine grouped GEMM); skipped on CPU machines.

Run by ``scripts/gpu_check.sh``. One process, EP = 1; multi-GPU layouts run through the
benchmark with torchrun.
"""

from __future__ import annotations

import importlib.util

import moe_layer_cases as cases
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
HAVE_TE = importlib.util.find_spec("transformer_engine") is not None


@pytest.fixture(scope="module", autouse=True)
def nccl_world():
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


SPECS = [pytest.param(False, id="local")] + [
    pytest.param(True, id="te", marks=pytest.mark.skipif(not HAVE_TE, reason="no TE"))
]


@pytest.mark.parametrize("te", SPECS)
@pytest.mark.parametrize("topk", [1, 2])
def test_rectified_layer_matches_reference_fp32(te: bool, topk: int) -> None:
    case = {"experts": 4, "topk": topk, "mode": "ir+fr", "te": te}
    result = cases.layer_vs_reference(0, 1, case)
    for name in ("output", "x_grad", "fc1", "fc2", "router"):
        assert result[name] < 1e-3 * max(1.0, result["scale"]), (name, result)
    assert result["rectified"] > 0


@pytest.mark.parametrize("te", SPECS)
def test_rectified_layer_bf16_close_to_reference(te: bool) -> None:
    case = {"experts": 4, "topk": 1, "mode": "ir+fr", "te": te, "bf16": True}
    result = cases.layer_vs_reference(0, 1, case)
    # bf16 keeps 8 bits of mantissa; routing decisions can flip for near-ties, so only the
    # output is checked, loosely.
    assert result["output"] < 0.1 * max(1.0, result["scale"]), result


@pytest.mark.parametrize("te", SPECS)
def test_rectification_off_is_bit_identical_to_megatron_on_gpu(te: bool) -> None:
    result = cases.layer_vs_megatron(0, 1, {"experts": 4, "topk": 2, "te": te, "bf16": True})
    assert all(result["identical"]), result
