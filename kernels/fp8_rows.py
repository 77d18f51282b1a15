"""Rowwise float8 casts of 2-D weights, many tensors in one launch: per row of a weight ``w``
[N, K] (fp32), in fp32 arithmetic,

    scale[r] = max(amax(|w[r, :]|), AMAX_FLOOR) / 448
    q[r, :]  = float8_e4m3fn(clamp(w[r, :] / scale[r], -448, 448))      (round to nearest even)

written in place into preallocated ``q`` [N, K] (float8_e4m3fn) and ``scale`` [N] (fp32) buffers,
so that ``q.float() * scale[:, None]`` is ``w`` to float8 precision. 448 is e4m3's largest finite
value. ``AMAX_FLOOR`` (1e-12, torchao's floor for rowwise scales) keeps a zero row finite: its scale
is 1e-12 / 448 and its values 0, never a NaN or an infinity. ``found_inf`` (a device scalar): when
nonzero nothing is written, so a step skipped on the device (``adamw_tail_``) leaves the buffers as
they were without the host reading anything. ``rows_to_fp8`` is the same cast of any tensor's last
dimension (an activation, one scale per token row).

Design: the pointer table of ``adamw_tail.py`` with three pointers per tensor (w, q, scale) and a
block table of (tensor, first row) per program; a program takes ``ROWS`` rows of one tensor and
sweeps them twice in chunks of ``BLOCK_K`` columns (the amax, then the cast and the store), so a row
of any length (ViT-H's reach 5120) takes one program. The tables depend only on the tensors'
addresses and shapes: built once and cached, so a step captured in a CUDA graph launches the same
kernel with the same arguments every time.

The float8 value is made on the bits (round to nearest even, subnormals included) and stored
through a ``uint8`` view: Triton's interpreter converts fp32 to ``tl.float8e4nv`` without carrying
the rounding into the exponent (126.5 becomes 64, not 128) and truncates subnormals, so a hardware
cast could not be checked on the CPU; the bit path is exact in the interpreter and on a GPU alike
(and needs no float8 support from the Triton version).
"""
from __future__ import annotations

from collections import OrderedDict

import torch

from .dispatch import block_rows, interpreting, next_power_of_2, program_table, recall, remember, upload, use_triton

try:
    import triton
    import triton.language as tl
except ImportError:  # the reference covers every use
    triton = None

E4M3_MAX = 448.0  # float8_e4m3fn's largest finite value
AMAX_FLOOR = 1e-12  # the smallest row amax a scale is taken from (a zero row stays finite)
FP8 = torch.float8_e4m3fn


def rows_to_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, scale): ``x`` [..., K] cast to float8_e4m3fn with one fp32 scale per row of its last
    dimension (scale [..., 1]); the arithmetic of ``fp8_rows_``, for any tensor."""
    amax = x.detach().abs().amax(dim=-1, keepdim=True).float()  # exact: the amax of x's own values
    scale = amax.clamp_min(AMAX_FLOOR) / E4M3_MAX
    q = (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(FP8)
    return q, scale


def _check(weights, qs, scales) -> None:
    if not len(weights) == len(qs) == len(scales):
        raise ValueError(f"fp8_rows: {len(weights)} weights, {len(qs)} fp8 buffers, {len(scales)} scale buffers")
    for w, q, s in zip(weights, qs, scales):
        if w.dim() != 2 or w.dtype != torch.float32:
            raise TypeError(f"fp8_rows: weights are 2-D fp32 tensors, not {w.dim()}-D {w.dtype}")
        if q.shape != w.shape or q.dtype != FP8:
            raise ValueError(f"fp8_rows: a float8_e4m3fn buffer of shape {tuple(w.shape)} is needed, "
                             f"not {q.dtype} {tuple(q.shape)}")
        if s.shape != (w.shape[0],) or s.dtype != torch.float32:
            raise ValueError(f"fp8_rows: an fp32 scale buffer of shape ({w.shape[0]},) is needed, "
                             f"not {s.dtype} {tuple(s.shape)}")


def fp8_rows_reference(weights, qs, scales, *, found_inf: torch.Tensor | None = None) -> None:
    """The plain path: ``rows_to_fp8`` of each weight, copied into its buffers (kept, on the device,
    where ``found_inf`` is nonzero)."""
    _check(weights, qs, scales)
    with torch.no_grad():
        for w, q, s in zip(weights, qs, scales):
            new_q, new_s = rows_to_fp8(w)
            if found_inf is None:
                q.copy_(new_q)
                s.copy_(new_s.reshape(-1))
                continue
            keep = found_inf.to(w.device).reshape(()) != 0
            q.view(torch.uint8).copy_(torch.where(keep, q.view(torch.uint8), new_q.view(torch.uint8)))
            s.copy_(torch.where(keep, s, new_s.reshape(-1)))


if triton is not None:

    @triton.jit
    def _e4m3_bits(x):
        """fp32 (|x| <= 448, finite) -> float8_e4m3fn bits, rounded to nearest even."""
        bits = x.to(tl.uint32, bitcast=True)
        sign = (bits >> 24) & 0x80
        mag = bits & 0x7FFFFFFF
        # |x| >= 2**-6 (a normal e4m3): the fp32 mantissa rounded to 3 bits (a carry moves into the
        # exponent), then the exponent rebiased from 127 to 7
        normal = ((mag + 0x7FFFF + ((mag >> 20) & 1)) >> 20) - (120 << 3)
        # |x| < 2**-6: the subnormal's integer m = |x| * 2**9 (0..8; 8 is 2**-6, the bits of the
        # smallest normal), rounded to nearest even from the 24-bit significand
        exp = (mag >> 23).to(tl.int32)
        mant = (mag & 0x7FFFFF) | 0x800000
        shift = tl.minimum(tl.maximum(141 - exp, 1), 31).to(tl.uint32)
        half = (tl.full(mant.shape, 1, tl.uint32) << (shift - 1)) - 1
        sub = (mant + half + ((mant >> shift) & 1)) >> shift
        return (tl.where(exp >= 121, normal, sub) | sign).to(tl.uint8)

    @triton.jit
    def _fp8_rows_kernel(Ptr_table, Meta, Block_tensor, Block_row, Found, amax_floor, fp8_max,
                         HAS_FOUND: tl.constexpr, ROWS: tl.constexpr, BLOCK_K: tl.constexpr):
        pid = tl.program_id(0)
        ti = tl.load(Block_tensor + pid)
        r0 = tl.load(Block_row + pid)
        n_rows = tl.load(Meta + 2 * ti)
        n_cols = tl.load(Meta + 2 * ti + 1)
        if HAS_FOUND:  # a skipped step: no row is read or written
            n_rows = tl.where(tl.load(Found) == 0.0, n_rows, 0)
        rows = r0 + tl.arange(0, ROWS)
        row_mask = rows < n_rows
        row_start = rows.to(tl.int64)[:, None] * n_cols
        w_ptr = tl.load(Ptr_table + 3 * ti).to(tl.pointer_type(tl.float32))
        q_ptr = tl.load(Ptr_table + 3 * ti + 1).to(tl.pointer_type(tl.uint8))
        s_ptr = tl.load(Ptr_table + 3 * ti + 2).to(tl.pointer_type(tl.float32))
        amax = tl.zeros([ROWS], dtype=tl.float32)
        for k0 in range(0, n_cols, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            mask = row_mask[:, None] & (cols < n_cols)[None, :]
            w = tl.load(w_ptr + row_start + cols[None, :], mask=mask, other=0.0)
            amax = tl.maximum(amax, tl.max(tl.abs(w), axis=1))
        scale = tl.div_rn(tl.maximum(amax, amax_floor), fp8_max)
        for k0 in range(0, n_cols, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            mask = row_mask[:, None] & (cols < n_cols)[None, :]
            w = tl.load(w_ptr + row_start + cols[None, :], mask=mask, other=0.0)
            q = tl.minimum(tl.maximum(tl.div_rn(w, scale[:, None]), -fp8_max), fp8_max)
            tl.store(q_ptr + row_start + cols[None, :], _e4m3_bits(q), mask=mask)
        tl.store(s_ptr + rows, scale, mask=row_mask)


_TABLES: OrderedDict = OrderedDict()  # (pointer table, meta, block tables) by addresses and shapes
_TABLES_SIZE = 16
BUILDS = {"tables": 0}  # how many tables were built (tests check that steps reuse them)


def _tables(weights, qs, scales, rows_per_program: int, dev: torch.device):
    """(pointer table, [rows, cols] per tensor, tensor of each program, first row of each program),
    cached by the tensors' addresses and shapes (a model's buffers never move: built once)."""
    ptrs = tuple(x.data_ptr() for triple in zip(weights, qs, scales) for x in triple)
    shapes = tuple(tuple(w.shape) for w in weights)
    key = (str(dev), ptrs, shapes, rows_per_program)
    hit = recall(_TABLES, key)
    if hit is not None:
        return hit
    n_rows = torch.tensor([s[0] for s in shapes], dtype=torch.int64)
    block_tensor, index = program_table((n_rows + rows_per_program - 1) // rows_per_program)
    meta = torch.tensor([v for s in shapes for v in s], dtype=torch.int64)
    BUILDS["tables"] += 1
    return remember(_TABLES, _TABLES_SIZE, key, tuple(upload(t, dev) for t in (
        torch.tensor(ptrs, dtype=torch.int64), meta, block_tensor, (index * rows_per_program).to(torch.int32))))


def fp8_rows_triton(weights, qs, scales, *, found_inf: torch.Tensor | None = None) -> None:
    live = [(w, q, s) for w, q, s in zip(weights, qs, scales) if w.numel()]
    if not live:
        return
    if not all(x.is_contiguous() for triple in live for x in triple):
        raise ValueError("fp8_rows kernel needs contiguous tensors")
    weights, qs, scales = zip(*live)
    dev = weights[0].device
    widest = max(w.shape[1] for w in weights)
    # a GPU: 4 rows of 1024 columns per program; the interpreter: a whole row (up to 4096 columns)
    # and as many rows as fit one block (each program costs about a millisecond there)
    block_k = min(next_power_of_2(widest), 4096) if interpreting() else 1024
    rows = block_rows(4, min(next_power_of_2(max(w.shape[0] for w in weights)), 4096), block_k)
    ptrs, meta, block_tensor, block_row = _tables(weights, [q.view(torch.uint8) for q in qs], scales, rows, dev)
    found = found_inf if found_inf is not None else meta  # never read without HAS_FOUND
    _fp8_rows_kernel[(block_tensor.numel(),)](ptrs, meta, block_tensor, block_row, found, AMAX_FLOOR, E4M3_MAX,
                                              HAS_FOUND=found_inf is not None, ROWS=rows, BLOCK_K=block_k,
                                              num_warps=8)


def fp8_rows_(weights, qs, scales, *, found_inf: torch.Tensor | None = None, backend: str = "auto") -> None:
    """In place, for every 2-D fp32 weight [N, K] of ``weights``: its rowwise float8 cast into
    ``qs`` (float8_e4m3fn [N, K]) and ``scales`` (fp32 [N]), lists aligned by tensor; one launch
    for all of them. ``found_inf``: a device scalar, nonzero to write nothing (no host read)."""
    weights, qs, scales = list(weights), list(qs), list(scales)
    if not weights:
        return
    _check(weights, qs, scales)
    if found_inf is not None:
        found_inf = found_inf.reshape(1).float()
    if not use_triton(backend, *weights, *qs, *scales):
        fp8_rows_reference(weights, qs, scales, found_inf=found_inf)
        return
    with torch.no_grad():
        fp8_rows_triton(weights, qs, scales, found_inf=found_inf)
