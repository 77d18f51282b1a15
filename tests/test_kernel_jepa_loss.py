"""kernels/jepa_loss.py: the loss value and gradient in one pass against the reference."""
import pytest
import torch
from conftest import DEVICE
from kernel_checks import DTYPES, check, needs_triton, rand, up

from ijepa_fast.kernels.jepa_loss import jepa_loss, jepa_loss_reference

pytestmark = needs_triton


@pytest.mark.parametrize("kind", ["smooth_l1", "mse"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("r,length,d,repeat,with_valid", [(4, 6, 80, 1, False), (12, 5, 1280, 2, True),
                                                         (4, 1, 1408, 1, True), (1, 3, 80, 1, False)])
def test_kernel_jepa_loss_value_and_gradient(kind, dtype, r, length, d, repeat, with_valid):
    k = 2 if r % (2 * repeat) == 0 else 1
    p = rand(r, length, d, scale=1.5, dtype=dtype).requires_grad_()
    t = rand(r // repeat, length, d, dtype=dtype)
    valid = (torch.rand(r, length, device=DEVICE) > 0.3) if with_valid else None
    if valid is not None:
        valid[0, 0] = True
    loss = jepa_loss(p, t, kind, valid, repeat=repeat, num_targets=k, backend="triton")
    assert loss.dtype == torch.float32 and loss.dim() == 0
    pr = up(p)
    ref = jepa_loss_reference(pr, up(t), kind, valid, repeat, k)
    check(loss, ref, "loss value", 1e-5)
    (g,) = torch.autograd.grad(loss * 3.0, p)
    (gr,) = torch.autograd.grad(ref * 3.0, pr)
    assert g.dtype == dtype
    check(g, gr, "loss gradient", 1e-5)


def test_kernel_jepa_loss_reference_matches_torch_functional():
    import torch.nn.functional as F

    p, t = rand(3, 4, 16), rand(3, 4, 16)
    assert torch.allclose(jepa_loss_reference(p, t, "smooth_l1"), F.smooth_l1_loss(p, t))
    assert torch.allclose(jepa_loss_reference(p, t, "mse"), F.mse_loss(p, t))
