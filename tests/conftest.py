"""Shared pytest configuration for megatron-rectify (the one conftest.py of all three tiers).

* The tiers (tests/README.md): ``tests/unit`` (one process, seconds), ``tests/distributed``
  (gloo process groups, torchrun and subprocess training runs; every test marked ``slow`` or
  ``multiprocess``), ``tests/gpu`` (CUDA only, skipped elsewhere). Collection refuses a test
  file outside a tier folder, a ``slow`` / ``multiprocess`` test in ``tests/unit`` and an
  unmarked one in ``tests/distributed``, so that ``make test-unit`` stays fast.
* Registers the ``slow`` and ``multiprocess`` markers (also listed in pyproject.toml, so that
  ``--strict-markers`` works whichever configuration file is used).
* ``multiprocess`` tests run megatron over gloo through the CPU emulation, which refuses to run
  on a CUDA machine; there they are skipped (real GPU runs judge GPU behaviour).
* The CPU emulation is NOT activated in the pytest process: pure tests do not need it and
  multiprocess tests activate it in their children. Tests that want megatron in-process can
  request the ``cpu_emulation`` fixture, which activates it for the rest of the session
  (the patches cannot be undone).
* The helper modules next to this file (``moe_layer_cases``, ``tiny_checkpoint``) are importable
  by name from every tier, in the pytest process and in the rank processes.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: takes more than a few seconds; still run in CI")
    config.addinivalue_line("markers", "multiprocess: spawns several gloo processes")


TESTS_DIR = Path(__file__).resolve().parent
TIERS = ("unit", "distributed", "gpu")


def _misplaced(item: pytest.Item) -> str | None:
    """Why ``item`` is in the wrong tier folder, or None."""
    try:
        parts = Path(item.path).resolve().relative_to(TESTS_DIR).parts
    except ValueError:
        return None
    tier = parts[0] if len(parts) > 1 else None
    marked = any(item.get_closest_marker(name) for name in ("slow", "multiprocess"))
    if tier not in TIERS:
        return "test files go into tests/unit, tests/distributed or tests/gpu"
    if tier == "unit" and marked:
        return "marked slow/multiprocess: move it to tests/distributed"
    if tier == "distributed" and not marked:
        return "neither slow nor multiprocess: mark it, or move it to tests/unit"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    misplaced = [(item.nodeid, why) for item in items if (why := _misplaced(item))]
    if misplaced:
        lines = [f"  {nodeid}: {why}" for nodeid, why in misplaced]
        raise pytest.UsageError("tests in the wrong tier (tests/README.md):\n" + "\n".join(lines))
    multiprocess = [item for item in items if item.get_closest_marker("multiprocess")]
    if not multiprocess:
        return
    import torch

    if torch.cuda.is_available():
        skip = pytest.mark.skip(reason="CPU-emulation (gloo) test; this machine has CUDA")
        for item in multiprocess:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def cpu_emulation() -> ModuleType:
    """Activate the CPU emulation in the pytest process (irreversible for the session)."""
    from megatron.rectify.dev import cpu_emulation as emulation

    emulation.activate()
    return emulation


# Helper modules next to this file (moe_layer_cases, tiny_checkpoint) are imported by the tests of
# every tier and by the rank processes (which get the parent's sys.path), so the tests folder must
# be importable by name.
sys.path.insert(0, str(TESTS_DIR))


@pytest.fixture(scope="module")
def single_rank(request: pytest.FixtureRequest):
    """A one-process world with megatron's parallel state (TP = PP = EP = 1).

    CPU machines: gloo under the CPU emulation. CUDA machines: NCCL, tensors on the GPU.
    """
    from megatron.core import parallel_state

    from megatron.rectify.dev.multiprocess import find_free_port

    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        request.getfixturevalue("cpu_emulation")
    torch.distributed.init_process_group(
        "nccl" if on_gpu else "gloo",
        init_method=f"tcp://127.0.0.1:{find_free_port()}",
        rank=0,
        world_size=1,
    )
    parallel_state.initialize_model_parallel()
    previous_device = torch.get_default_device()
    torch.set_default_device("cuda" if on_gpu else "cpu")
    yield
    torch.set_default_device(previous_device)
    parallel_state.destroy_model_parallel()
    torch.distributed.destroy_process_group()
