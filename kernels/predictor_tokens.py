"""The predictor's input sequences in one pass, in two layouts: for every target block, the context
tokens with their positional rows, then the mask token plus the positional row of each target
position. ``pos`` [N, Dp] is the fixed sin-cos table (no gradient); ``mask_token`` is [Dp] or
[1, 1, Dp] (its gradient keeps the shape). M context blocks, K target blocks, B images.

Padded (``predictor_tokens``): ``x`` [M * B, Lc, Dp] is the embedded context
(``predictor_embed`` of the context encoder's output); ``ctx_idx`` [M * B, Lc] and ``tgt_idx``
[K * B, Lt] are patch indices. Output [K * M * B, Lc + Lt, Dp], of the dtype ``x + pos +
mask_token`` would have: row ``(k * M + m) * B + b`` holds ``x[m * B + b] + pos[ctx_idx[m * B + b]]``
followed by ``mask_token + pos[tgt_idx[k * B + b]]``.

Packed (``predictor_tokens_packed``), no padding anywhere: ``x`` [Tc, Dp] holds the context
tokens of the M * B sequences concatenated as ``ctx_cu`` (int32 [M * B + 1]) delimits them
(sequence ``m * B + b``), ``ctx_idx`` [Tc] their patch indices, ``tgt_idx`` [K * B, Lt]. Output
[Tp, Dp] with Tp = K * (Tc + M * B * Lt): sequence ``s = k * M * B + m * B + b`` holds the context
rows of ``m * B + b`` plus their positional rows, then the target rows of ``k * B + b``; with it
comes a ``PackedPlan`` (int32 ``cu_seqlens`` [K * M * B + 1], the longest length, and
``target_rows`` [K * M * B, Lt]: where each sequence's target rows landed).

Backward (both layouts): each context row receives the sum of its K copies' gradients (a
fixed-order loop, no atomics) and the mask token the sum over every target row (per-program
partial sums, then one reduction): deterministic.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from .dispatch import token_blocks, use_triton

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None


def _out_dtype(x, pos, mask_token) -> torch.dtype:
    """The dtype of ``x + pos + mask_token`` (torch's promotion: bf16 + fp32 -> fp32, as in the predictor)."""
    return torch.promote_types(torch.promote_types(x.dtype, pos.dtype), mask_token.dtype)


# ---------------------------------------------------------------------------------------------
# the padded layout

def predictor_tokens_reference(x, ctx_idx, tgt_idx, mask_token, pos, num_targets: int):
    """Plain torch, the predictor's own composition."""
    mb, lc, dp = x.shape
    kb, lt = tgt_idx.shape
    b = kb // num_targets
    m = mb // b
    ctx = x + pos[ctx_idx.long()]  # torch's type promotion, as in the predictor (bf16 + fp32 -> fp32)
    tgt = pos[tgt_idx.long()].reshape(num_targets, 1, b, lt, dp).expand(num_targets, m, b, lt, dp)
    tgt = tgt.reshape(num_targets * m * b, lt, dp) + mask_token
    return torch.cat([ctx.repeat(num_targets, 1, 1), tgt.to(ctx.dtype)], dim=1)


if triton is not None:

    @triton.jit
    def _pred_tokens_fwd(X_ptr, Ctx_ptr, Tgt_ptr, Tok_ptr, Pos_ptr, Out_ptr, R, LC, LT, MB, B, M, D,
                         BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
        # one program: BLOCK_T positions of the output (flattened over rows and Lc + Lt) x BLOCK_D
        s = LC + LT
        t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
        d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        tmask = t < R * s
        dmask = d < D
        row = t // s
        j = t % s
        k = row // MB
        mb = row % MB  # context row m * B + b
        b = mb % B
        is_ctx = j < LC
        jc = tl.where(is_ctx, j, 0)
        jt = tl.where(is_ctx, 0, j - LC)
        n_ctx = tl.load(Ctx_ptr + mb * LC + jc, mask=tmask & is_ctx, other=0).to(tl.int64)
        n_tgt = tl.load(Tgt_ptr + (k * B + b) * LT + jt, mask=tmask & ~is_ctx, other=0).to(tl.int64)
        n = tl.where(is_ctx, n_ctx, n_tgt)
        m2 = tmask[:, None] & dmask[None, :]
        base = tl.load(X_ptr + (mb * LC + jc)[:, None] * D + d[None, :], mask=m2 & is_ctx[:, None],
                       other=0.0).to(tl.float32)
        tok = tl.load(Tok_ptr + d, mask=dmask, other=0.0).to(tl.float32)
        base = tl.where(is_ctx[:, None], base, tok[None, :])
        v = base + tl.load(Pos_ptr + n[:, None] * D + d[None, :], mask=m2, other=0.0).to(tl.float32)
        tl.store(Out_ptr + t[:, None] * D + d[None, :], v.to(Out_ptr.dtype.element_ty), mask=m2)

    @triton.jit
    def _pred_tokens_bwd_x(G_ptr, Gx_ptr, MB, LC, S, D, K: tl.constexpr, BLOCK_T: tl.constexpr,
                           BLOCK_D: tl.constexpr):
        # gx[mb, j] = sum_k g[k * MB + mb, j], j < LC
        t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
        d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        tmask = t < MB * LC
        m2 = tmask[:, None] & (d < D)[None, :]
        mb = t // LC
        j = t % LC
        acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
        for k in range(0, K):  # K is a compile-time constant: a fixed summation order
            acc += tl.load(G_ptr + ((k * MB + mb) * S + j)[:, None] * D + d[None, :], mask=m2,
                           other=0.0).to(tl.float32)
        tl.store(Gx_ptr + t[:, None] * D + d[None, :], acc.to(Gx_ptr.dtype.element_ty), mask=m2)

    @triton.jit
    def _pred_tokens_bwd_tok(G_ptr, Part_ptr, R, LC, LT, S, D, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
        # partial sums of g over target positions: part[program, d]
        pid = tl.program_id(0)
        t = pid.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
        d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        tmask = t < R * LT
        dmask = d < D
        row = t // LT
        j = LC + t % LT
        g = tl.load(G_ptr + (row * S + j)[:, None] * D + d[None, :], mask=tmask[:, None] & dmask[None, :],
                    other=0.0).to(tl.float32)
        tl.store(Part_ptr + pid * D + d, tl.sum(g, axis=0), mask=dmask)


def predictor_tokens_triton(x, ctx_idx, tgt_idx, mask_token, pos, num_targets):
    mb, lc, dp = x.shape
    kb, lt = tgt_idx.shape
    b = kb // num_targets
    r = num_targets * mb
    out = torch.empty(r, lc + lt, dp, device=x.device, dtype=_out_dtype(x, pos, mask_token))
    if out.numel() == 0:
        return out
    bt, bd = token_blocks(dp)
    _pred_tokens_fwd[(triton.cdiv(r * (lc + lt), bt), triton.cdiv(dp, bd))](
        x.contiguous(), ctx_idx.contiguous(), tgt_idx.contiguous(), mask_token.contiguous(), pos.contiguous(), out,
        r, lc, lt, mb, b, mb // b, dp, BLOCK_T=bt, BLOCK_D=bd)
    return out


def predictor_tokens_backward_triton(grad, num_targets, mb, lc, lt):
    grad = grad.contiguous()
    dp = grad.shape[-1]
    bt, bd = token_blocks(dp)
    gx = torch.empty(mb, lc, dp, device=grad.device, dtype=grad.dtype)
    if gx.numel():
        _pred_tokens_bwd_x[(triton.cdiv(mb * lc, bt), triton.cdiv(dp, bd))](grad, gx, mb, lc, lc + lt, dp,
                                                                            K=num_targets, BLOCK_T=bt, BLOCK_D=bd)
    r = num_targets * mb
    nprog = triton.cdiv(r * lt, bt)
    part = torch.zeros(max(nprog, 1), dp, device=grad.device, dtype=torch.float32)
    if r * lt:
        _pred_tokens_bwd_tok[(nprog, triton.cdiv(dp, bd))](grad, part, r, lc, lt, lc + lt, dp, BLOCK_T=bt,
                                                           BLOCK_D=bd)
    return gx, part.sum(0).to(grad.dtype)


@torch.library.custom_op("ijepa_fast::predictor_tokens", mutates_args=())
def _pred_op(x: torch.Tensor, ctx_idx: torch.Tensor, tgt_idx: torch.Tensor, mask_token: torch.Tensor,
             pos: torch.Tensor, num_targets: int) -> torch.Tensor:
    return predictor_tokens_triton(x, ctx_idx, tgt_idx, mask_token, pos, num_targets)


@_pred_op.register_fake
def _(x, ctx_idx, tgt_idx, mask_token, pos, num_targets):
    return x.new_empty((num_targets * x.shape[0], x.shape[1] + tgt_idx.shape[1], x.shape[2]),
                       dtype=_out_dtype(x, pos, mask_token))


@torch.library.custom_op("ijepa_fast::predictor_tokens_backward", mutates_args=())
def _pred_bwd_op(grad: torch.Tensor, num_targets: int, mb: int, lc: int, lt: int) -> tuple[torch.Tensor, torch.Tensor]:
    return predictor_tokens_backward_triton(grad, num_targets, mb, lc, lt)


@_pred_bwd_op.register_fake
def _(grad, num_targets, mb, lc, lt):
    return grad.new_empty((mb, lc, grad.shape[-1])), grad.new_empty((grad.shape[-1],))


def _pred_setup(ctx, inputs, output):
    x, ctx_idx, tgt_idx, mask_token, pos, num_targets = inputs
    ctx.dims = (num_targets, x.shape[0], x.shape[1], tgt_idx.shape[1])
    ctx.token = (mask_token.shape, mask_token.dtype)
    ctx.x_dtype = x.dtype


def _pred_backward(ctx, grad):
    gx, gtok = _pred_bwd_op(grad, *ctx.dims)
    shape, dtype = ctx.token
    return gx.to(ctx.x_dtype), None, None, gtok.reshape(shape).to(dtype), None, None


_pred_op.register_autograd(_pred_backward, setup_context=_pred_setup)


def predictor_tokens(x: torch.Tensor, ctx_idx: torch.Tensor, tgt_idx: torch.Tensor, mask_token: torch.Tensor,
                     pos: torch.Tensor, num_targets: int, *, backend: str = "auto") -> torch.Tensor:
    """The padded layout (see the module docstring): [M * B, Lc, Dp] -> [K * M * B, Lc + Lt, Dp]."""
    if pos.requires_grad:
        raise ValueError("predictor_tokens treats pos as a fixed table: pass pos.detach()")
    if ctx_idx.shape != x.shape[:2] or tgt_idx.shape[0] % num_targets or x.shape[0] % (tgt_idx.shape[0] // num_targets):
        raise ValueError(f"predictor_tokens: x {tuple(x.shape)}, ctx_idx {tuple(ctx_idx.shape)} and tgt_idx "
                         f"{tuple(tgt_idx.shape)} do not describe M context and {num_targets} target blocks")
    if not use_triton(backend, x, ctx_idx, tgt_idx):
        return predictor_tokens_reference(x, ctx_idx, tgt_idx, mask_token, pos, num_targets)
    return _pred_op(x, ctx_idx, tgt_idx, mask_token, pos, int(num_targets))


# ---------------------------------------------------------------------------------------------
# the packed layout

class PackedPlan(NamedTuple):
    """Where the packed predictor input's rows come from and where its targets land."""

    src: torch.Tensor  # [Tp] row of x feeding each output row, -1 for a mask-token row
    pos_idx: torch.Tensor  # [Tp] positional row of each output row
    dst_ctx: torch.Tensor  # [K, Tc] output row of each context row's K copies
    target_rows: torch.Tensor  # [K * M * B, Lt] output rows holding the targets
    cu_seqlens: torch.Tensor  # int32 [K * M * B + 1]
    max_seqlen: int

    def to(self, device, non_blocking: bool = False) -> PackedPlan:
        return PackedPlan(*(t.to(device, non_blocking=non_blocking) for t in self[:5]), self.max_seqlen)


def plan(ctx_idx: torch.Tensor, ctx_cu: torch.Tensor, tgt_idx: torch.Tensor, num_targets: int,
         max_context: int | None = None) -> PackedPlan:
    """Where every output row comes from (integer bookkeeping only, done once per batch).

    ``max_context``: the longest context sequence, when known on the host (``VarlenMeta.max_seqlen``):
    then no value is read back from the device; the sizes otherwise follow from the shapes."""
    dev = ctx_idx.device
    k = num_targets
    lc = (ctx_cu[1:] - ctx_cu[:-1]).long()  # [MB]
    mb = lc.numel()
    kb, lt = tgt_idx.shape
    b = kb // k
    tc = ctx_idx.numel()
    seq_len = (lc + lt).repeat(k)  # sequence s = k * MB + mb
    cu = torch.zeros(k * mb + 1, dtype=torch.int64, device=dev)
    cu[1:] = torch.cumsum(seq_len, 0)
    starts = cu[:-1].view(k, mb)
    mb_of_t = torch.repeat_interleave(torch.arange(mb, device=dev), lc, output_size=tc)
    j_of_t = torch.arange(tc, device=dev) - ctx_cu[:-1].long()[mb_of_t]
    dst_ctx = starts[:, mb_of_t] + j_of_t  # [K, Tc]
    dst_tgt = (starts + lc).unsqueeze(-1) + torch.arange(lt, device=dev)  # [K, MB, Lt]
    tgt_pos = tgt_idx.reshape(k, b, lt)[:, torch.arange(mb, device=dev) % b]  # [K, MB, Lt]
    tp = k * (tc + mb * lt)  # = cu[-1]
    src = torch.full((tp,), -1, dtype=torch.int64, device=dev)
    pos_idx = torch.empty(tp, dtype=torch.int64, device=dev)
    src[dst_ctx.reshape(-1)] = torch.arange(tc, device=dev).repeat(k)
    pos_idx[dst_ctx.reshape(-1)] = ctx_idx.long().repeat(k)
    pos_idx[dst_tgt.reshape(-1)] = tgt_pos.reshape(-1).long()
    if not mb:
        max_len = 0
    else:
        max_len = max_context + lt if max_context is not None else int(seq_len.max())
    return PackedPlan(src, pos_idx, dst_ctx, dst_tgt.reshape(k * mb, lt), cu.to(torch.int32), max_len)


def compose_reference(x, mask_token, pos, p: PackedPlan):
    """Plain torch: out[t] = (x[src[t]] if src[t] >= 0 else mask_token) + pos[pos_idx[t]]."""
    base = torch.cat([x, mask_token.reshape(1, -1).to(x.dtype)])
    sel = torch.where(p.src >= 0, p.src, x.shape[0])
    return base[sel] + pos[p.pos_idx]  # torch's type promotion, as in the predictor


def predictor_tokens_packed_reference(x, ctx_idx, ctx_cu, tgt_idx, mask_token, pos, num_targets):
    """Plain torch, the same signature and results (the plan, then indexing)."""
    p = plan(ctx_idx, ctx_cu, tgt_idx, num_targets)
    return compose_reference(x, mask_token, pos, p), p


if triton is not None:

    @triton.jit
    def _compose_fwd(X_ptr, Tok_ptr, Pos_ptr, Src_ptr, Pidx_ptr, Out_ptr, T, D, BLOCK_T: tl.constexpr,
                     BLOCK_D: tl.constexpr):
        t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
        d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        tmask = t < T
        dmask = d < D
        src = tl.load(Src_ptr + t, mask=tmask, other=-1)
        pidx = tl.load(Pidx_ptr + t, mask=tmask, other=0)
        is_ctx = src >= 0
        m2 = tmask[:, None] & dmask[None, :]
        base = tl.load(X_ptr + tl.where(is_ctx, src, 0)[:, None] * D + d[None, :], mask=m2 & is_ctx[:, None],
                       other=0.0).to(tl.float32)
        tok = tl.load(Tok_ptr + d, mask=dmask, other=0.0).to(tl.float32)
        base = tl.where(is_ctx[:, None], base, tok[None, :])
        v = base + tl.load(Pos_ptr + pidx[:, None] * D + d[None, :], mask=m2, other=0.0).to(tl.float32)
        tl.store(Out_ptr + t[:, None] * D + d[None, :], v.to(Out_ptr.dtype.element_ty), mask=m2)

    @triton.jit
    def _compose_bwd_x(G_ptr, Dst_ptr, Gx_ptr, TC, D, K: tl.constexpr, BLOCK_T: tl.constexpr,
                       BLOCK_D: tl.constexpr):
        t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
        d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        tmask = t < TC
        m2 = tmask[:, None] & (d < D)[None, :]
        acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
        for k in range(0, K):  # the K copies of each context row, in a fixed order
            row = tl.load(Dst_ptr + k * TC + t, mask=tmask, other=0)
            acc += tl.load(G_ptr + row[:, None] * D + d[None, :], mask=m2, other=0.0).to(tl.float32)
        tl.store(Gx_ptr + t[:, None] * D + d[None, :], acc.to(Gx_ptr.dtype.element_ty), mask=m2)

    @triton.jit
    def _compose_bwd_tok(G_ptr, Rows_ptr, Part_ptr, NR, D, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
        pid = tl.program_id(0)
        t = pid.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
        d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        tmask = t < NR
        dmask = d < D
        row = tl.load(Rows_ptr + t, mask=tmask, other=0)
        g = tl.load(G_ptr + row[:, None] * D + d[None, :], mask=tmask[:, None] & dmask[None, :],
                    other=0.0).to(tl.float32)
        tl.store(Part_ptr + pid * D + d, tl.sum(g, axis=0), mask=dmask)


@torch.library.custom_op("ijepa_fast::predictor_tokens_packed", mutates_args=())
def _compose_op(x: torch.Tensor, mask_token: torch.Tensor, pos: torch.Tensor, src: torch.Tensor,
                pos_idx: torch.Tensor, dst_ctx: torch.Tensor, target_rows: torch.Tensor) -> torch.Tensor:
    d = x.shape[-1]
    out = torch.empty(src.numel(), d, device=x.device, dtype=_out_dtype(x, pos, mask_token))
    if out.numel():
        bt, bd = token_blocks(d)
        _compose_fwd[(triton.cdiv(src.numel(), bt), triton.cdiv(d, bd))](
            x.contiguous(), mask_token.contiguous(), pos.contiguous(), src, pos_idx, out, src.numel(), d,
            BLOCK_T=bt, BLOCK_D=bd)
    return out


@_compose_op.register_fake
def _(x, mask_token, pos, src, pos_idx, dst_ctx, target_rows):
    return x.new_empty((src.numel(), x.shape[-1]), dtype=_out_dtype(x, pos, mask_token))


@torch.library.custom_op("ijepa_fast::predictor_tokens_packed_backward", mutates_args=())
def _compose_bwd_op(grad: torch.Tensor, dst_ctx: torch.Tensor, target_rows: torch.Tensor) -> tuple[torch.Tensor,
                                                                                                   torch.Tensor]:
    grad = grad.contiguous()
    d = grad.shape[-1]
    k, tc = dst_ctx.shape
    bt, bd = token_blocks(d)
    gx = torch.empty(tc, d, device=grad.device, dtype=grad.dtype)
    if gx.numel():
        _compose_bwd_x[(triton.cdiv(tc, bt), triton.cdiv(d, bd))](grad, dst_ctx.contiguous(), gx, tc, d, K=k,
                                                                 BLOCK_T=bt, BLOCK_D=bd)
    rows = target_rows.reshape(-1).contiguous()
    nprog = max(1, triton.cdiv(rows.numel(), bt))
    part = torch.zeros(nprog, d, device=grad.device, dtype=torch.float32)
    if rows.numel():
        _compose_bwd_tok[(nprog, triton.cdiv(d, bd))](grad, rows, part, rows.numel(), d, BLOCK_T=bt, BLOCK_D=bd)
    return gx, part.sum(0)


@_compose_bwd_op.register_fake
def _(grad, dst_ctx, target_rows):
    return grad.new_empty((dst_ctx.shape[1], grad.shape[-1])), grad.new_empty((grad.shape[-1],), dtype=torch.float32)


def _compose_setup(ctx, inputs, output):
    x, mask_token, pos, src, pos_idx, dst_ctx, target_rows = inputs
    ctx.save_for_backward(dst_ctx, target_rows)
    ctx.dtypes = (x.dtype, mask_token.dtype, mask_token.shape)


def _compose_backward(ctx, grad):
    dst_ctx, target_rows = ctx.saved_tensors
    x_dtype, tok_dtype, tok_shape = ctx.dtypes
    gx, gtok = _compose_bwd_op(grad, dst_ctx, target_rows)
    return gx.to(x_dtype), gtok.reshape(tok_shape).to(tok_dtype), None, None, None, None, None


_compose_op.register_autograd(_compose_backward, setup_context=_compose_setup)


def predictor_tokens_packed(x: torch.Tensor, ctx_idx: torch.Tensor, ctx_cu: torch.Tensor, tgt_idx: torch.Tensor,
                            mask_token: torch.Tensor, pos: torch.Tensor, num_targets: int, *,
                            backend: str = "auto", packed_plan: PackedPlan | None = None
                            ) -> tuple[torch.Tensor, PackedPlan]:
    """The packed layout (see the module docstring): (sequences [Tp, Dp], the plan of their layout).

    ``packed_plan``: the result of ``plan(ctx_idx, ctx_cu, tgt_idx, num_targets)`` if already made
    (for example on the CPU by the data loader, which keeps host syncs out of the step).
    """
    if pos.requires_grad:
        raise ValueError("predictor_tokens_packed treats pos as a fixed table: pass pos.detach()")
    if ctx_idx.numel() != x.shape[0] or tgt_idx.shape[0] % num_targets:
        raise ValueError(f"predictor_tokens_packed: x {tuple(x.shape)}, ctx_idx {tuple(ctx_idx.shape)}, tgt_idx "
                         f"{tuple(tgt_idx.shape)} do not describe packed contexts and {num_targets} target blocks")
    p = packed_plan if packed_plan is not None else plan(ctx_idx, ctx_cu, tgt_idx, num_targets)
    if not use_triton(backend, x, ctx_idx):
        return compose_reference(x, mask_token, pos, p), p
    return _compose_op(x, mask_token, pos, p.src, p.pos_idx, p.dst_ctx, p.target_rows), p
