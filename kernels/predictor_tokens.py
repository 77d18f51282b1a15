"""The predictor's input sequences in one pass: context tokens with their positional rows, then
the mask token plus the positional row of every target position, for every target block.

Shapes (M context blocks, K target blocks, B images): ``x`` [M * B, Lc, Dp] is the embedded
context (``predictor_embed`` of the context encoder's output); ``ctx_idx`` [M * B, Lc] and
``tgt_idx`` [K * B, Lt] are patch indices; ``mask_token`` [Dp]; ``pos`` [N, Dp] the fixed table.
Output [K * M * B, Lc + Lt, Dp], of the dtype ``x + pos + mask_token`` would have: row ``(k * M + m) * B + b`` holds
``x[m * B + b] + pos[ctx_idx[m * B + b]]`` followed by ``mask_token + pos[tgt_idx[k * B + b]]``.

Backward: ``x`` receives the sum over the K copies of its rows (a fixed-order loop, no atomics)
and ``mask_token`` the sum over every target position (per-program partial sums, then one
reduction: deterministic). ``pos`` is a fixed table and gets no gradient.
"""
from __future__ import annotations

import torch

from .dispatch import block_rows, use_triton

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None


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


def _blocks(d):
    block_d = min(triton.next_power_of_2(d), 256)
    return block_rows(32, 4096, block_d), block_d


def predictor_tokens_triton(x, ctx_idx, tgt_idx, mask_token, pos, num_targets):
    mb, lc, dp = x.shape
    kb, lt = tgt_idx.shape
    b = kb // num_targets
    r = num_targets * mb
    dtype = torch.promote_types(torch.promote_types(x.dtype, pos.dtype), mask_token.dtype)
    out = torch.empty(r, lc + lt, dp, device=x.device, dtype=dtype)
    if out.numel() == 0:
        return out
    bt, bd = _blocks(dp)
    _pred_tokens_fwd[(triton.cdiv(r * (lc + lt), bt), triton.cdiv(dp, bd))](
        x.contiguous(), ctx_idx.contiguous(), tgt_idx.contiguous(), mask_token.contiguous(), pos.contiguous(), out,
        r, lc, lt, mb, b, mb // b, dp, BLOCK_T=bt, BLOCK_D=bd)
    return out


def predictor_tokens_backward_triton(grad, num_targets, mb, lc, lt):
    grad = grad.contiguous()
    dp = grad.shape[-1]
    bt, bd = _blocks(dp)
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
    dtype = torch.promote_types(torch.promote_types(x.dtype, pos.dtype), mask_token.dtype)
    return x.new_empty((num_targets * x.shape[0], x.shape[1] + tgt_idx.shape[1], x.shape[2]), dtype=dtype)


@torch.library.custom_op("ijepa_fast::predictor_tokens_backward", mutates_args=())
def _pred_bwd_op(grad: torch.Tensor, num_targets: int, mb: int, lc: int, lt: int) -> tuple[torch.Tensor, torch.Tensor]:
    return predictor_tokens_backward_triton(grad, num_targets, mb, lc, lt)


@_pred_bwd_op.register_fake
def _(grad, num_targets, mb, lc, lt):
    return grad.new_empty((mb, lc, grad.shape[-1])), grad.new_empty((grad.shape[-1],))


def _setup(ctx, inputs, output):
    x, ctx_idx, tgt_idx, mask_token, pos, num_targets = inputs
    ctx.dims = (num_targets, x.shape[0], x.shape[1], tgt_idx.shape[1])
    ctx.token = (mask_token.shape, mask_token.dtype)
    ctx.x_dtype = x.dtype


def _backward(ctx, grad):
    gx, gtok = _pred_bwd_op(grad, *ctx.dims)
    shape, dtype = ctx.token
    return gx.to(ctx.x_dtype), None, None, gtok.reshape(shape).to(dtype), None, None


_pred_op.register_autograd(_backward, setup_context=_setup)


def predictor_tokens(x: torch.Tensor, ctx_idx: torch.Tensor, tgt_idx: torch.Tensor, mask_token: torch.Tensor,
                     pos: torch.Tensor, num_targets: int, *, backend: str = "auto") -> torch.Tensor:
    """See the module docstring. mask_token may be [Dp] or [1, 1, Dp] (its gradient keeps the shape)."""
    if pos.requires_grad:
        raise ValueError("predictor_tokens treats pos as a fixed table: pass pos.detach()")
    if ctx_idx.shape != x.shape[:2] or tgt_idx.shape[0] % num_targets or x.shape[0] % (tgt_idx.shape[0] // num_targets):
        raise ValueError(f"predictor_tokens: x {tuple(x.shape)}, ctx_idx {tuple(ctx_idx.shape)} and tgt_idx "
                         f"{tuple(tgt_idx.shape)} do not describe M context and {num_targets} target blocks")
    if not use_triton(backend, x, ctx_idx, tgt_idx):
        return predictor_tokens_reference(x, ctx_idx, tgt_idx, mask_token, pos, num_targets)
    return _pred_op(x, ctx_idx, tgt_idx, mask_token, pos, int(num_targets))
