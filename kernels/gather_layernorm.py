"""Target features: ``layer_norm(h)[idx]`` computed only on the selected rows (forward only).

h [B, N, D] is the target encoder's output; idx [R, L] selects rows (row r reads image r % B),
so K target blocks of a batch of B images form R = K * B rows. The layer norm has no affine
parameters (the I-JEPA targets use ``F.layer_norm(h, (D,))``); statistics are fp32, and the
output is stored in ``out_dtype`` (default h's dtype; the engine asks for fp32 targets whatever
the encoder ran in, as the reference's targets are under autocast).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .dispatch import block_rows, next_power_of_2, use_triton

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None


def gather_layernorm_reference(h: torch.Tensor, idx: torch.Tensor, eps: float = 1e-5,
                               out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Plain torch: normalise every row in fp32, then select. [B, N, D], [R, L] -> [R, L, D]."""
    rows = torch.arange(idx.shape[0], device=idx.device)[:, None] % h.shape[0]
    return F.layer_norm(h.float(), (h.shape[-1],), eps=eps)[rows, idx.long()].to(out_dtype or h.dtype)


if triton is not None:

    @triton.jit
    def _gather_ln_kernel(H_ptr, Idx_ptr, Out_ptr, T, L, B, D, H_b_stride, H_n_stride, eps,
                          BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
        t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
        d = tl.arange(0, BLOCK_D)
        tmask = t < T
        dmask = d < D
        n = tl.load(Idx_ptr + t, mask=tmask, other=0).to(tl.int64)
        b = (t // L) % B
        m2 = tmask[:, None] & dmask[None, :]
        x = tl.load(H_ptr + b[:, None] * H_b_stride + n[:, None] * H_n_stride + d[None, :], mask=m2,
                    other=0.0).to(tl.float32)
        mean = tl.sum(x, axis=1) / D
        xc = tl.where(m2, x - mean[:, None], 0.0)
        var = tl.sum(xc * xc, axis=1) / D
        y = xc * (1.0 / tl.sqrt(var + eps))[:, None]
        tl.store(Out_ptr + t[:, None] * D + d[None, :], y.to(Out_ptr.dtype.element_ty), mask=m2)


def gather_layernorm_triton(h, idx, eps=1e-5, out_dtype=None):
    b, _, d = h.shape
    out = torch.empty(tuple(idx.shape) + (d,), device=h.device, dtype=out_dtype or h.dtype)
    t = idx.numel()
    if t == 0:
        return out
    h = h if h.stride(-1) == 1 else h.contiguous()
    block_d = next_power_of_2(d)
    block_t = block_rows(max(1, 4096 // block_d), 2048, block_d)
    _gather_ln_kernel[(triton.cdiv(t, block_t),)](h, idx, out, t, idx.shape[-1], b, d, h.stride(0), h.stride(1),
                                                  float(eps), BLOCK_T=block_t, BLOCK_D=block_d,
                                                  num_warps=4 if block_d <= 1024 else 8)
    return out


@torch.library.custom_op("ijepa_fast::gather_layernorm", mutates_args=())
def _gather_ln_op(h: torch.Tensor, idx: torch.Tensor, eps: float, out_dtype: torch.dtype) -> torch.Tensor:
    return gather_layernorm_triton(h, idx, eps, out_dtype)


@_gather_ln_op.register_fake
def _(h, idx, eps, out_dtype):
    return h.new_empty(tuple(idx.shape) + (h.shape[-1],), dtype=out_dtype)


def gather_layernorm(h: torch.Tensor, idx: torch.Tensor, eps: float = 1e-5, *, out_dtype: torch.dtype | None = None,
                     backend: str = "auto") -> torch.Tensor:
    """[B, N, D], [R, L] -> [R, L, D]: layer_norm(h[r % B, idx[r, j]]) without affine, stored in
    ``out_dtype`` (default h's dtype). No gradient."""
    if idx.dim() != 2:
        raise ValueError(f"gather_layernorm: idx must be [R, L], got {tuple(idx.shape)}")
    with torch.no_grad():
        if not use_triton(backend, h, idx):
            return gather_layernorm_reference(h, idx, eps, out_dtype)
        return _gather_ln_op(h.detach(), idx.contiguous(), float(eps), out_dtype or h.dtype)
