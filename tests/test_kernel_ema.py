"""kernels/ema.py: the fused EMA against its reference."""
import pytest
import torch
from kernel_checks import needs_triton, rand

from ijepa_fast.kernels.ema import ema_reference, ema_update_

pytestmark = needs_triton


@pytest.mark.parametrize("t_dtype,s_dtype", [(torch.float32, torch.float32), (torch.float32, torch.bfloat16),
                                             (torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16)])
def test_kernel_ema_matches_reference(t_dtype, s_dtype):
    sizes = [1, 80, 1280, 1408 * 3, 70001, 0]
    targets = [rand(n, dtype=t_dtype) for n in sizes] + [rand(3, 1408, dtype=t_dtype)]
    sources = [rand(n, dtype=s_dtype) for n in sizes] + [rand(3, 1408, dtype=s_dtype)]
    expected = [t.clone() for t in targets]
    ema_reference(expected, sources, 0.996)
    ema_update_(targets, sources, 0.996, backend="triton")
    for t, e, s0 in zip(targets, expected, sources):
        if t_dtype == torch.float32:
            torch.testing.assert_close(t, e, rtol=1e-6, atol=1e-7)
        else:  # one bf16 rounding of the same fp32 value, or its neighbour
            assert ((t.float() - e.float()).abs() <= e.float().abs() * 2**-7 + 1e-6).all()


def test_kernel_ema_tables_follow_moved_tensors():
    a, s = rand(5000), rand(5000)
    ema_update_([a], [s], 0.5, backend="triton")
    b = rand(5000)  # a new tensor: the cached table must not be reused for it
    expected = b * 0.5 + s * 0.5
    ema_update_([b], [s], 0.5, backend="triton")
    torch.testing.assert_close(b, expected)
    with pytest.raises(ValueError, match="paired with"):
        ema_update_([rand(3)], [rand(4)], 0.5, backend="triton")
