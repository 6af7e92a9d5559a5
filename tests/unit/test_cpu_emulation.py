"""Tests of megatron.rectify.dev.cpu_emulation.

Activation patches the whole process irreversibly, so every scenario runs in a fresh interpreter
(``_scenario_*`` below, executed by ``_run_scenario``) and reports its observations as JSON; the
tests assert on those. Both scenarios start together to share the start-up time.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

_TESTS_DIR = str(Path(__file__).resolve().parent)
_MARK = "SCENARIO-RESULT:"


def _emit(result: dict[str, Any]) -> None:
    print(_MARK + json.dumps(result))


def _scenario_torch_then_megatron() -> None:
    """Fresh process: refusal, logging, idempotence, tensors, RNG; megatron imported after."""
    import torch

    from megatron.rectify.dev import cpu_emulation as emu

    r: dict[str, Any] = {}
    original_empty = torch.empty
    r["inactive_after_import"] = not emu.is_active() and torch.empty is original_empty
    os.environ.pop(emu.ENV_VAR, None)
    r["from_env_without_var"] = emu.activate_from_env()

    real_is_available = torch.cuda.is_available
    torch.cuda.is_available = lambda: True
    try:
        emu.activate()
        r["refusal"] = None
    except RuntimeError as exc:
        r["refusal"] = str(exc)
    finally:
        torch.cuda.is_available = real_is_available
    r["untouched_after_refusal"] = not emu.is_active() and torch.empty is original_empty

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logging.getLogger("megatron.rectify").addHandler(handler)
    emu.activate()
    emu.activate()
    r["active"] = emu.is_active()
    r["log"] = [(rec.levelname, rec.getMessage()) for rec in records]

    cuda = torch.device("cuda", 0)
    made = {
        "zeros_str": torch.zeros(3, device="cuda"),
        "empty_device": torch.empty(2, device=cuda),
        "ones_int": torch.ones(2, device=torch.cuda.current_device()),
        "arange": torch.arange(4, device="cuda:0"),
        "randn": torch.randn(2, device="cuda"),
        "tensor": torch.tensor([1.0], device="cuda"),
        "zeros_like": torch.zeros_like(torch.ones(2), device="cuda"),
        "new_empty": torch.ones(1).new_empty(3, device=torch.cuda.current_device()),
        "dot_cuda": torch.ones(2).cuda(),
        "to_str": torch.ones(2).to("cuda"),
        "to_kw": torch.ones(2).to(device=cuda, dtype=torch.float16),
        "pinned": torch.ones(2).pin_memory(),
        "pin_kw": torch.empty(2, pin_memory=True, device="cuda"),
        "module": torch.nn.Linear(2, 2).cuda().weight,
    }
    r["devices"] = {name: t.device.type for name, t in made.items()}
    r["to_kw_dtype"] = str(made["to_kw"].dtype)
    made["zeros_str"].record_stream(torch.cuda.current_stream())
    r["types"] = [
        torch.ones(1).type(),
        torch.ones(1, dtype=torch.bfloat16).type(),
        torch.ones(1, dtype=torch.float16).type(),
        torch.ones(1, dtype=torch.long).type(),
        str(torch.ones(1).type("torch.cuda.HalfTensor").dtype),
        str(torch.ones(1).type(torch.float64).dtype),
    ]

    torch.manual_seed(3)  # must not recurse through manual_seed_all
    state = torch.cuda.get_rng_state()
    first = torch.randn(5, device="cuda")
    torch.cuda.set_rng_state(state)
    r["rng_roundtrip"] = torch.equal(first, torch.randn(5, device="cuda"))
    r["rng_is_cpu_generator"] = torch.equal(torch.cuda.get_rng_state(), torch.get_rng_state())
    torch.cuda.manual_seed(7)
    a = torch.rand(3)
    torch.manual_seed(7)
    r["cuda_seed_is_cpu_seed"] = torch.equal(a, torch.rand(3))

    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        stream.wait_stream(torch.cuda.current_stream())
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    end.record()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    r["cuda_api"] = {
        "is_available": torch.cuda.is_available(),
        "current_device": torch.cuda.current_device(),
        "device_count": torch.cuda.device_count(),
        "memory_allocated": torch.cuda.memory_allocated(),
        "max_memory_allocated": torch.cuda.max_memory_allocated(),
        "capturing": torch.cuda.is_current_stream_capturing(),
        "capability": list(torch.cuda.get_device_capability()),
        "elapsed_ok": end.synchronize() is None and start.elapsed_time(end) >= 0.0,
        "name": torch.cuda.get_device_name(),
    }

    x = torch.randn(4, 3, device="cuda", requires_grad=True)
    (x.to("cuda") * 2).sum().backward()
    r["backward"] = bool(torch.all(x.grad == 2))

    from megatron.core.tensor_parallel import random as tp_random
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    r["hook_patched"] = [
        tp_random._set_cuda_rng_state is emu._set_cpu_rng_state,
        moe_utils.maybe_move_tensor_to_cpu is emu._maybe_move_tensor_to_cpu,
        token_dispatcher.maybe_move_tensor_to_cpu is emu._maybe_move_tensor_to_cpu,
    ]
    splits = moe_utils.maybe_move_tensor_to_cpu(torch.tensor([3, 1]), as_numpy=True)
    r["splits"] = [type(splits).__name__, splits.tolist()]
    torch.manual_seed(11)
    saved = torch.cuda.get_rng_state()
    torch.randn(8)
    tp_random._set_cuda_rng_state(saved)  # upstream defers this forever without CUDA
    r["set_cuda_rng_state_immediate"] = torch.equal(torch.cuda.get_rng_state(), saved)
    _emit(r)


def _scenario_megatron_then_activate() -> None:
    """Fresh process: megatron imported BEFORE activation, activation through the env var."""
    from megatron.core.tensor_parallel import random as tp_random
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    from megatron.rectify.dev import cpu_emulation as emu

    os.environ[emu.ENV_VAR] = "1"
    r = {"from_env": emu.activate_from_env()}
    r["patched"] = [
        tp_random._set_cuda_rng_state is emu._set_cpu_rng_state,
        moe_utils.maybe_move_tensor_to_cpu is emu._maybe_move_tensor_to_cpu,
        token_dispatcher.maybe_move_tensor_to_cpu is emu._maybe_move_tensor_to_cpu,
    ]
    _emit(r)


def _start(scenario: str) -> subprocess.Popen[str]:
    code = f"import sys; sys.path.insert(0, {_TESTS_DIR!r}); import {__name__} as m; m.{scenario}()"
    env = {k: v for k, v in os.environ.items() if k != "MEGATRON_RECTIFY_CPU_EMULATION"}
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.Popen(
        [sys.executable, "-W", "ignore", "-c", code],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _collect(proc: subprocess.Popen[str]) -> dict[str, Any]:
    out, err = proc.communicate(timeout=120)
    lines = [line for line in out.splitlines() if line.startswith(_MARK)]
    assert proc.returncode == 0 and lines, f"scenario failed (rc={proc.returncode}):\n{err}"
    return json.loads(lines[-1][len(_MARK) :])


@pytest.fixture(scope="module")
def scenarios() -> dict[str, dict[str, Any]]:
    procs = {
        name: _start(name)
        for name in ("_scenario_torch_then_megatron", "_scenario_megatron_then_activate")
    }
    return {name.removeprefix("_scenario_"): _collect(proc) for name, proc in procs.items()}


def test_import_has_no_side_effects(scenarios: dict[str, dict[str, Any]]) -> None:
    r = scenarios["torch_then_megatron"]
    assert r["inactive_after_import"]
    assert r["from_env_without_var"] is False


def test_refuses_on_cuda_machine(scenarios: dict[str, dict[str, Any]]) -> None:
    r = scenarios["torch_then_megatron"]
    assert r["refusal"] is not None and "torch.cuda.is_available() is True" in r["refusal"]
    assert r["untouched_after_refusal"]


def test_refusal_check_in_process(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from megatron.rectify.dev import cpu_emulation

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(RuntimeError, match="refuses to activate"):
        cpu_emulation._refuse_if_cuda()


def test_activation_logs_once_and_is_idempotent(scenarios: dict[str, dict[str, Any]]) -> None:
    r = scenarios["torch_then_megatron"]
    assert r["active"]
    assert len(r["log"]) == 1
    level, message = r["log"][0]
    assert level == "WARNING"
    assert "CPU emulation is ACTIVE" in message and "development/CI only" in message


def test_cuda_tensors_land_on_cpu(scenarios: dict[str, dict[str, Any]]) -> None:
    r = scenarios["torch_then_megatron"]
    assert set(r["devices"].values()) == {"cpu"}, r["devices"]
    assert r["to_kw_dtype"] == "torch.float16"
    assert r["backward"]


def test_tensor_type_names_match_megatron(scenarios: dict[str, dict[str, Any]]) -> None:
    assert scenarios["torch_then_megatron"]["types"] == [
        "torch.cuda.FloatTensor",
        "torch.cuda.BFloat16Tensor",
        "torch.cuda.HalfTensor",
        "torch.LongTensor",
        "torch.float16",
        "torch.float64",
    ]


def test_rng_state_round_trips(scenarios: dict[str, dict[str, Any]]) -> None:
    r = scenarios["torch_then_megatron"]
    assert r["rng_roundtrip"]
    assert r["rng_is_cpu_generator"]
    assert r["cuda_seed_is_cpu_seed"]
    assert r["set_cuda_rng_state_immediate"]


def test_cuda_entry_points(scenarios: dict[str, dict[str, Any]]) -> None:
    api = scenarios["torch_then_megatron"]["cuda_api"]
    assert api["is_available"] is False  # megatron's own "no CUDA" branches stay off
    assert api["current_device"] == 0 and api["device_count"] == 1
    assert api["memory_allocated"] == 0 and api["max_memory_allocated"] == 0
    assert api["capturing"] is False and api["elapsed_ok"]
    assert api["capability"] == [8, 0] and "emulation" in api["name"]


def test_megatron_modules_patched_when_imported_after(
    scenarios: dict[str, dict[str, Any]],
) -> None:
    r = scenarios["torch_then_megatron"]
    assert r["hook_patched"] == [True, True, True]
    assert r["splits"] == ["ndarray", [3, 1]]


def test_megatron_modules_patched_when_imported_before(
    scenarios: dict[str, dict[str, Any]],
) -> None:
    r = scenarios["megatron_then_activate"]
    assert r["from_env"] is True
    assert r["patched"] == [True, True, True]
