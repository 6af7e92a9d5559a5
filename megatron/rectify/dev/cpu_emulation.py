"""CPU emulation of the bits of CUDA that megatron-core touches (TEST / DEVELOPMENT ONLY).

megatron-core is written for CUDA: it asks ``torch.cuda`` for the current device, streams, events
and RNG state, and creates tensors with ``device=torch.cuda.current_device()``. This module lets
the *real* megatron code paths (``MoELayer``, ``GPTModel`` with TP/PP/EP, DDP, the optimizers)
run on a CPU-only machine with the gloo backend, so CI and developers without GPUs exercise them.

Rules:

* It is never imported on a machine with CUDA and :func:`activate` refuses to run there.
* Nothing happens on import; :func:`activate` (or :func:`activate_from_env` with
  ``MEGATRON_RECTIFY_CPU_EMULATION=1``) patches, and says so once in the log.
* It may be activated before or after megatron-core is imported.
* Real GPU runs remain the judge of GPU behaviour.

Why explicit patches rather than a ``TorchFunctionMode`` that rewrites devices: PyTorch leaves
the mode while running ``backward``, so backward-pass collectives still asked for CUDA.

What is patched, and why:

* ``torch.cuda`` device / memory / stream / event / property entry points: megatron calls them
  unconditionally (``current_device()`` as a device argument, ``synchronize()``, streams for
  overlapped copies, events for timing). ``is_available()`` stays False so that megatron's own
  "no CUDA" branches (straggler detector, fused kernels) stay off, and ``is_initialized()``
  stays False so that torch keeps queueing (never running) its lazy CUDA callbacks;
  ``device_count()`` is 1. Each stub is a distinct function object: ``torch._dynamo`` (imported
  by megatron's ``jit_fuser``) rejects one object registered under several ``torch.cuda`` names.
* CUDA RNG (``get_rng_state`` / ``set_rng_state`` / ``manual_seed``) maps to the CPU default
  generator, because emulated "CUDA" tensors are CPU tensors drawing from that generator.
  ``manual_seed_all`` is left alone: ``torch.manual_seed`` calls it (infinite recursion).
* Tensor factories, ``Tensor.new_*``, ``Tensor.to`` / ``Tensor.cuda`` / ``Module.cuda`` /
  ``pin_memory`` / ``record_stream``: a ``cuda`` (or integer) device becomes ``cpu``.
* ``Tensor.type()``: megatron asserts ``'torch.cuda.FloatTensor'`` in grad clipping and branches
  on it in the optimizers, so floating CPU tensors report their ``torch.cuda.*`` type name.
* ``tensor_parallel.random._set_cuda_rng_state`` defers through ``torch.cuda._lazy_call``, which
  never runs without CUDA (data-parallel replicas then silently initialise differently): it is
  replaced by an immediate CPU-generator set. The ``fork()`` warning "CPU RNG state changed within
  GPU RNG context" is expected by construction (one shared generator) and is filtered.
* ``moe_utils.maybe_move_tensor_to_cpu`` only converts CUDA tensors, so all-to-all split sizes
  stayed tensors and gloo's ``all_to_all_single`` raised ``TypeError``: CPU tensors are converted
  the same way (to numpy when asked).
* ``torch.distributed.all_gather`` into tensors of different first-dimension sizes: NCCL does
  it (megatron's alltoall dispatcher gathers the tokens received by each TP rank this way, with
  expert TP > 1 and no padding), gloo refuses ("invalid tensor size"). Gloo gets every rank's
  rows padded to the longest and trimmed after, the same values NCCL gathers.
* ``CUDA_DEVICE_MAX_CONNECTIONS=1`` is set if unset: megatron asserts it for TP > 1.

Later megatron imports are patched by a ``sys.meta_path`` hook; already-imported ones directly.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import logging
import os
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from types import ModuleType, SimpleNamespace
from typing import Any

import torch

from megatron.rectify.dev.mode import CPU_EMULATION_ENV

__all__ = ["ENV_VAR", "activate", "activate_from_env", "is_active"]

ENV_VAR = CPU_EMULATION_ENV  # "MEGATRON_RECTIFY_CPU_EMULATION", see dev.mode
_LOG = logging.getLogger("megatron.rectify")
_ACTIVE = False
_CPU = torch.device("cpu")

_FACTORIES = (
    "empty", "zeros", "ones", "full", "rand", "randn", "randint", "randperm", "arange", "range",
    "linspace", "logspace", "eye", "tensor", "as_tensor", "empty_strided", "empty_like",
    "zeros_like", "ones_like", "full_like", "rand_like", "randn_like", "randint_like",
)  # fmt: skip
_NEW_METHODS = ("new_empty", "new_zeros", "new_ones", "new_full", "new_tensor", "new_empty_strided")
_ZERO_STATS = ("memory_allocated", "max_memory_allocated", "memory_reserved", "max_memory_reserved")
_NO_OPS = (
    "set_device", "synchronize", "empty_cache", "ipc_collect", "set_stream",
    "reset_peak_memory_stats", "reset_max_memory_allocated",
)  # fmt: skip


def is_active() -> bool:
    """Whether :func:`activate` has patched this process."""
    return _ACTIVE


def activate_from_env() -> bool:
    """Activate when ``MEGATRON_RECTIFY_CPU_EMULATION=1``; returns whether emulation is active."""
    if os.environ.get(ENV_VAR, "").strip() == "1":
        activate()
    return _ACTIVE


def _refuse_if_cuda() -> None:
    """Raise if a real GPU is usable: the emulation must never shadow CUDA."""
    if torch.cuda.is_available():
        raise RuntimeError(
            "megatron-rectify CPU emulation refuses to activate: torch.cuda.is_available() is "
            "True. The emulation is for CPU-only development/CI machines; use the real GPU."
        )


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, bool):
        return False
    if isinstance(device, int):  # megatron passes torch.cuda.current_device() (an int)
        return True
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, torch.device) and device.type == "cuda"


def _cpu_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    if _is_cuda_device(kwargs.get("device")):
        kwargs["device"] = _CPU
    if kwargs.get("pin_memory"):
        kwargs["pin_memory"] = False
    return kwargs


def _redirect(fn: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return fn(*args, **_cpu_kwargs(kwargs))

    wrapper.__wrapped__ = fn  # type: ignore[attr-defined]
    wrapper.__name__ = getattr(fn, "__name__", "factory")
    wrapper.__doc__ = fn.__doc__
    return wrapper


# --------------------------------------------------------------------------- torch.cuda stand-ins
class _Stream:
    """CPU stand-in for ``torch.cuda.Stream``: work is synchronous, so every wait is a no-op."""

    def __init__(self, device: Any = None, priority: int = 0, **_: Any) -> None:
        self.device = _CPU
        self.priority = priority

    def wait_stream(self, stream: Any) -> None: ...
    def wait_event(self, event: Any) -> None: ...
    def synchronize(self) -> None: ...

    def query(self) -> bool:
        return True

    def record_event(self, event: _Event | None = None) -> _Event:
        event = event if event is not None else _Event()
        event.record(self)
        return event

    @staticmethod
    def priority_range() -> tuple[int, int]:
        return (0, -1)

    def __enter__(self) -> _Stream:
        return self

    def __exit__(self, *exc: object) -> None: ...


class _Event:
    """CPU stand-in for ``torch.cuda.Event``; ``elapsed_time`` measures wall-clock time."""

    def __init__(self, enable_timing: bool = False, blocking: bool = False, **_: Any) -> None:
        self._t: float | None = None

    def record(self, stream: Any = None) -> None:
        self._t = time.perf_counter()

    def wait(self, stream: Any = None) -> None: ...
    def synchronize(self) -> None: ...

    def query(self) -> bool:
        return True

    def elapsed_time(self, end: _Event) -> float:
        return ((end._t or 0.0) - (self._t or 0.0)) * 1000.0


class _DeviceContext(contextlib.nullcontext):
    """``torch.cuda.device(i)`` as a no-op context (there is a single emulated device)."""

    def __init__(self, device: Any = None) -> None:
        super().__init__()
        self.idx = 0


_DEFAULT_STREAM = _Stream()
_PROPERTIES = SimpleNamespace(
    name="CPU (megatron-rectify emulation)", major=8, minor=0, multi_processor_count=os.cpu_count(),
    total_memory=os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
)  # fmt: skip


def _cpu_rng_state(device: Any = "cuda") -> torch.Tensor:
    return torch.get_rng_state()


def _set_cpu_rng_state(new_state: torch.Tensor, device: Any = "cuda", **_: Any) -> None:
    torch.set_rng_state(new_state.cpu() if new_state.device.type != "cpu" else new_state)


def _cpu_manual_seed(seed: int) -> None:
    torch.default_generator.manual_seed(int(seed))


def _const(name: str, value: Any = None) -> Callable[..., Any]:
    """A fresh function returning ``value``: torch._dynamo's trace rules reject one function
    object registered under several ``torch.cuda`` names."""

    def stub(*args: Any, **kwargs: Any) -> Any:
        return value() if callable(value) else value

    stub.__name__ = stub.__qualname__ = name
    return stub


def _patch_torch_cuda() -> None:
    cuda = torch.cuda
    stubs: dict[str, Any] = {
        "Stream": _Stream, "Event": _Event, "device": _DeviceContext,
        "current_device": _const("current_device", 0), "device_count": _const("device_count", 1),
        "is_current_stream_capturing": _const("is_current_stream_capturing", False),
        "memory_stats": _const("memory_stats", lambda: defaultdict(int)),
        "mem_get_info": _const("mem_get_info", (_PROPERTIES.total_memory,) * 2),
        "current_stream": _const("current_stream", _DEFAULT_STREAM),
        "default_stream": _const("default_stream", _DEFAULT_STREAM),
        "stream": lambda stream=None: contextlib.nullcontext(stream),
        "get_device_properties": _const("get_device_properties", _PROPERTIES),
        "get_device_capability": _const("get_device_capability", (_PROPERTIES.major, 0)),
        "get_device_name": _const("get_device_name", _PROPERTIES.name),
        "get_rng_state": _cpu_rng_state, "set_rng_state": _set_cpu_rng_state,
        "manual_seed": _cpu_manual_seed,
    }  # fmt: skip
    for name in _ZERO_STATS:
        stubs[name] = _const(name, 0)
    for name in _NO_OPS:
        stubs[name] = _const(name)
    for name, value in stubs.items():
        setattr(cuda, name, value)
    for name in ("get_rng_state", "set_rng_state", "manual_seed"):
        setattr(cuda.random, name, stubs[name])  # torch.cuda.random.get_rng_state is used too
    for name in ("range_push", "range_pop", "mark"):
        setattr(cuda.nvtx, name, _const(name))
    cuda.nvtx.range = lambda *args, **kwargs: contextlib.nullcontext()


def _patch_tensors() -> None:
    for name in _FACTORIES:
        setattr(torch, name, _redirect(getattr(torch, name)))
    for name in _NEW_METHODS:
        setattr(torch.Tensor, name, _redirect(getattr(torch.Tensor, name)))

    tensor_to, tensor_type = torch.Tensor.to, torch.Tensor.type

    def to(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args and _is_cuda_device(args[0]):
            args = (_CPU, *args[1:])
        return tensor_to(self, *args, **_cpu_kwargs(kwargs))

    def cuda(
        self: torch.Tensor,
        device: Any = None,
        non_blocking: bool = False,
        memory_format: torch.memory_format = torch.preserve_format,
    ) -> torch.Tensor:
        return tensor_to(self, _CPU, non_blocking=non_blocking, memory_format=memory_format)

    def type_(
        self: torch.Tensor, dtype: Any = None, non_blocking: bool = False, **kwargs: Any
    ) -> Any:
        if dtype is None:
            name = tensor_type(self)
            return name.replace("torch.", "torch.cuda.", 1) if self.is_floating_point() else name
        if isinstance(dtype, str):
            dtype = dtype.replace("torch.cuda.", "torch.", 1)
        return tensor_type(self, dtype, non_blocking, **kwargs)

    torch.Tensor.to = to  # type: ignore[method-assign]
    torch.Tensor.cuda = cuda  # type: ignore[method-assign]
    torch.Tensor.type = type_  # type: ignore[method-assign,assignment]
    torch.Tensor.pin_memory = lambda self, *a, **k: self  # type: ignore[method-assign]
    torch.Tensor.record_stream = _const("record_stream")  # type: ignore[method-assign,assignment]
    torch.nn.Module.cuda = lambda self, device=None: self  # type: ignore[method-assign]


# ----------------------------------------------------------------- patches of megatron modules
def _patch_tp_random(module: ModuleType) -> None:
    module._set_cuda_rng_state = _set_cpu_rng_state  # upstream's _lazy_call never runs
    logging.getLogger(module.__name__).addFilter(
        lambda record: "CPU RNG state changed within GPU RNG context" not in record.getMessage()
    )


def _maybe_move_tensor_to_cpu(
    tensor: Any, as_numpy: bool = False, record_stream: bool = False
) -> Any:
    """``moe_utils.maybe_move_tensor_to_cpu`` that also converts (already) CPU tensors."""
    if torch.is_tensor(tensor):
        tensor = tensor.to(_CPU)
        if as_numpy:
            return tensor.numpy()
    return tensor


def _patch_moe_utils(module: ModuleType) -> None:
    original = module.maybe_move_tensor_to_cpu
    module.maybe_move_tensor_to_cpu = _maybe_move_tensor_to_cpu
    for other in list(sys.modules.values()):  # modules that imported it by name
        if getattr(other, "maybe_move_tensor_to_cpu", None) is original:
            other.maybe_move_tensor_to_cpu = _maybe_move_tensor_to_cpu


_MODULE_PATCHES: dict[str, Callable[[ModuleType], None]] = {
    "megatron.core.tensor_parallel.random": _patch_tp_random,
    "megatron.core.transformer.moe.moe_utils": _patch_moe_utils,
}


class _PatchingLoader(importlib.abc.Loader):
    """Runs the real loader, then the module's patch (for modules imported after activate())."""

    def __init__(self, loader: importlib.abc.Loader, patch: Callable[[ModuleType], None]) -> None:
        self._loader, self._patch = loader, patch

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        self._patch(module)


class _PostImportHook(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        patch = _MODULE_PATCHES.get(fullname)
        if patch is None:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _PatchingLoader(spec.loader, patch)
        return spec


def _iter_loaded_megatron_modules() -> Iterator[tuple[ModuleType, Callable[[ModuleType], None]]]:
    for name, patch in _MODULE_PATCHES.items():
        module = sys.modules.get(name)
        if module is not None:
            yield module, patch


def _patch_uneven_all_gather() -> None:
    """Let gloo's ``all_gather`` fill output tensors whose first dimensions differ (see the
    module docstring); equal sizes and asynchronous calls go to torch's own function."""
    import torch.distributed as dist

    original = dist.all_gather
    if getattr(original, "rectify_uneven", False):
        return

    def all_gather(tensor_list: list, tensor: torch.Tensor, group: Any = None, async_op=False):
        rows = {t.shape[0] for t in tensor_list}
        trailing = {tuple(t.shape[1:]) for t in [*tensor_list, tensor]}
        if len(rows) <= 1 or async_op or len(trailing) != 1:
            return original(tensor_list, tensor, group=group, async_op=async_op)
        padded = tensor.new_zeros((max(rows), *tensor.shape[1:]))
        padded[: tensor.shape[0]] = tensor
        gathered = [torch.empty_like(padded) for _ in tensor_list]
        original(gathered, padded, group=group)
        for output, full in zip(tensor_list, gathered, strict=True):
            output.copy_(full[: output.shape[0]])
        return None

    all_gather.rectify_uneven = True  # type: ignore[attr-defined]
    all_gather.__wrapped__ = original  # type: ignore[attr-defined]
    dist.all_gather = all_gather


def activate() -> None:
    """Redirect ``torch.cuda`` to the CPU for this process (idempotent; refuses on CUDA)."""
    global _ACTIVE
    if _ACTIVE:
        return
    _refuse_if_cuda()
    _patch_torch_cuda()
    _patch_tensors()
    _patch_uneven_all_gather()
    for module, patch in _iter_loaded_megatron_modules():
        patch(module)
    sys.meta_path.insert(0, _PostImportHook())
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")  # megatron asserts it for TP > 1
    _ACTIVE = True
    _LOG.warning(
        "megatron-rectify CPU emulation is ACTIVE: torch.cuda is redirected to CPU "
        "(development/CI only)"
    )
