"""kernels/predictor_tokens.py: the predictor's input sequences, padded and packed, against the references."""
import pytest
import torch
from conftest import DEVICE
from kernel_checks import DTYPES, check, needs_triton, rand, up

from ijepa_fast.kernels.predictor_tokens import (
    predictor_tokens,
    predictor_tokens_packed,
    predictor_tokens_packed_reference,
    predictor_tokens_reference,
)
from ijepa_fast.models.varlen import VarlenMeta

pytestmark = needs_triton


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,m,k,lc,lt,dp", [(1, 1, 4, 5, 1, 80), (3, 2, 3, 7, 4, 384), (2, 1, 4, 1, 6, 1408),
                                            (2, 1, 2, 3, 0, 80)])
def test_kernel_predictor_tokens(dtype, b, m, k, lc, lt, dp):
    n = 20
    x = rand(m * b, lc, dp, dtype=dtype).requires_grad_()
    tok = rand(1, 1, dp, scale=0.02).requires_grad_()
    pos = rand(n, dp)
    ci = torch.randint(0, n, (m * b, lc), device=DEVICE)
    ti = torch.randint(0, n, (k * b, lt), device=DEVICE)
    out = predictor_tokens(x, ci, ti, tok, pos, k, backend="triton")
    xr, tr = up(x), up(tok)
    ref = predictor_tokens_reference(xr, ci, ti, tr, pos, k)
    assert out.shape == (k * m * b, lc + lt, dp) and out.dtype == torch.float32
    check(out, ref, "predictor_tokens forward")
    g = rand(*ref.shape)
    gx, gt = torch.autograd.grad(out, (x, tok), g)
    grx, grt = torch.autograd.grad(ref, (xr, tr), g)
    assert gx.dtype == dtype and gt.shape == tok.shape and gt.dtype == tok.dtype
    check(gx, grx, "predictor_tokens grad x", 1e-5, floor=1.0 if k > 1 else 1e-3)
    check(gt, grt, "predictor_tokens grad mask token", 1e-5, floor=1.0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lengths,k,b,lt,dp", [([3, 0, 5], 4, 3, 4, 80), ([7, 2, 1, 4], 3, 2, 5, 384),
                                               ([1], 2, 1, 1, 1408)])
def test_kernel_predictor_tokens_packed(dtype, lengths, k, b, lt, dp):
    n = 20
    meta = VarlenMeta.from_lengths(torch.tensor(lengths, device=DEVICE))
    tc = sum(lengths)
    x = rand(tc, dp, dtype=dtype).requires_grad_()
    tok = rand(1, 1, dp, scale=0.02).requires_grad_()
    pos = rand(n, dp)
    ctx_idx = torch.randint(0, n, (tc,), device=DEVICE)
    tgt_idx = torch.randint(0, n, (k * b, lt), device=DEVICE)
    out, plan = predictor_tokens_packed(x, ctx_idx, meta.cu_seqlens, tgt_idx, tok, pos, k, backend="triton")
    xr, tr = up(x), up(tok)
    ref, plan_r = predictor_tokens_packed_reference(xr, ctx_idx, meta.cu_seqlens, tgt_idx, tr, pos, k)
    assert out.shape == (k * (tc + len(lengths) * lt), dp) and torch.equal(plan.target_rows, plan_r.target_rows)
    check(out, ref, "packed predictor tokens forward")
    # every sequence: its context rows, then its target block's rows
    s = 1 if len(lengths) > 1 else 0
    start, ln = int(plan.cu_seqlens[s]), lengths[s % len(lengths)]
    torch.testing.assert_close(ref[start:start + ln], xr[meta.cu_seqlens[s]:meta.cu_seqlens[s] + ln] +
                               pos[ctx_idx[meta.cu_seqlens[s]:meta.cu_seqlens[s] + ln]])
    g = rand(*ref.shape)
    gx, gt = torch.autograd.grad(out, (x, tok), g)
    grx, grt = torch.autograd.grad(ref, (xr, tr), g)
    assert gx.dtype == dtype and gt.shape == tok.shape
    check(gx, grx, "packed grad x", 1e-5, floor=1.0)
    check(gt, grt, "packed grad mask token", 1e-5, floor=1.0)
