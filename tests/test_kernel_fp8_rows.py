"""kernels/fp8_rows.py: the rowwise float8 cast of many weights in one launch against its reference,
bit for bit (on the CPU under Triton's interpreter, or on a GPU as compiled for the card)."""
import pytest
import torch
from conftest import DEVICE
from kernel_checks import needs_triton, rand

from ijepa_fast.kernels import fp8_rows
from ijepa_fast.kernels.fp8_rows import E4M3_MAX, FP8, fp8_rows_, fp8_rows_reference, rows_to_fp8

pytestmark = needs_triton


def _buffers(weights):
    """Buffers filled with a recognisable pattern (the kernel must overwrite every element)."""
    qs = [torch.full(w.shape, 3.0, device=DEVICE).to(FP8) for w in weights]
    scales = [torch.full((w.shape[0],), -1.0, device=DEVICE) for w in weights]
    return qs, scales


def _weights():
    """Odd row counts, rows of odd lengths, a row longer than the interpreter's 4096-column chunk
    (and than the GPU's 1024), whole zero rows, a one-element row, tiny and huge magnitudes."""
    ws = [rand(7, 48), rand(33, 80, scale=0.02), rand(3, 5000), rand(129, 17, scale=300.0), rand(1, 1),
          rand(5, 96, scale=1e-30)]
    ws[0][2] = 0.0
    ws[1][[0, 32]] = 0.0
    ws[3][5, 3] = 0.0  # one zero in a row: stays 0
    return ws


def _same(q, s, q_ref, s_ref, what):
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8)), f"{what}: fp8 values differ"
    assert torch.equal(s, s_ref), f"{what}: scales differ"


def test_kernel_fp8_rows_matches_reference_bit_for_bit():
    weights = _weights()
    qs, scales = _buffers(weights)
    want_q, want_s = _buffers(weights)
    fp8_rows_reference(weights, want_q, want_s)
    fp8_rows_(weights, qs, scales, backend="triton")
    for i, (q, s, wq, ws) in enumerate(zip(qs, scales, want_q, want_s)):
        _same(q, s, wq, ws, f"weight {i} {tuple(weights[i].shape)}")


def test_fp8_rows_reference_arithmetic():
    """The reference against an independent float64 computation: the scale is the row's amax / 448
    (a zero row: the 1e-12 floor), the largest element of each row maps to +-448 (a row below the
    floor to zeros), and every value
    is the nearest float8 to w / scale (within half a float8 step: 2**-4 relative, or the
    subnormal step 2**-10 absolute)."""
    weights = _weights()
    qs, scales = _buffers(weights)
    fp8_rows_reference(weights, qs, scales)
    for w, q, s in zip(weights, qs, scales):
        amax = w.double().abs().amax(dim=1)
        torch.testing.assert_close(s.double(), amax.clamp_min(1e-12) / 448, rtol=2**-23, atol=0)
        assert torch.isfinite(s).all() and (s > 0).all() and torch.isfinite(q.float()).all()
        exact = w.double() / s.double()[:, None]
        err = (q.double() - exact).abs()
        assert (err <= exact.abs() * 2**-4 + 2**-10).all()
        live = amax >= 1e-12  # rows below the floor (zero rows, the 1e-30 weight) quantise to zeros
        assert torch.equal(q.float().abs().amax(dim=1)[live], torch.full_like(s[live], E4M3_MAX))
        assert (q.float()[~live] == 0).all()


def test_kernel_fp8_rows_found_inf_writes_nothing():
    weights = _weights()
    for backend in ("triton", "reference"):
        qs, scales = _buffers(weights)
        before = [q.view(torch.uint8).clone() for q in qs], [s.clone() for s in scales]
        fp8_rows_(weights, qs, scales, found_inf=torch.ones((), device=DEVICE), backend=backend)
        for q, s, q0, s0 in zip(qs, scales, *before):
            assert torch.equal(q.view(torch.uint8), q0) and torch.equal(s, s0), backend
        fp8_rows_(weights, qs, scales, found_inf=torch.zeros((), device=DEVICE), backend=backend)
        want_q, want_s = _buffers(weights)
        fp8_rows_reference(weights, want_q, want_s)
        for q, s, wq, ws in zip(qs, scales, want_q, want_s):
            _same(q, s, wq, ws, backend)


def test_kernel_fp8_rows_tables_built_once_and_follow_new_tensors():
    weights = [rand(9, 32), rand(16, 48)]
    qs, scales = _buffers(weights)
    fp8_rows_(weights, qs, scales, backend="triton")
    built = fp8_rows.BUILDS["tables"]
    for _ in range(3):
        with torch.no_grad():
            for w in weights:
                w.mul_(1.5)
        fp8_rows_(weights, qs, scales, backend="triton")
    assert fp8_rows.BUILDS["tables"] == built  # the same tensors: the cached tables
    want_q, want_s = _buffers(weights)
    fp8_rows_reference(weights, want_q, want_s)
    for q, s, wq, ws in zip(qs, scales, want_q, want_s):
        _same(q, s, wq, ws, "after in-place updates")
    other = [rand(9, 32)]  # a new tensor: a new table
    q2, s2 = _buffers(other)
    fp8_rows_(other, q2, s2, backend="triton")
    assert fp8_rows.BUILDS["tables"] == built + 1
    wq, ws = _buffers(other)
    fp8_rows_reference(other, wq, ws)
    _same(q2[0], s2[0], wq[0], ws[0], "a new tensor")


def test_rows_to_fp8_is_the_same_cast_for_activations():
    x = rand(2, 5, 64, dtype=torch.bfloat16)
    x[1, 3] = 0
    q, scale = rows_to_fp8(x)
    assert q.dtype == FP8 and q.shape == x.shape and scale.shape == (2, 5, 1) and scale.dtype == torch.float32
    wq, ws = _buffers([x.reshape(10, 64).float()])
    fp8_rows_reference([x.reshape(10, 64).float()], wq, ws)
    _same(q.reshape(10, 64), scale.reshape(10), wq[0], ws[0], "activation rows")


def test_fp8_rows_rejects_mismatched_buffers():
    w = rand(4, 16)
    with pytest.raises(TypeError, match="2-D fp32"):
        fp8_rows_([w.bfloat16()], [torch.empty(4, 16, device=DEVICE, dtype=FP8)], [torch.empty(4, device=DEVICE)])
    with pytest.raises(ValueError, match="float8_e4m3fn buffer of shape"):
        fp8_rows_([w], [torch.empty(4, 16, device=DEVICE)], [torch.empty(4, device=DEVICE)])
    with pytest.raises(ValueError, match=r"scale buffer of shape \(4,\)"):
        fp8_rows_([w], [torch.empty(4, 16, device=DEVICE, dtype=FP8)], [torch.empty(4, 1, device=DEVICE)])
    with pytest.raises(ValueError, match="1 weights, 0 fp8 buffers"):
        fp8_rows_([w], [], [])


def test_kernel_fp8_rows_rounds_every_value_and_tie_as_torch():
    """Rows whose amax is 448 have scale 1 (w / scale == w), so the kernel's float8 bits are those of
    torch's cast of the values themselves: every finite e4m3 value, every midpoint between two
    neighbours (ties to even, carries into the exponent, subnormals) and the fp32 numbers either
    side of each midpoint."""
    vals = torch.arange(256, dtype=torch.uint8).view(FP8).float()
    vals = vals[torch.isfinite(vals)].unique()
    mids = (vals[1:] + vals[:-1]) / 2
    x = torch.cat([vals, mids, torch.nextafter(mids, torch.tensor(1e9)), torch.nextafter(mids, torch.tensor(-1e9)),
                   torch.tensor([-0.0, 1e-40, -1e-45, 2.0**-10, -(2.0**-10)])])
    cols = 64
    x = torch.cat([x, torch.zeros(-x.numel() % (cols - 1))]).reshape(-1, cols - 1)
    w = torch.cat([torch.full((x.shape[0], 1), E4M3_MAX), x], dim=1).to(DEVICE)
    qs, scales = _buffers([w])
    fp8_rows_([w], qs, scales, backend="triton")
    assert (scales[0] == 1.0).all()
    assert torch.equal(qs[0].view(torch.uint8), w.to(FP8).view(torch.uint8))
