"""kernels/gather_layernorm.py: the target layer norm at the selected rows against its reference."""
import pytest
from kernel_checks import DTYPES, check, idx_rows, needs_triton, rand, up

from ijepa_fast.kernels.gather_layernorm import gather_layernorm, gather_layernorm_reference

pytestmark = needs_triton


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,n,d,rows,length", [(1, 16, 80, 4, 1), (2, 30, 1280, 8, 6), (3, 20, 1408, 12, 5),
                                               (2, 10, 80, 8, 0)])
def test_kernel_gather_layernorm(dtype, b, n, d, rows, length):
    h = (rand(b, n, d, scale=3.0) + 0.5).to(dtype)
    idx = idx_rows(rows, n, length)
    out = gather_layernorm(h, idx, backend="triton")
    assert out.shape == (rows, length, d) and out.dtype == dtype
    check(out, gather_layernorm_reference(up(h), idx), "gather_layernorm", 1e-5)
