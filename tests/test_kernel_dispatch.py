"""kernels/dispatch.py: where every op chooses its Triton kernel or its reference, and the shared launch sizes."""
import pytest
import torch
from conftest import DEVICE

from ijepa_fast.kernels.dispatch import next_power_of_2, token_blocks, triton_version, use_triton

pytestmark = pytest.mark.skipif(triton_version() is None, reason="Triton is not installed (pip install triton)")


def test_kernel_dispatch_rules():
    from ijepa_fast.kernels.dispatch import interpreting

    cpu = torch.zeros(1)
    assert not use_triton("reference", cpu)
    assert not use_triton("auto", cpu)  # CPU tensors: the references, even with Triton installed
    if interpreting():  # set by conftest where there is no GPU
        assert use_triton("triton", cpu)
    else:
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            use_triton("triton", cpu)
    if DEVICE == "cuda":
        gpu = torch.zeros(1, device=DEVICE)
        assert use_triton("auto", gpu) and use_triton("triton", gpu) and not use_triton("reference", gpu)
    with pytest.raises(ValueError, match="unknown kernel backend"):
        use_triton("cuda", cpu)


def test_kernel_launch_sizes():
    assert [next_power_of_2(n) for n in (1, 2, 3, 80, 128, 129, 1408)] == [1, 2, 4, 128, 128, 256, 2048]
    rows, cols = token_blocks(1408)
    assert cols == 256 and rows >= 1 and rows * cols <= 1 << 20
    assert token_blocks(80)[1] == 128
