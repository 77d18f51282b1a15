"""Fused multi-tensor EMA: ``t = m * t + (1 - m) * s`` for every (target, source) pair, in place.

Arithmetic is fp32 whatever the storage (fp32 targets with bf16 sources, bf16 copies, ...).

Design: a pointer table. The launcher groups the pairs by (target dtype, source dtype, device),
writes each group's data pointers and sizes into a small int64 table plus a block table (which
tensor and which chunk each program handles), and launches one kernel per group (one launch for a
plain fp32 model). Tables are cached by the tensors' addresses and rebuilt only when they move.

The alternative, a persistent flat buffer that the modules' parameters view into, turns the update
into one contiguous stream and saves the tables, but it changes how the model stores its weights:
it conflicts with FSDP's own sharded parameters and with code that re-assigns ``.data``. The table
works on the model's own parameter tensors, and on FSDP's local shards, as they are.
"""
from __future__ import annotations

import torch

from .dispatch import block_rows, use_triton

try:
    import triton
    import triton.language as tl
except ImportError:  # the reference covers every use
    triton = None


def ema_reference(targets: list[torch.Tensor], sources: list[torch.Tensor], momentum: float) -> None:
    """The plain path: ``t * m + (1 - m) * s`` in fp32 (foreach ops where every tensor is fp32)."""
    with torch.no_grad():
        if all(t.dtype == s.dtype == torch.float32 for t, s in zip(targets, sources)):
            torch._foreach_mul_(targets, momentum)
            torch._foreach_add_(targets, sources, alpha=1.0 - momentum)
            return
        for t, s in zip(targets, sources):
            t.copy_(t.float().mul_(momentum).add_(s.float(), alpha=1.0 - momentum))


if triton is not None:

    @triton.jit
    def _ema_kernel(Ptr_table, Size_table, Block_tensor, Block_index, momentum,
                    T_DTYPE: tl.constexpr, S_DTYPE: tl.constexpr, BLOCK_SIZE: tl.constexpr):
        pid = tl.program_id(0)
        ti = tl.load(Block_tensor + pid)
        bi = tl.load(Block_index + pid)
        t_ptr = tl.load(Ptr_table + 2 * ti).to(tl.pointer_type(T_DTYPE))
        s_ptr = tl.load(Ptr_table + 2 * ti + 1).to(tl.pointer_type(S_DTYPE))
        n = tl.load(Size_table + ti)
        offs = bi.to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
        mask = offs < n
        t = tl.load(t_ptr + offs, mask=mask).to(tl.float32)
        s = tl.load(s_ptr + offs, mask=mask).to(tl.float32)
        tl.store(t_ptr + offs, (t * momentum + (1.0 - momentum) * s).to(T_DTYPE), mask=mask)


_TL_DTYPES = {}
_CACHE: dict = {}


def _tl_dtype(dtype: torch.dtype):
    if not _TL_DTYPES:
        _TL_DTYPES.update({torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16})
    if dtype not in _TL_DTYPES:
        raise TypeError(f"EMA kernel: unsupported dtype {dtype}")
    return _TL_DTYPES[dtype]


def _tables(targets, sources, block: int):
    key = (block,) + tuple((t.data_ptr(), s.data_ptr(), t.numel()) for t, s in zip(targets, sources))
    hit = _CACHE.get(key)
    if hit is not None:
        return hit
    dev = targets[0].device
    ptrs = torch.tensor([v for t, s in zip(targets, sources) for v in (t.data_ptr(), s.data_ptr())],
                        dtype=torch.int64)
    sizes = torch.tensor([t.numel() for t in targets], dtype=torch.int64)
    nblocks = (sizes + block - 1) // block
    block_tensor = torch.repeat_interleave(torch.arange(len(targets), dtype=torch.int32), nblocks)
    starts = torch.cumsum(nblocks, 0) - nblocks
    block_index = (torch.arange(int(nblocks.sum()), dtype=torch.int64) - starts.repeat_interleave(nblocks)).int()
    out = tuple(x.to(dev) for x in (ptrs, sizes, block_tensor, block_index))
    if len(_CACHE) > 8:
        _CACHE.clear()
    _CACHE[key] = out
    return out


def ema_triton(targets: list[torch.Tensor], sources: list[torch.Tensor], momentum: float) -> None:
    groups: dict = {}
    for t, s in zip(targets, sources):
        if t.numel() == 0:
            continue
        if not (t.is_contiguous() and s.is_contiguous()):
            raise ValueError("EMA kernel needs contiguous tensors")
        groups.setdefault((t.dtype, s.dtype, t.device), ([], []))
        groups[(t.dtype, s.dtype, t.device)][0].append(t)
        groups[(t.dtype, s.dtype, t.device)][1].append(s)
    block = block_rows(4096, 1 << 20)
    for (td, sd, _), (ts, ss) in groups.items():
        ptrs, sizes, block_tensor, block_index = _tables(ts, ss, block)
        _ema_kernel[(block_tensor.numel(),)](ptrs, sizes, block_tensor, block_index, float(momentum),
                                              T_DTYPE=_tl_dtype(td), S_DTYPE=_tl_dtype(sd), BLOCK_SIZE=block,
                                              num_warps=8)


def _check(targets, sources):
    if len(targets) != len(sources):
        raise ValueError(f"EMA: {len(targets)} targets but {len(sources)} sources")
    for t, s in zip(targets, sources):
        if t.shape != s.shape:
            raise ValueError(f"EMA: target of shape {tuple(t.shape)} paired with source {tuple(s.shape)}")


@torch.library.custom_op("ijepa_fast::ema_update", mutates_args=("targets",))
def _ema_op(targets: list[torch.Tensor], sources: list[torch.Tensor], momentum: float) -> None:
    ema_triton(targets, sources, momentum)


@_ema_op.register_fake
def _(targets, sources, momentum):
    return None


def ema_update_(targets: list[torch.Tensor], sources: list[torch.Tensor], momentum: float,
                backend: str = "auto") -> None:
    """In place: every target <- momentum * target + (1 - momentum) * source (fp32 arithmetic)."""
    targets, sources = list(targets), list(sources)
    _check(targets, sources)
    if not targets:
        return
    with torch.no_grad():
        if use_triton(backend, *targets, *sources):
            _ema_op(targets, sources, float(momentum))
        else:
            ema_reference(targets, sources, float(momentum))
