"""The whole training step as CUDA graphs, one per token bucket (``perf.cuda_graphs``).

A step is graph-ready when everything it launches is the same from step to step except the
contents of device memory: the fused tail reads lr, weight decay and EMA momentum from device
tensors (``FusedTail(device_hyper=True)``, written by ``FusedTail.stage`` before each step), the
gradients it reads are kept from step to step (``FusedTail.zero_grad``), finiteness is decided on
the device (the deferred step: nothing is read back), and token buckets give each batch one of a
few fixed shapes. ``StepGraphs`` then records the step once per shape (``torch.cuda.CUDAGraph``)
and replays it: the batch's images and masks are copied into the graph's own input tensors, and
the graph's outputs (loss, gradient norm, skip flag) are copied out, since the next replay
overwrites them.

Capturing runs the step eagerly twice on a side stream first (gradients allocated, kernels
compiled and tuned) and then once under capture; all three with the ``halt`` flag set, so the
tail writes nothing (the weights, moments and step counts are unchanged; the gradients are
zeroed after each). On a device other than CUDA ``StepGraphs.run`` calls the step directly: the
same graph-ready code, which the CPU tests check for equal results, no new gradient storage and
no host synchronisation.
"""
from __future__ import annotations

import dataclasses

import torch


def _copy_into(dst, src) -> None:
    """Copy a batch structure (tensors inside NamedTuples / dataclasses) into one of the same shapes."""
    if isinstance(dst, torch.Tensor):
        if not isinstance(src, torch.Tensor) or src.shape != dst.shape:
            raise ValueError(f"a CUDA-graph step's batch differs from its captured shape: "
                             f"{getattr(src, 'shape', src)} != {tuple(dst.shape)}")
        dst.copy_(src, non_blocking=True)
    elif dataclasses.is_dataclass(dst):
        for f in dataclasses.fields(dst):
            _copy_into(getattr(dst, f.name), getattr(src, f.name))
    elif isinstance(dst, tuple):
        for a, b in zip(dst, src):
            _copy_into(a, b)
    elif dst != src:
        raise ValueError(f"a CUDA-graph step's batch differs from its captured shape: {dst!r} != {src!r}")


def _clone(x):
    if isinstance(x, torch.Tensor):
        return x.clone()
    if dataclasses.is_dataclass(x):
        return dataclasses.replace(x, **{f.name: _clone(getattr(x, f.name)) for f in dataclasses.fields(x)})
    if isinstance(x, tuple):
        items = [_clone(v) for v in x]
        return type(x)(*items) if hasattr(x, "_fields") else type(x)(items)
    return x


class StepGraphs:
    """One captured step per shape key on CUDA; elsewhere the step itself. ``halt``: the deferred
    step's device flag (set while capturing, so capture changes no weight)."""

    WARM_RUNS = 2  # eager runs on a side stream before capture

    def __init__(self, device: torch.device, halt: torch.Tensor | None):
        self.device = torch.device(device)
        self.halt = halt
        self.graphs: dict = {}
        self.pool = None

    @property
    def capturing(self) -> bool:
        return self.device.type == "cuda"

    def capture(self, key, images: torch.Tensor, masks, fn) -> None:
        """Record ``fn(images, masks)`` (a tuple of device tensors) for ``key``; on CUDA only."""
        if not self.capturing or key in self.graphs:
            return
        if self.halt is None:
            raise ValueError("capturing a step as a CUDA graph needs the deferred step's halt flag")
        static_images, static_masks = images.clone(), _clone(masks)
        saved = self.halt.clone()
        self.halt.fill_(1.0)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(self.WARM_RUNS):
                fn(static_images, static_masks)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            outputs = fn(static_images, static_masks)
        if self.pool is None:
            self.pool = graph.pool()  # every bucket's graph shares one memory pool
        self.halt.copy_(saved)
        self.graphs[key] = (graph, static_images, static_masks, outputs)

    def run(self, key, images: torch.Tensor, masks, fn):
        """``fn(images, masks)``'s outputs: replayed from the captured graph of ``key`` on CUDA
        (captured first when new), called directly elsewhere."""
        if not self.capturing:
            return fn(images, masks)
        if key not in self.graphs:
            self.capture(key, images, masks, fn)
        graph, static_images, static_masks, outputs = self.graphs[key]
        static_images.copy_(images, non_blocking=True)
        _copy_into(static_masks, masks)
        graph.replay()
        return tuple(o.clone() for o in outputs)
