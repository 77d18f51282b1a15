"""kernels/gather_tokens.py: the token gather (padded and packed) and its scatter backward against the references."""
import pytest
import torch
from conftest import DEVICE
from kernel_checks import DTYPES, check, idx_rows, needs_triton, rand, up

from ijepa_fast.kernels.gather_tokens import (
    gather_tokens,
    gather_tokens_packed,
    gather_tokens_packed_reference,
    gather_tokens_reference,
)

pytestmark = needs_triton


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,n,d,m,length", [(1, 16, 80, 1, 5), (3, 30, 1280, 2, 7), (2, 9, 1408, 1, 1),
                                            (2, 12, 80, 1, 0)])
@pytest.mark.parametrize("with_lens", [False, True])
def test_kernel_gather_tokens_forward_backward(dtype, b, n, d, m, length, with_lens):
    pos = rand(n, d)
    idx = idx_rows(m * b, n, length)
    lens = torch.randint(0, length + 1, (m * b,), device=DEVICE) if with_lens else None
    x = rand(b, n, d, dtype=dtype).requires_grad_()
    out = gather_tokens(x, idx, pos, lens, backend="triton")
    assert out.dtype == torch.float32  # a bf16 x plus the fp32 table promotes, as x + pos would
    xr = up(x)
    ref = gather_tokens_reference(xr, idx, pos, lens)
    check(out, ref, "gather forward")
    g = rand(*ref.shape)
    (gx,) = torch.autograd.grad(out, x, g)
    (gr,) = torch.autograd.grad(ref, xr, g)
    assert gx.dtype == dtype
    check(gx, gr, "gather backward", 1e-5)


def test_kernel_gather_tokens_packed_and_deterministic_scatter_bit_exact():
    b, n, d = 2, 16, 80
    x = rand(b, n, d).requires_grad_()
    pos = rand(n, d)
    cu = torch.tensor([0, 3, 3, 9, 12, 13], dtype=torch.int32, device=DEVICE)  # an empty and a one-token row
    idx = torch.randint(0, n, (13,), device=DEVICE)
    out = gather_tokens_packed(x, idx, cu, pos, backend="triton")
    ref = gather_tokens_packed_reference(x, idx, cu, pos)
    torch.testing.assert_close(out, ref)
    g = rand(13, d)
    gref = torch.autograd.grad(ref, x, g)[0]
    runs = []
    for _ in range(3):
        o = gather_tokens_packed(x, idx, cu, pos, deterministic=True, backend="triton")
        runs.append(torch.autograd.grad(o, x, g)[0])
    assert all(torch.equal(runs[0], r) for r in runs[1:])  # bit-exact across runs
    torch.testing.assert_close(runs[0], gref, rtol=1e-6, atol=1e-6)
    # colliding destinations (the same patch picked by two context blocks) accumulate
    idx2 = torch.tensor([[0, 1], [1, 0], [0, 0]], device=DEVICE)
    x2 = rand(1, 4, 8).requires_grad_()
    o2 = gather_tokens(x2, idx2, None, deterministic=True, backend="triton")
    g2 = torch.autograd.grad(o2, x2, torch.ones_like(o2))[0]
    assert g2[0, 0].tolist() == [4.0] * 8 and g2[0, 1].tolist() == [2.0] * 8 and g2[0, 2:].abs().sum() == 0


def test_kernel_gather_tokens_rejects_trainable_tables():
    with pytest.raises(ValueError, match="fixed table"):
        gather_tokens(rand(1, 4, 8), idx_rows(1, 4, 2), rand(4, 8).requires_grad_(), backend="triton")
