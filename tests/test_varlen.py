"""Packed variable-length sequences: every attention backend present against per-sequence dense
attention, and the packed step against the padded one (losses and gradients)."""
import pytest
import torch
from conftest import DEVICE

from ijepa_fast.config import MaskConfig
from ijepa_fast.masks import MultiBlockSampler
from ijepa_fast.model import IJEPA
from ijepa_fast.models.varlen import VarlenMeta, attention_varlen, attention_varlen_reference, available
from ijepa_fast.perf.packing import pack

BACKENDS = ["flash_attn", "torch_varlen", "xformers", "nested", "padded"]


def dense_per_sequence(q, k, v, meta):
    """Independent expectation: SDPA on each sequence alone."""
    outs = []
    cu = meta.cu_seqlens.tolist()
    for a, b in zip(cu[:-1], cu[1:]):
        if b > a:
            x = [t[a:b].transpose(0, 1).float() for t in (q, k, v)]
            outs.append(torch.nn.functional.scaled_dot_product_attention(*x).transpose(0, 1))
    return torch.cat(outs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lengths", [[3, 0, 5, 1, 7], [1], [16, 16]])
def test_varlen_backend_matches_dense_attention(backend, lengths):
    dtype = torch.float32 if DEVICE == "cpu" else torch.bfloat16
    probe = torch.zeros(1, device=DEVICE, dtype=dtype)
    if not available(backend, probe):
        pytest.skip(f"{backend} cannot run on {DEVICE} / {dtype} here")
    meta = VarlenMeta.from_lengths(torch.tensor(lengths, device=DEVICE))
    t = sum(lengths)
    q, k, v = (torch.randn(t, 3, 16, device=DEVICE, dtype=dtype, requires_grad=True) for _ in range(3))
    out = attention_varlen(q, k, v, meta, backend)
    ref = dense_per_sequence(q, k, v, meta)
    tol = 2e-6 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol)
    g = torch.randn_like(ref)
    grads = torch.autograd.grad(out.float(), (q, k, v), g)
    grads_ref = torch.autograd.grad(ref, (q, k, v), g)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a.float(), b.float(), rtol=tol * 5, atol=tol * 5)


def test_varlen_reference_and_auto_choice():
    meta = VarlenMeta.from_lengths(torch.tensor([2, 4]))
    q, k, v = (torch.randn(6, 2, 8) for _ in range(3))
    torch.testing.assert_close(attention_varlen_reference(q, k, v, meta), dense_per_sequence(q, k, v, meta))
    torch.testing.assert_close(attention_varlen(q, k, v, meta, "auto"), dense_per_sequence(q, k, v, meta))
    with pytest.raises(RuntimeError, match="cannot run here"):
        attention_varlen(q, k, v, meta, "flash_attn")


def _model(attn="math"):
    torch.manual_seed(0)
    return IJEPA.build("custom", img_size=32, patch_size=4, pred_depth=2, pred_dim=24, embed_dim=48, depth=2,
                       num_heads=3, attn=attn).to(DEVICE)


@pytest.mark.parametrize("num_context", [1, 2])
@pytest.mark.parametrize("varlen", ["nested", "padded", "math"])
def test_varlen_packed_step_equals_padded_step(num_context, varlen):
    """No truncation, no padding: the packed step gives the padded step's loss and gradients."""
    model = _model()
    s = MultiBlockSampler(model.grid, MaskConfig(min_keep=4, num_context=num_context), seed=1)
    masks = next(mb for mb in (s.sample(3, st) for st in range(40)) if mb.context_lens is not None).to(DEVICE)
    packed = pack(masks)
    assert packed.ctx_idx.numel() == int(masks.context_lens.sum())  # every real token, nothing else
    images = torch.randn(3, 3, 32, 32, device=DEVICE)
    params = [p for p in model.parameters() if p.requires_grad]
    model.configure_layout("padded")
    l_pad = model.loss(images, masks)
    g_pad = torch.autograd.grad(l_pad, params)
    model.configure_layout("packed", varlen)
    l_pack = model.loss(images, masks)
    g_pack = torch.autograd.grad(l_pack, params)
    torch.testing.assert_close(l_pack, l_pad, rtol=1e-6, atol=1e-8)
    for a, b in zip(g_pack, g_pad):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_varlen_golden_reference_step_through_packed_path():
    """The reference's golden step (equal lengths) through the packed layout, fp32 on the CPU: outputs,
    losses, every gradient and the update rule (the end-to-end state after AdamW is checked on the
    dense layout only: the packed matmuls sum in another order, see run_golden_step)."""
    from test_reference_golden import PAIRS, compare, run_golden_step

    for p in PAIRS:
        gold, out = run_golden_step(*p.values, attn="math", layout="packed")
        bad = compare(gold, out)
        assert not bad, "golden step through the packed path differs:\n" + "\n".join(bad)


def test_varlen_auto_layout_packs_only_variable_lengths():
    model = _model()
    ref = MultiBlockSampler(model.grid, MaskConfig(mode="reference", min_keep=4))(2)
    dflt = next(mb for mb in (MultiBlockSampler(model.grid, MaskConfig(min_keep=4)).sample(4, s) for s in range(40))
                if mb.context_lens is not None)
    from ijepa_fast.perf.packing import PackedMasks

    assert not isinstance(model.prepare(ref), PackedMasks)
    fused = DEVICE == "cuda" and model._fused_varlen()
    assert isinstance(model.prepare(dflt), PackedMasks) == fused  # CPU: padding beats nested tensors
    model.configure_layout("packed")
    assert isinstance(model.prepare(dflt), PackedMasks) and isinstance(model.prepare(ref), PackedMasks)
