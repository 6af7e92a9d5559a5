"""Host synchronisations of one MoE layer forward+backward: megatron's ``MoELayer`` / ours.

A host synchronisation is the CPU waiting for the GPU: the call blocks until queued kernels have
run, so the launch queue drains and the next kernels start late. This part counts, per layer
call, how many operations of each layer synchronise and WHERE (``file:function``, the innermost
frame outside torch), for the routing modes ``none`` (megatron's), ``fr``, ``ir`` and ``ir+fr``
(dynamic IR), and ``ir static`` / ``ir+fr static`` (static IR, with
``--moe-rectify-ir-capacity-factor``), with and without padding to capacity, at TP 1 (EP 1
and 2) and at TP = expert-TP 2.

GPU: ``torch.cuda.set_sync_debug_mode("warn")`` reports every synchronising CUDA call the
caching allocator and the kernels know of (device-to-host copies, ``item``, ``nonzero``, ...);
each warning is attributed to its Python call site. Explicit waits (``torch.cuda.synchronize``,
``Stream.synchronize``, ``Event.synchronize``, which megatron's dispatcher uses after its
non-blocking device-to-host copy of the token counts) do not warn and are counted by wrapping
those functions, on GPU and CPU alike.

CPU (the CPU emulation, nothing ever waits): the operations that synchronise when the tensor is
on a GPU are counted instead, by rule. Counted ("syncs on CUDA" below):

* reading device values on the host: ``.item()``, ``.tolist()``, ``.numpy()``, ``.cpu()``,
  ``.to("cpu")`` without ``non_blocking=True``, ``int()`` / ``float()`` / ``bool()`` /
  ``operator.index`` of a tensor (so ``if mask.any():`` counts once, as ``__bool__``),
  ``torch.tensor(...)`` / ``torch.as_tensor(...)`` of a list holding tensors,
  ``torch.equal`` / ``torch.allclose`` / ``is_nonzero`` (they return Python values);
* data-dependent output sizes: ``nonzero`` / ``argwhere`` / one-argument ``torch.where``,
  ``masked_select``, ``unique`` / ``unique_consecutive``, indexing (``x[m]``, ``x[m] = v``)
  with a boolean or uint8 mask, ``repeat_interleave`` with tensor repeats and no
  ``output_size``, and ``bincount`` (always: CUDA's kernel reads ``max()`` on the host even
  when ``minlength`` is given);
* explicit waits (see above).

``Tensor.to`` is judged on the caller's arguments by a wrapper (the CPU emulation rewrites
``.to("cuda")`` into ``.to("cpu")`` before torch sees it), and an op whose innermost caller
outside torch is the emulation (``megatron/rectify/dev/``, e.g. its stand-in for megatron's
non-blocking ``maybe_move_tensor_to_cpu``) is not counted: it is not code that runs on a GPU.

Not counted: everything else (arithmetic, ``topk``, ``sort``, ``scatter``, ``masked_fill``,
``cumsum``, collectives: an all-to-all with host split sizes does not wait by itself, the wait is
the read of the sizes, counted where it happens).

Forward and backward are counted separately because a ``TorchFunctionMode`` does not see the
backward pass (measured: neither the autograd engine's C++ nodes nor a Python
``autograd.Function.backward`` reach it). The forward is counted with a ``TorchFunctionMode``
(the rules above, on the Python API); the backward with a ``TorchDispatchMode`` on the aten ops
the engine runs, with the same rules at that level (``_local_scalar_dense`` = item / int /
bool / float, ``nonzero``, ``index`` / ``index_put`` with a boolean mask, e.g. the gradient of
``x[mask]``, ``masked_select``, ``bincount``, ``unique``, ``repeat_interleave`` without
``output_size``, ``_to_copy`` to the CPU). A backward op is attributed to the innermost Python
frame outside torch (a custom ``autograd.Function.backward``), or to ``autograd engine`` with the
aten op's name when the engine's C++ ran it. Limit of the aten level on CPU: ``.tolist()`` of a
CPU tensor calls no aten op, so a ``.tolist()`` inside a Python backward would be missed there
(there is none in megatron's or our MoE backward today).

Caveat for reading the counts: each counted op is one wait on a GPU, but a wait right after
another one (no kernel queued in between, e.g. ``bincount(...).tolist()`` right after
``nonzero``) costs little; the count is an upper bound of the expensive waits. On CPU the
``.cpu()`` / ``.to("cpu")`` rule cannot tell a tensor that would already be on the host on a
GPU; the call-site column shows which ones those are.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks.perf.common import SEED, device, launched_by_torchrun, on_gpu, reseed
from benchmarks.perf.sweeps import SyncCase

#: Routing modes compared (``none`` is megatron's own layer); a mode ending in
#: :data:`STATIC_SUFFIX` is that ``--moe-rectify`` mode with static IR.
STATIC_SUFFIX = " static"
MODES = ("none", "fr", "ir", "ir+fr", "ir static", "ir+fr static")
#: ``--moe-rectify-ir-capacity-factor`` of the static modes (the count does not depend on it:
#: the IR batch has ``ceil(T * k / E * F)`` rows per local expert whatever the value).
STATIC_IR_CAPACITY_FACTOR = 0.25

_TORCH_DIR = os.path.dirname(torch.__file__)
_THIS_FILE = os.path.abspath(__file__)
_EMULATION_DIR = str(Path(__file__).resolve().parents[2] / "megatron" / "rectify" / "dev")
_REPO = str(Path(__file__).resolve().parents[2])

# ---- the rules --------------------------------------------------------------------------------

#: Python-API names that always synchronise on CUDA.
_ALWAYS = frozenset(
    {
        "item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__",
        "__complex__", "is_nonzero", "nonzero", "argwhere", "masked_select", "unique",
        "unique_consecutive", "bincount", "equal", "allclose",
    }
)  # fmt: skip


def _is_mask(index: Any) -> bool:
    if isinstance(index, torch.Tensor):
        return index.dtype in (torch.bool, torch.uint8)
    if isinstance(index, tuple | list):
        return any(_is_mask(i) for i in index)
    return False


def _holds_tensor(data: Any) -> bool:
    if isinstance(data, torch.Tensor):
        return False  # torch.tensor(tensor) copies on the device
    if isinstance(data, list | tuple):
        return any(isinstance(d, torch.Tensor) or _holds_tensor(d) for d in data)
    return False


def _to_cpu(args: tuple, kwargs: dict) -> bool:
    """``Tensor.to`` towards the host, blocking (the non-blocking copy does not wait)."""
    if kwargs.get("non_blocking") or (len(args) > 2 and args[2] is True):
        return False
    target = kwargs.get("device", args[1] if len(args) > 1 else None)
    if isinstance(target, str | torch.device):
        return torch.device(target).type == "cpu"
    return False


def function_sync_kind(func: Callable, args: tuple, kwargs: dict) -> str | None:
    """The name under which a Python-API call is counted, or None when it does not sync."""
    name = getattr(func, "__name__", "")
    if name in _ALWAYS:
        return name.strip("_")
    if name == "cpu":
        return "cpu"
    if name == "where" and len(args) == 1 and not kwargs:
        return "where(cond)"
    if name in ("__getitem__", "__setitem__") and len(args) > 1 and _is_mask(args[1]):
        return "mask indexing"
    if name == "repeat_interleave" and "output_size" not in kwargs:
        repeats = kwargs.get("repeats", args[1] if len(args) > 1 else args[0] if args else None)
        if isinstance(repeats, torch.Tensor):
            return "repeat_interleave"
    if name in ("tensor", "as_tensor") and args and _holds_tensor(args[0]):
        return "tensor(list of tensors)"
    return None


_ATEN_ALWAYS = {
    "_local_scalar_dense": "item",
    "nonzero": "nonzero",
    "masked_select": "masked_select",
    "bincount": "bincount",
    "_unique": "unique",
    "_unique2": "unique",
    "unique_dim": "unique",
    "unique_consecutive": "unique",
    "equal": "equal",
}


def aten_sync_kind(func: Any, args: tuple, kwargs: dict) -> str | None:
    """The same rules at the aten level (the ops the autograd engine runs in the backward)."""
    name = func._schema.name.split("::")[-1]
    if name in _ATEN_ALWAYS:
        return _ATEN_ALWAYS[name]
    if name in ("index", "index_put", "index_put_", "_index_put_impl_") and len(args) > 1:
        return "mask indexing" if _is_mask(args[1]) else None
    if name == "repeat_interleave" and func._overloadname == "Tensor":
        return None if kwargs.get("output_size") is not None else "repeat_interleave"
    if name == "_to_copy" and not kwargs.get("non_blocking", False):
        target = kwargs.get("device")
        if target is not None and torch.device(target).type == "cpu" and on_gpu():
            return "to(cpu)"
    return None


# ---- attribution ------------------------------------------------------------------------------


def _short(filename: str) -> str:
    for marker in ("site-packages" + os.sep, _REPO + os.sep):
        if marker in filename:
            return filename.split(marker, 1)[1]
    return filename


def owner(site: str) -> str:
    """Whose code a call site is: ``megatron`` (megatron-core), ``rectify`` (ours), else other."""
    if site.startswith("megatron/core/"):
        return "megatron"
    if site.startswith("megatron/rectify/"):
        return "rectify"
    return "other"


def call_site() -> str:
    """``file:function`` of the innermost caller outside torch, below this module's hooks;
    ``autograd engine`` when that caller is this module's ``backward()`` call (the engine's
    C++ ran the op, not a Python ``autograd.Function``)."""
    frame = sys._getframe(1)
    while frame is not None and os.path.abspath(frame.f_code.co_filename) == _THIS_FILE:
        frame = frame.f_back
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_TORCH_DIR):
        frame = frame.f_back
    if frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_EMULATION_DIR):
        return ""  # the CPU emulation's stand-in code, not megatron's or ours: not counted
    if frame is None or os.path.abspath(frame.f_code.co_filename) == _THIS_FILE:
        return "autograd engine"
    return f"{_short(frame.f_code.co_filename)}:{frame.f_code.co_qualname}"


# ---- the counter ------------------------------------------------------------------------------


class _ForwardMode(TorchFunctionMode):
    def __init__(self, record: Callable[[str, str], None]) -> None:
        super().__init__()
        self._record = record

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        kind = function_sync_kind(func, args, kwargs)
        if kind is not None:
            self._record(kind, call_site())
        return func(*args, **kwargs)


class _BackwardMode(TorchDispatchMode):
    def __init__(self, record: Callable[[str, str], None]) -> None:
        super().__init__()
        self._record = record

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        kind = aten_sync_kind(func, args, kwargs)
        if kind is not None:
            site = call_site()
            if site == "autograd engine":
                site = f"autograd engine ({func._schema.name.split('::')[-1]})"
            self._record(kind, site)
        return func(*args, **kwargs)


class SyncCounter:
    """Counts host synchronisations (module docstring), per phase, kind and call site.

    ``with counter.phase("forward"): ...`` counts with the forward (Python-API) rules,
    ``phase("backward")`` with the aten-level ones; on a GPU both use
    ``torch.cuda.set_sync_debug_mode``. ``counts`` maps ``(phase, site, kind)`` to a count.
    """

    def __init__(self, use_cuda_debug_mode: bool | None = None) -> None:
        self.cuda = on_gpu() if use_cuda_debug_mode is None else use_cuda_debug_mode
        self.counts: collections.Counter[tuple[str, str, str]] = collections.Counter()
        self._phase = "forward"

    def _record(self, kind: str, site: str) -> None:
        if not site:
            return
        self.counts[(self._phase, site, kind)] += 1

    def total(self, phase: str | None = None, who: str | None = None) -> int:
        return sum(
            n
            for (p, site, _), n in self.counts.items()
            if (phase is None or p == phase) and (who is None or owner(site) == who)
        )

    def by_site(self) -> list[dict[str, Any]]:
        return [
            {"phase": p, "site": site, "owner": owner(site), "kind": kind, "count": n}
            for (p, site, kind), n in sorted(self.counts.items())
        ]

    @contextmanager
    def phase(self, name: str) -> Iterator[SyncCounter]:
        self._phase = name
        with self._explicit_waits():
            if self.cuda:
                with self._cuda_debug_mode():
                    yield self
            else:
                mode = _ForwardMode(self._record) if name == "forward" else None
                mode = mode or _BackwardMode(self._record)
                with mode:
                    yield self

    @contextmanager
    def _explicit_waits(self) -> Iterator[None]:
        """Wrap ``torch.cuda.synchronize`` and ``Stream`` / ``Event.synchronize`` (the CPU
        emulation's stand-ins too): explicit waits that the debug mode does not report."""
        targets = [(torch.cuda, "synchronize")]
        targets += [(cls, "synchronize") for cls in {torch.cuda.Stream, torch.cuda.Event}]
        if not self.cuda:
            targets.append((torch.Tensor, "to"))
        saved = [(owner_, name, getattr(owner_, name)) for owner_, name in targets]

        depth = [0]  # the emulation's ``to`` re-enters ``Tensor.to``: judge the outer call

        def wrap(name: str, original: Callable) -> Callable:
            def waiting(*args: Any, **kwargs: Any) -> Any:
                if name == "synchronize":
                    self._record("synchronize", call_site())
                    return original(*args, **kwargs)
                if depth[0] == 0 and _to_cpu(args, kwargs):  # the caller's arguments
                    self._record("to(cpu)", call_site())
                depth[0] += 1
                try:
                    return original(*args, **kwargs)
                finally:
                    depth[0] -= 1

            return waiting

        try:
            for owner_, name, original in saved:
                setattr(owner_, name, wrap(name, original))
            yield
        finally:
            for owner_, name, original in saved:
                setattr(owner_, name, original)

    @contextmanager
    def _cuda_debug_mode(self) -> Iterator[None]:  # pragma: no cover - needs a GPU
        """Every synchronising CUDA call warns; each warning is recorded at its call site."""
        previous = torch.cuda.get_sync_debug_mode()
        original_show = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if "synchronizing" in str(message):
                self._record("cuda sync", call_site())
            else:
                original_show(message, category, filename, lineno, file, line)

        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = show
            torch.cuda.set_sync_debug_mode("warn")
            try:
                yield
            finally:
                torch.cuda.set_sync_debug_mode(previous)
                warnings.showwarning = original_show


# ---- the measurement --------------------------------------------------------------------------


def _layer_case(case: SyncCase):
    from benchmarks.perf.sweeps import LayerCase

    fields = {f.name for f in dataclasses.fields(LayerCase)}
    return LayerCase(**{k: v for k, v in dataclasses.asdict(case).items() if k in fields})


def build(case: SyncCase, mode: str, state: dict[str, torch.Tensor] | None = None):
    """The layer of :mod:`.layer` in ``mode`` (one of :data:`MODES`), with tensor =
    expert-tensor parallelism ``case.tp`` (sequence parallel when > 1)."""
    from benchmarks.perf.layer import layer_config, layer_spec

    rectify_mode = mode.removesuffix(STATIC_SUFFIX)
    config = layer_config(_layer_case(case), rectify_mode)
    fields: dict[str, Any] = {}
    if rectify_mode != mode:
        fields["moe_rectify_ir_capacity_factor"] = STATIC_IR_CAPACITY_FACTOR
    if case.tp > 1:
        fields.update(
            tensor_model_parallel_size=case.tp,
            expert_tensor_parallel_size=case.tp,
            sequence_parallel=True,
        )
    if fields:
        config = dataclasses.replace(config, **fields)
    spec = layer_spec(rectify_mode, case.experts)
    layer = spec.submodules.mlp(config=config, layer_number=1)
    layer = layer.to(device())
    if state is not None:
        layer.load_state_dict(state)
    return layer.train()


def count_layer(layer: torch.nn.Module, x: torch.Tensor, upstream: torch.Tensor) -> SyncCounter:
    """One forward+backward of ``layer`` under a :class:`SyncCounter`."""
    counter = SyncCounter()
    x = x.detach().requires_grad_()
    with counter.phase("forward"):
        output, _ = layer(x)
        loss = (output * upstream).sum()
    with counter.phase("backward"):
        _backward(loss)
    return counter


def _backward(loss: torch.Tensor) -> None:
    loss.backward()


def count_case(case: SyncCase, warmup: int = 1) -> dict[str, Any]:
    """Every mode on the same weights and tokens (this rank's view); the count is taken on the
    call after ``warmup`` uncounted ones (first calls may set up buffers)."""
    from benchmarks.perf.layer import rank_inputs

    reseed()
    x, upstream = rank_inputs(_layer_case(case))
    row: dict[str, Any] = {**dataclasses.asdict(case), "modes": {}}
    state = None
    for mode in MODES:
        layer = build(case, mode, state)
        state = state or layer.state_dict()
        for _ in range(warmup):
            count_layer(layer, x, upstream)
        counter = count_layer(layer, x, upstream)
        row["modes"][mode] = {
            "forward": counter.total("forward"),
            "backward": counter.total("backward"),
            "total": counter.total(),
            "megatron": counter.total(who="megatron"),
            "rectify": counter.total(who="rectify"),
            "sites": counter.by_site(),
        }
    return row


def _rank_body(rank: int, world_size: int, cases: list[SyncCase]) -> list[dict[str, Any]]:
    return [count_case(case) for case in cases]


def _launch(tp: int, ep: int, cases: list[SyncCase]) -> list[list[dict[str, Any]]]:
    if launched_by_torchrun():
        from benchmarks.perf.common import launch

        return launch(_rank_body, ep, cases=cases)
    from megatron.rectify.dev.multiprocess import run_distributed

    return run_distributed(
        _rank_body,
        tp * ep,
        tensor_model_parallel_size=tp,
        expert_model_parallel_size=ep,
        expert_tensor_parallel_size=tp,
        timeout_s=1800.0,
        seed=SEED,
        cases=cases,
    )


def run(cases: list[SyncCase]) -> list[dict[str, Any]]:
    """Every case, one launch per (TP, EP); rank 0's counts (the ranks run the same code; the
    per-rank maximum of each mode's total is added as ``max_over_ranks``)."""
    rows = []
    for tp, ep in sorted({(c.tp, c.ep) for c in cases}):
        group = [c for c in cases if (c.tp, c.ep) == (tp, ep)]
        if launched_by_torchrun() and tp > 1:
            continue  # the torchrun launcher re-initialises EP only
        per_rank = _launch(tp, ep, group)
        for index, row in enumerate(per_rank[0]):
            for mode, counts in row["modes"].items():
                counts["max_over_ranks"] = max(r[index]["modes"][mode]["total"] for r in per_rank)
            rows.append(row)
    return rows
