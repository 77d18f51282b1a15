"""Every Triton kernel against its pure-torch reference (outputs and gradients).

On a machine without a GPU the kernels run under Triton's interpreter (set in conftest). The
kernels load, upcast to fp32, compute and round once when storing, so a kernel fed bf16 tensors
is compared with the fp32 reference evaluated on the same bf16 values: fp32 results must agree to
fp32 rounding, bf16 results to one bf16 rounding.
"""
import pytest
import torch
from conftest import DEVICE
from ijepa_fast.kernels.dispatch import triton_version, use_triton
from ijepa_fast.kernels.ema import ema_reference, ema_update_
from ijepa_fast.kernels.gather_layernorm import gather_layernorm, gather_layernorm_reference
from ijepa_fast.kernels.gather_tokens import (
    gather_tokens,
    gather_tokens_packed,
    gather_tokens_packed_reference,
    gather_tokens_reference,
)
from ijepa_fast.kernels.jepa_loss import jepa_loss, jepa_loss_reference
from ijepa_fast.kernels.predictor_tokens import predictor_tokens, predictor_tokens_reference

pytestmark = pytest.mark.skipif(triton_version() is None, reason="Triton is not installed (pip install triton)")

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


# ---------------------------------------------------------------------------------------------
# EMA

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


# ---------------------------------------------------------------------------------------------
# gather_tokens

def _idx(rows, n, length):
    return torch.stack([torch.randperm(n, device=DEVICE)[:length] for _ in range(rows)])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,n,d,m,length", [(1, 16, 80, 1, 5), (3, 30, 1280, 2, 7), (2, 9, 1408, 1, 1),
                                            (2, 12, 80, 1, 0)])
@pytest.mark.parametrize("with_lens", [False, True])
def test_kernel_gather_tokens_forward_backward(dtype, b, n, d, m, length, with_lens):
    pos = rand(n, d)
    idx = _idx(m * b, n, length)
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
        gather_tokens(rand(1, 4, 8), _idx(1, 4, 2), rand(4, 8).requires_grad_(), backend="triton")


# ---------------------------------------------------------------------------------------------
# gather_layernorm

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,n,d,rows,length", [(1, 16, 80, 4, 1), (2, 30, 1280, 8, 6), (3, 20, 1408, 12, 5),
                                               (2, 10, 80, 8, 0)])
def test_kernel_gather_layernorm(dtype, b, n, d, rows, length):
    h = (rand(b, n, d, scale=3.0) + 0.5).to(dtype)
    idx = _idx(rows, n, length)
    out = gather_layernorm(h, idx, backend="triton")
    assert out.shape == (rows, length, d) and out.dtype == dtype
    check(out, gather_layernorm_reference(up(h), idx), "gather_layernorm", 1e-5)


# ---------------------------------------------------------------------------------------------
# predictor_tokens

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


# ---------------------------------------------------------------------------------------------
# jepa_loss

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


# ---------------------------------------------------------------------------------------------
# dispatch and the engine with every kernel on

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


def test_kernel_golden_step_reference_with_kernels_forced_on():
    """The reference's golden step, with every fused op running its Triton kernel."""
    from test_reference_golden import PAIRS, compare, run_golden_step

    for p in PAIRS:
        gold, out = run_golden_step(*p.values, attn="math", kernels="triton", device=DEVICE)
        bad = compare(gold, out)
        assert not bad, "golden step with kernels differs:\n" + "\n".join(bad)


def test_kernel_engine_step_matches_reference_path_with_padding():
    """A default-mode (padded) batch: the whole loss and every gradient, kernels vs references."""
    from ijepa_fast.config import MaskConfig
    from ijepa_fast.masks import MultiBlockSampler
    from ijepa_fast.step import IJEPA

    torch.manual_seed(0)
    model = IJEPA.build("custom", img_size=32, patch_size=4, pred_depth=1, pred_dim=24, embed_dim=48, depth=1,
                        num_heads=3, attn="math").to(DEVICE)
    sampler = MultiBlockSampler(model.grid, MaskConfig(min_keep=4, num_context=2), seed=1)
    masks = next(mb for mb in (sampler.sample(3, s) for s in range(40)) if mb.context_lens is not None).to(DEVICE)
    images = rand(3, 3, 32, 32)
    params = [p for p in model.parameters() if p.requires_grad]
    results = {}
    for backend in ("reference", "triton"):
        model.configure_kernels(backend)
        loss = model.loss(images, masks)
        results[backend] = (loss, torch.autograd.grad(loss, params))
    (l_ref, g_ref), (l_tri, g_tri) = results["reference"], results["triton"]
    torch.testing.assert_close(l_tri, l_ref, rtol=1e-5, atol=1e-7)
    for a, b in zip(g_tri, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_kernel_benchmark_script_runs_every_case(tmp_path):
    """bench_kernels.py stays runnable: every op and provider once, on tiny sizes."""
    import json
    import subprocess
    import sys

    from conftest import ROOT

    out = tmp_path / "k.jsonl"
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_kernels.py"), "--device", DEVICE, "--models",
                        "tiny", "--repeats", "1", "--out", str(out), "--md", str(tmp_path / "k.md")],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    ops = {(r["op"], r["provider"]) for r in rows if r["bench"] == "kernels"}
    for op in ("ema", "gather_tokens fwd", "gather_tokens bwd", "gather_layernorm", "predictor_tokens fwd",
               "predictor_tokens bwd", "jepa_loss fwd+bwd"):
        assert (op, "triton") in ops
    assert "| model | op |" in (tmp_path / "k.md").read_text()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lengths,k,b,lt,dp", [([3, 0, 5], 4, 3, 4, 80), ([7, 2, 1, 4], 3, 2, 5, 384),
                                               ([1], 2, 1, 1, 1408)])
def test_kernel_predictor_tokens_packed(dtype, lengths, k, b, lt, dp):
    from ijepa_fast.kernels.predictor_tokens_packed import predictor_tokens_packed, predictor_tokens_packed_reference

    from ijepa_fast.models.varlen import VarlenMeta

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


def test_kernel_packed_engine_step_matches_references():
    from ijepa_fast.config import MaskConfig
    from ijepa_fast.masks import MultiBlockSampler
    from ijepa_fast.step import IJEPA

    torch.manual_seed(0)
    model = IJEPA.build("custom", img_size=32, patch_size=4, pred_depth=1, pred_dim=24, embed_dim=48, depth=1,
                        num_heads=3, attn="math").to(DEVICE).configure_layout("packed", "math")
    masks = MultiBlockSampler(model.grid, MaskConfig(min_keep=4), seed=2).sample(3, 5).to(DEVICE)
    images = rand(3, 3, 32, 32)
    params = [p for p in model.parameters() if p.requires_grad]
    res = {}
    for backend in ("reference", "triton"):
        loss = model.configure_kernels(backend).loss(images, masks)
        res[backend] = (loss, torch.autograd.grad(loss, params))
    torch.testing.assert_close(res["triton"][0], res["reference"][0], rtol=1e-5, atol=1e-7)
    for a, b in zip(res["triton"][1], res["reference"][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
