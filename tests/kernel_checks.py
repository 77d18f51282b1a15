"""Shared by the kernel tests: tolerances and inputs.

On a machine without a GPU the kernels run under Triton's interpreter (set in conftest). The
kernels load, upcast to fp32, compute and round once when storing, so a kernel fed bf16 tensors
is compared with the fp32 reference evaluated on the same bf16 values: fp32 results must agree to
fp32 rounding, bf16 results to one bf16 rounding.
"""
import pytest
import torch
from conftest import DEVICE

from ijepa_fast.kernels.dispatch import triton_version

needs_triton = pytest.mark.skipif(triton_version() is None, reason="Triton is not installed (pip install triton)")

DTYPES = [torch.float32, torch.bfloat16]


def check(out, ref, what, rtol=2e-6, floor=1e-3):
    """Elementwise |out - ref| <= tol * (|ref| + floor * max|ref|): tol = rtol for fp32 results,
    one bf16 rounding (2^-7) for bf16 results. Sums of many terms (a reduction) use floor=1: their
    rounding error scales with the terms, not with the (possibly cancelled) result."""
    tol = 2**-7 if out.dtype == torch.bfloat16 else rtol
    out, ref = out.detach().double(), ref.detach().double()
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} vs {tuple(ref.shape)}"
    if out.numel() == 0:
        return
    bad = (out - ref).abs() > tol * (ref.abs() + floor * ref.abs().max())
    assert not bad.any(), f"{what}: {int(bad.sum())} elements off, worst {(out - ref).abs().max().item():.3g}"


def up(t):
    """The fp32 values a kernel computes with after upcasting its (possibly bf16) input."""
    return t.detach().float().requires_grad_(t.requires_grad)


def rand(*shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, device=DEVICE) * scale).to(dtype)


def idx_rows(rows, n, length):
    """[rows, length] distinct patch indices per row."""
    return torch.stack([torch.randperm(n, device=DEVICE)[:length] for _ in range(rows)])
