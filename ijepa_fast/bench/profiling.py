"""Counting host synchronisations: the places where the host waits for the GPU.

A training step that never reads a device value back keeps the GPU queue full: the host runs
ahead, launching kernels while earlier ones execute. Every read of a device value (``item()``,
``int(t)``, ``tolist()``), every op whose output size depends on the data, and every blocking
copy between host and device drains that queue. ``count_host_syncs`` records each such op with
the source line that called it, on any device, so that a CPU test can prove a code path free of
them::

    with count_host_syncs() as syncs:
        model.loss(images, masks).backward()
    assert syncs.total == 0, syncs.report()

What counts (``SYNC_OPS``; each forces the host to wait for the device on CUDA):

- ``_local_scalar_dense``: ``item()``, ``int()``, ``float()``, ``bool()`` of a tensor (also an
  ``if t:`` or a tensor used as a Python index): the value is copied to the host.
- ``nonzero``, ``masked_select``, ``unique*``, ``unique_consecutive``, ``bincount``, ``histc``
  (without a range), ``repeat_interleave`` without ``output_size``, ``equal``: the size of the
  output (or the result) is only known once the device has computed it.
- ``index``, ``index_put_`` with a boolean mask index: the mask is turned into positions with
  ``nonzero`` inside the op.
- ``tolist()`` and ``numpy()``: the whole tensor is read back (seen at the Python level, since on
  the CPU they call no op).
- a copy from a device to the host (``.cpu()``, ``.to("cpu")``, ``copy_`` into a host tensor):
  the host waits for the data; a blocking copy from the host to a device (``non_blocking=False``)
  also waits for the device's stream to finish it.

On a machine without a GPU, CPU tensors stand in for device ones (``host_tensors``), except in
torch's optimisers, whose step counters stay on the host on a GPU too; on a GPU only ops on device
tensors count. Ops inside registered custom ops (the Triton kernels' wrappers) are seen too.
Nested (jagged) tensors cannot run inside the counter (torch aborts); the other attention
backends can. CUDA-side waits
inside library kernels, ``torch.cuda.synchronize()`` and event waits are not aten ops: on CUDA,
``cuda_debug=True`` also turns on ``torch.cuda.set_sync_debug_mode('warn')`` and counts its
warnings, and ``benchmarks/profile_step.py`` reads the profiler's synchronisation events.
"""
from __future__ import annotations

import os
import traceback
import warnings
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

# aten op (overload packet) -> why it makes the host wait for the device on CUDA
SYNC_OPS = {
    "_local_scalar_dense": "reads one value back (item(), int(), float(), bool() of a tensor)",
    # below autograd (inside custom ops) these composite ops arrive whole, before their decomposition
    "item": "reads one value back",
    "is_nonzero": "reads one value back (bool() of a tensor)",
    "allclose": "returns a Python bool computed on the device",
    "argwhere": "output size is the number of nonzero elements",
    "nonzero": "output size is the number of nonzero elements, known only on the device",
    "masked_select": "output size is the number of True elements",
    "unique": "output size is the number of distinct values",
    "_unique": "output size is the number of distinct values",
    "_unique2": "output size is the number of distinct values",
    "unique_dim": "output size is the number of distinct values",
    "unique_consecutive": "output size is the number of runs",
    "unique_dim_consecutive": "output size is the number of runs",
    "bincount": "output size is the largest value + 1, read back",
    "histc": "without a given range, the minimum and maximum are read back",
    "repeat_interleave": "without output_size, the output size is the sum of the repeats, read back",
    "equal": "returns a Python bool computed on the device",
    "index": "a boolean mask index is turned into positions (nonzero) inside the op",
    "index_put": "a boolean mask index is turned into positions (nonzero) inside the op",
    "_index_put_impl": "a boolean mask index is turned into positions (nonzero) inside the op",
}
COPY_OPS = ("_to_copy", "copy", "_copy_from", "_copy_from_and_resize")
# With CPU tensors standing in for device ones, ops reached through these modules are not counted:
# their tensors stay on the host on a GPU too (the optimisers' step counts, unless fused or capturable).
HOST_STATE_MODULES = ("torch/optim/",)
PYTHON_READS = {"tolist": "reads the whole tensor back", "numpy": "reads the whole tensor back"}
_MASK_INDEX_OPS = ("index", "index_put", "_index_put_impl")
_MODE_MACHINERY = ("torch/_compile.py", "torch/_dynamo/eval_frame.py", "torch/utils/_python_dispatch.py",
                   "torch/overrides.py", "torch/_ops.py")
_HERE = os.path.abspath(__file__)
_TORCH = os.path.dirname(os.path.abspath(torch.__file__))


@dataclass(frozen=True)
class SyncEvent:
    op: str  # the aten op (or tolist / numpy / cuda_sync_warning)
    why: str
    where: str  # file:line (function) of the innermost caller outside torch
    via: str = ""  # the torch module that made the call, if any (torch/optim/adamw.py)


def _caller() -> tuple[str, str]:
    """(file:line (function) of the innermost caller outside torch, the torch module it went through)."""
    via = ""
    for frame in reversed(traceback.extract_stack()[:-2]):
        path = os.path.abspath(frame.filename)
        if path.startswith(_TORCH):  # the outermost torch frame below the caller: the API it called
            rel = os.path.relpath(path, os.path.dirname(_TORCH))
            via = via if rel in _MODE_MACHINERY else rel
            continue
        if path == _HERE or "/triton/" in path or "<frozen" in frame.filename:
            continue
        short = os.path.relpath(path) if not os.path.relpath(path).startswith("..") else path
        return f"{short}:{frame.lineno} ({frame.name})", via
    return "<torch internals>", via


def _on_device(t) -> bool:
    return isinstance(t, torch.Tensor) and t.device.type not in ("cpu", "meta")


def _tensors(args, kwargs):
    for a in list(args) + list(kwargs.values()):
        if isinstance(a, torch.Tensor):
            yield a
        elif isinstance(a, (list, tuple)):
            yield from (x for x in a if isinstance(x, torch.Tensor))


def classify(func, args, kwargs, out, host_tensors: bool = True) -> str | None:
    """Why this aten call makes the host wait for the device on CUDA, or None when it does not.

    ``host_tensors``: count the data-dependent ops on CPU tensors too, as stand-ins for device ones
    (testing on a CPU a path meant for a GPU); False counts only ops on device tensors."""
    name = func._schema.name
    if not name.startswith("aten::"):
        return None
    op = func.overloadpacket.__name__.rstrip("_")
    if op in COPY_OPS:
        return _copy_sync(op, args, kwargs, out)
    if not host_tensors and not any(_on_device(t) for t in _tensors(args, kwargs)):
        return None
    if op in _MASK_INDEX_OPS:
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        if any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or ()):
            return SYNC_OPS[op]
        return None
    if op == "repeat_interleave":
        return None if kwargs.get("output_size") is not None or func._overloadname == "self_int" else SYNC_OPS[op]
    if op == "histc":
        lo, hi = (list(args[2:4]) + [0, 0])[:2]
        return SYNC_OPS[op] if lo == hi else None
    return SYNC_OPS.get(op)


def _copy_sync(op, args, kwargs, out) -> str | None:
    srcs = list(_tensors(args[1:] if op != "_to_copy" else args[:1], {}))
    dst = out if op == "_to_copy" else args[0]
    if not isinstance(dst, torch.Tensor):
        return None
    if any(_on_device(s) for s in srcs) and dst.device.type == "cpu":
        return "copy from the device to the host"
    if _on_device(dst) and any(s.device.type == "cpu" for s in srcs):
        blocking = not kwargs.get("non_blocking", args[2] if op == "copy" and len(args) > 2 else False)
        return "blocking copy from the host to the device" if blocking else None
    return None


def _backend_keys(args, kwargs):
    first = next(_tensors(args, kwargs), None)
    cuda = first is not None and first.is_cuda
    return torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA if cuda else torch._C.DispatchKey.CPU)


class _DispatchCounter(TorchDispatchMode):
    def __init__(self, owner: HostSyncCounter):
        super().__init__()
        self.owner = owner

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        keys = _backend_keys(args, kwargs)
        if func.namespace in ("aten", "prims") or not torch._C._dispatch_has_computed_kernel_for_dispatch_key(
                func.name(), "CUDA" if keys.has(torch._C.DispatchKey.CUDA) else "CPU"):
            out = func(*args, **kwargs)
        else:  # a registered custom op: run its kernel with this mode on, to see the ops inside it
            with self:
                out = func.redispatch(keys, *args, **kwargs)
        if self.owner.python_depth == 0:
            why = classify(func, args, kwargs, out, self.owner.host_tensors)
            if why is not None:
                self.owner.record(func.overloadpacket.__name__, why)
        return out


class _FunctionCounter(TorchFunctionMode):
    def __init__(self, owner: HostSyncCounter):
        super().__init__()
        self.owner = owner

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        counted = bool(args) and (self.owner.host_tensors or _on_device(args[0]))
        if name in PYTHON_READS and counted and self.owner.python_depth == 0:
            self.owner.record(name, PYTHON_READS[name])
            self.owner.python_depth += 1  # its own copy to the host is part of this read
            try:
                return func(*args, **(kwargs or {}))
            finally:
                self.owner.python_depth -= 1
        return func(*args, **(kwargs or {}))


@dataclass
class HostSyncCounter:
    """The host synchronisations recorded inside ``count_host_syncs``."""

    cuda_debug: bool = False
    host_tensors: bool = True
    events: list[SyncEvent] = field(default_factory=list)
    cuda_warnings: list[SyncEvent] = field(default_factory=list)  # torch.cuda's own sync report (cuda_debug)
    python_depth: int = 0

    def record(self, op: str, why: str) -> None:
        where, via = _caller()
        if self.host_tensors and via.startswith(HOST_STATE_MODULES):
            return
        self.events.append(SyncEvent(op, why, where, via))

    @property
    def total(self) -> int:
        return len(self.events)

    def counts(self) -> dict[str, int]:
        """Number of synchronisations per op."""
        return dict(Counter(e.op for e in self.events))

    def by_location(self) -> dict[str, int]:
        """Number of synchronisations per (op, source line)."""
        return dict(Counter(f"{e.op} at {e.where}" + (f" via {e.via}" if e.via else "") for e in self.events))

    def report(self) -> str:
        if not self.events:
            return "no host synchronisations"
        lines = [f"{self.total} host synchronisation(s):"]
        lines += [f"  {n} x {k}" for k, n in sorted(self.by_location().items(), key=lambda kv: -kv[1])]
        return "\n".join(lines)

    # -- the context manager
    def __enter__(self) -> HostSyncCounter:
        self._modes = [_FunctionCounter(self), _DispatchCounter(self)]
        for mode in self._modes:
            mode.__enter__()
        self._debug = None
        if self.cuda_debug and torch.cuda.is_available():
            self._debug = (torch.cuda.get_sync_debug_mode(), warnings.catch_warnings(record=True))
            self._caught = self._debug[1].__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc) -> None:
        if self._debug is not None:
            torch.cuda.set_sync_debug_mode(self._debug[0])
            self._debug[1].__exit__(*exc)
            for w in self._caught:
                if "synchroniz" in str(w.message):
                    self.cuda_warnings.append(SyncEvent("cuda_sync_warning", str(w.message).splitlines()[0],
                                                        f"{os.path.relpath(w.filename)}:{w.lineno}"))
        for mode in reversed(self._modes):
            mode.__exit__(*exc)


def count_host_syncs(*, host_tensors: bool | None = None, cuda_debug: bool = False) -> HostSyncCounter:
    """A context manager recording every host synchronisation inside it (see the module docstring).

    ``host_tensors``: whether data-dependent ops on CPU tensors count too, as stand-ins for device
    tensors; by default only where no CUDA device is present (on a GPU machine, bookkeeping that
    stays on the host is no synchronisation). ``cuda_debug``: on CUDA, also collect
    ``torch.cuda.set_sync_debug_mode('warn')``'s reports in ``cuda_warnings``."""
    if host_tensors is None:
        host_tensors = not torch.cuda.is_available()
    return HostSyncCounter(cuda_debug=cuda_debug, host_tensors=host_tensors)
