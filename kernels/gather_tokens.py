"""Masked-token selection with the positional add: ``out = x[b, idx] + pos[idx]``, and its backward.

Padded layout: ``idx`` is [R, L]; row ``r`` selects from image ``r % B`` (so M stacked index sets
of a batch of B images form R = M * B rows); ``lens`` [R], optional, marks positions ``j >= lens[r]``
as padding (zero output, no gradient). Packed layout: ``idx`` is [T] and int32 ``cu_seqlens``
[R + 1] delimits the rows (sequence s selects from image ``s % B``).

The output has ``x``'s dtype promoted with ``pos``'s, as ``x + pos`` would (a bf16 ``x`` with
the fp32 table gives fp32, as in the reference).

Backward: the gradient of ``x`` is a scatter-add of the output gradient. By default it uses
fp32 atomics; ``deterministic=True`` sorts the destinations once and sums each destination's sources
in a fixed order, so the result is bit-identical from run to run. ``pos`` is a fixed table here
(the I-JEPA sin-cos tables are frozen) and gets no gradient.
"""
from __future__ import annotations

import torch

from .dispatch import token_blocks, use_triton

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None


def _row_ids(idx, cu_seqlens):
    """The sequence of every packed token; ``output_size`` (the token count, known from idx's
    shape) spares the device a read-back of the lengths' sum."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    return torch.repeat_interleave(torch.arange(len(lengths), device=idx.device), lengths, output_size=idx.numel())


def _select(x, idx, rows, pos):
    out = x[rows % x.shape[0], idx.long()]
    return out + pos[idx.long()] if pos is not None else out  # torch's type promotion (bf16 + fp32 -> fp32)


def gather_tokens_reference(x, idx, pos=None, lens=None):
    """Plain torch, padded layout: idx [R, L] -> [R, L, D]."""
    out = _select(x, idx, torch.arange(idx.shape[0], device=idx.device)[:, None], pos)
    if lens is not None:
        keep = torch.arange(idx.shape[1], device=idx.device)[None, :] < lens[:, None]
        out = out * keep.unsqueeze(-1).to(out.dtype)
    return out


def gather_tokens_packed_reference(x, idx, cu_seqlens, pos=None):
    """Plain torch, packed layout: idx [T] -> [T, D]."""
    return _select(x, idx, _row_ids(idx, cu_seqlens), pos)


if triton is not None:

    @triton.jit
    def _token_rows(t, T, L, Lens, Row_ids, HAS_LENS: tl.constexpr, PACKED: tl.constexpr):
        """Row of each token and whether it is a real one."""
        valid = t < T
        if PACKED:
            r = tl.load(Row_ids + t, mask=valid, other=0).to(tl.int64)
        else:
            r = t // L
            if HAS_LENS:
                valid = valid & ((t % L) < tl.load(Lens + r, mask=valid, other=0))
        return r, valid

    @triton.jit
    def _gather_fwd_kernel(X_ptr, Idx_ptr, Pos_ptr, Lens_ptr, Row_ids_ptr, Out_ptr, T, L, B, D, X_b_stride,
                           X_n_stride, HAS_POS: tl.constexpr, HAS_LENS: tl.constexpr, PACKED: tl.constexpr,
                           BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
        t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
        d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        r, valid = _token_rows(t, T, L, Lens_ptr, Row_ids_ptr, HAS_LENS, PACKED)
        n = tl.load(Idx_ptr + t, mask=t < T, other=0).to(tl.int64)
        b = r % B
        dmask = d < D
        m2 = valid[:, None] & dmask[None, :]
        v = tl.load(X_ptr + b[:, None] * X_b_stride + n[:, None] * X_n_stride + d[None, :], mask=m2,
                    other=0.0).to(tl.float32)
        if HAS_POS:
            v += tl.load(Pos_ptr + n[:, None] * D + d[None, :], mask=m2, other=0.0).to(tl.float32)
        tl.store(Out_ptr + t[:, None] * D + d[None, :], v.to(Out_ptr.dtype.element_ty),
                 mask=(t < T)[:, None] & dmask[None, :])

    @triton.jit
    def _scatter_atomic_kernel(G_ptr, Idx_ptr, Lens_ptr, Row_ids_ptr, Gx_ptr, T, L, B, N, D,
                               HAS_LENS: tl.constexpr, PACKED: tl.constexpr, BLOCK_T: tl.constexpr,
                               BLOCK_D: tl.constexpr):
        t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
        d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        r, valid = _token_rows(t, T, L, Lens_ptr, Row_ids_ptr, HAS_LENS, PACKED)
        n = tl.load(Idx_ptr + t, mask=t < T, other=0).to(tl.int64)
        dest = (r % B) * N + n
        m2 = valid[:, None] & (d < D)[None, :]
        g = tl.load(G_ptr + t[:, None] * D + d[None, :], mask=m2, other=0.0).to(tl.float32)
        tl.atomic_add(Gx_ptr + dest[:, None] * D + d[None, :], g, mask=m2)

    @triton.jit
    def _scatter_sorted_kernel(G_ptr, Order_ptr, Seg_start_ptr, Gx_ptr, S, T, D, BLOCK_S: tl.constexpr,
                               BLOCK_D: tl.constexpr):
        # one segment per destination row s of gx: its sources are Order[Seg_start[s] : Seg_start[s + 1]]
        s = tl.program_id(0).to(tl.int64) * BLOCK_S + tl.arange(0, BLOCK_S)
        d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        smask = s < S
        m2 = smask[:, None] & (d < D)[None, :]
        start = tl.load(Seg_start_ptr + s, mask=smask, other=0)
        count = tl.load(Seg_start_ptr + s + 1, mask=smask, other=0) - start  # 0 for a row nothing reads
        acc = tl.zeros([BLOCK_S, BLOCK_D], dtype=tl.float32)
        for i in range(0, tl.max(count, axis=0)):  # each destination's sources, in a fixed order
            # Past a segment's end, re-read a valid source and drop it with where(): a 2D load mask
            # built from loaded counts crashes Triton 3.6's layout pass for sm_90 when D is a multiple
            # of 16 (tests/test_kernels_compile.py compiles every launch for the GPU).
            j = tl.minimum(start + tl.maximum(tl.minimum(i, count - 1), 0), T - 1)
            t = tl.load(Order_ptr + j, mask=smask, other=0)
            g = tl.load(G_ptr + t[:, None] * D + d[None, :], mask=m2, other=0.0).to(tl.float32)
            acc += tl.where((i < count)[:, None], g, 0.0)
        tl.store(Gx_ptr + s[:, None] * D + d[None, :], acc.to(Gx_ptr.dtype.element_ty), mask=m2)


def _flags(idx, pos, lens, row_ids):
    return dict(HAS_POS=pos is not None, HAS_LENS=lens is not None, PACKED=row_ids is not None)


def gather_tokens_triton(x, idx, pos=None, lens=None, row_ids=None):
    b, _, d = x.shape
    t = idx.numel()
    length = idx.shape[-1] if row_ids is None else 1
    dtype = torch.promote_types(x.dtype, pos.dtype) if pos is not None else x.dtype
    out = torch.empty(idx.shape + (d,), device=x.device, dtype=dtype)
    if t == 0:
        return out
    x = x if x.stride(-1) == 1 else x.contiguous()
    bt, bd = token_blocks(d)
    dummy = idx
    _gather_fwd_kernel[(triton.cdiv(t, bt), triton.cdiv(d, bd))](
        x, idx, pos if pos is not None else x, lens if lens is not None else dummy,
        row_ids if row_ids is not None else dummy, out, t, length, b, d, x.stride(0), x.stride(1),
        BLOCK_T=bt, BLOCK_D=bd, **_flags(idx, pos, lens, row_ids))
    return out


def scatter_tokens_triton(grad, idx, b, n, lens=None, row_ids=None, deterministic=False):
    """Gradient of x [B, N, D] (fp32 accumulation, cast to grad's dtype)."""
    d = grad.shape[-1]
    t = idx.numel()
    length = idx.shape[-1] if row_ids is None else 1
    grad = grad.contiguous()
    bt, bd = token_blocks(d)
    if not deterministic:
        gx = torch.zeros(b, n, d, device=grad.device, dtype=torch.float32)
        if t:
            _scatter_atomic_kernel[(triton.cdiv(t, bt), triton.cdiv(d, bd))](
                grad, idx, lens if lens is not None else idx, row_ids if row_ids is not None else idx, gx, t,
                length, b, n, d, BLOCK_T=bt, BLOCK_D=bd, HAS_LENS=lens is not None, PACKED=row_ids is not None)
        return gx.to(grad.dtype)
    # Sources sorted by destination (stable: token order within one), padding last; every row of gx
    # is one segment, so no size depends on the data and nothing is read back to the host.
    dest, valid = destinations(idx, b, n, lens, row_ids)
    key = torch.where(valid, dest, b * n)
    order = torch.argsort(key, stable=True)
    seg_start = torch.searchsorted(key[order], torch.arange(b * n + 1, device=grad.device))
    gx = torch.empty(b, n, d, device=grad.device, dtype=grad.dtype)
    if t == 0 or gx.numel() == 0:
        return gx.zero_()
    _scatter_sorted_kernel[(triton.cdiv(b * n, bt), triton.cdiv(d, bd))](
        grad, order, seg_start, gx, b * n, t, d, BLOCK_S=bt, BLOCK_D=bd)
    return gx


def destinations(idx, b, n, lens=None, row_ids=None):
    """Flat destination row (image * N + patch) of every token, and whether the token is real."""
    flat = idx.reshape(-1).long()
    if row_ids is not None:
        rows = row_ids.long()
        valid = torch.ones_like(flat, dtype=torch.bool)
    else:
        r, length = idx.shape
        rows = torch.arange(r, device=idx.device).repeat_interleave(length)
        j = torch.arange(length, device=idx.device).repeat(r)
        if lens is None:
            valid = torch.ones_like(flat, dtype=torch.bool)
        else:
            valid = j < lens.long().repeat_interleave(length)
    return (rows % b) * n + flat, valid


def scatter_tokens_reference(grad, idx, b, n, lens=None, row_ids=None):
    d = grad.shape[-1]
    dest, valid = destinations(idx, b, n, lens, row_ids)
    g = grad.reshape(-1, d).float() * valid.unsqueeze(-1)
    return torch.zeros(b * n, d, device=grad.device).index_add_(0, dest, g).reshape(b, n, d).to(grad.dtype)


# ---------------------------------------------------------------------------------------------
# registered ops (torch.compile traces through them)

@torch.library.custom_op("ijepa_fast::gather_tokens", mutates_args=())
def _gather_op(x: torch.Tensor, idx: torch.Tensor, pos: torch.Tensor | None, lens: torch.Tensor | None,
               row_ids: torch.Tensor | None, deterministic: bool) -> torch.Tensor:
    return gather_tokens_triton(x, idx, pos, lens, row_ids)


@_gather_op.register_fake
def _(x, idx, pos, lens, row_ids, deterministic):
    dtype = torch.promote_types(x.dtype, pos.dtype) if pos is not None else x.dtype
    return x.new_empty(tuple(idx.shape) + (x.shape[-1],), dtype=dtype)


@torch.library.custom_op("ijepa_fast::scatter_tokens", mutates_args=())
def _scatter_op(grad: torch.Tensor, idx: torch.Tensor, b: int, n: int, lens: torch.Tensor | None,
                row_ids: torch.Tensor | None, deterministic: bool) -> torch.Tensor:
    return scatter_tokens_triton(grad, idx, b, n, lens, row_ids, deterministic)


@_scatter_op.register_fake
def _(grad, idx, b, n, lens, row_ids, deterministic):
    return grad.new_empty((b, n, grad.shape[-1]))


def _setup(ctx, inputs, output):
    x, idx, pos, lens, row_ids, deterministic = inputs
    ctx.save_for_backward(idx, lens, row_ids)
    ctx.shape = (x.shape[0], x.shape[1])
    ctx.deterministic = deterministic
    ctx.x_dtype = x.dtype


def _backward(ctx, grad):
    idx, lens, row_ids = ctx.saved_tensors
    b, n = ctx.shape
    gx = _scatter_op(grad, idx, b, n, lens, row_ids, ctx.deterministic)
    return gx.to(ctx.x_dtype), None, None, None, None, None


_gather_op.register_autograd(_backward, setup_context=_setup)


def _check_pos(pos):
    if pos is not None and pos.requires_grad:
        raise ValueError("gather_tokens treats pos as a fixed table: pass pos.detach() (the I-JEPA tables are frozen)")


def gather_tokens(x: torch.Tensor, idx: torch.Tensor, pos: torch.Tensor | None = None,
                  lens: torch.Tensor | None = None, *, deterministic: bool = False,
                  backend: str = "auto") -> torch.Tensor:
    """x [B, N, D], idx [R, L] (row r reads image r % B), pos [N, D] or None, lens [R] or None
    -> [R, L, D] with out[r, j] = x[r % B, idx[r, j]] + pos[idx[r, j]] (zero where j >= lens[r])."""
    _check_pos(pos)
    if idx.dim() != 2:
        raise ValueError(f"gather_tokens: idx must be [R, L], got {tuple(idx.shape)}")
    if not use_triton(backend, x, idx):
        return gather_tokens_reference(x, idx, pos, lens)
    return _gather_op(x, idx.contiguous(), pos, lens, None, deterministic)


def gather_tokens_packed(x: torch.Tensor, idx: torch.Tensor, cu_seqlens: torch.Tensor,
                         pos: torch.Tensor | None = None, *, deterministic: bool = False,
                         backend: str = "auto") -> torch.Tensor:
    """x [B, N, D], idx [T], int32 cu_seqlens [R + 1] (sequence s reads image s % B, and
    cu_seqlens[-1] == T, as ``packing.pack`` makes them) -> [T, D].

    No value of ``cu_seqlens`` is read on the host (that would wait for the device): only shapes
    are checked here."""
    _check_pos(pos)
    if idx.dim() != 1 or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"gather_tokens_packed: idx must be [T] and cu_seqlens [R + 1], got {tuple(idx.shape)} "
                         f"and {tuple(cu_seqlens.shape)}")
    if not use_triton(backend, x, idx):
        return gather_tokens_packed_reference(x, idx, cu_seqlens, pos)
    row_ids = _row_ids(idx, cu_seqlens).to(torch.int32)
    return _gather_op(x, idx.contiguous(), pos, None, row_ids, deterministic)
