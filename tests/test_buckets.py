"""Token buckets: a few fixed sizes, the same loss and gradients, no recompiles after warm-up."""
import pytest
import torch

from ijepa_fast.config import MaskConfig
from ijepa_fast.masks import MultiBlockSampler
from ijepa_fast.model import IJEPA
from ijepa_fast.perf import buckets
from ijepa_fast.perf.buckets import bucket, bucket_packed, bucket_padded, shape_key
from ijepa_fast.perf.packing import PackedMasks, pack


def _model(**kw):
    torch.manual_seed(0)
    return IJEPA.build("custom", img_size=32, patch_size=4, pred_depth=2, pred_dim=24, embed_dim=48, depth=2,
                       num_heads=3, **kw)


def _masks(mode, step, batch=4, seed=1):
    return MultiBlockSampler((8, 8), MaskConfig(mode=mode, min_keep=4), seed=seed).sample(batch, step)


def _grads(model, images, masks):
    params = [p for p in model.parameters() if p.requires_grad]
    loss = model.loss(images, masks)
    return loss, torch.autograd.grad(loss, params)


@pytest.mark.parametrize("per_octave", [1, 2, 4, 8])
def test_bucket_is_the_smallest_size_of_the_ladder_not_below(per_octave):
    ladder = sorted({j * (2 ** k) // per_octave for k in range(1, 20) for j in range(per_octave, 2 * per_octave + 1)
                     if (j * 2 ** k) % per_octave == 0} | {1, 2})
    for n in list(range(1, 600)) + [4992, 12672, 19575, 96220]:
        want = next(s for s in ladder if s >= n)
        got = bucket(n, per_octave)
        assert got == want, (n, got, want)
        assert bucket(got, per_octave) == got  # idempotent
        assert got - n <= max(0, got // (per_octave + 1))  # under 1 / (per_octave + 1) of the bucket is padding
    with pytest.raises(ValueError, match="per doubling"):
        bucket(10, 3)


@pytest.mark.parametrize("mode", ["default", "reference"])
def test_bucketed_padded_layout_equals_unbucketed(mode):
    model = _model().configure_layout("padded")
    for step in (0, 5, 11):
        masks = _masks(mode, step)
        images = torch.randn(4, 3, 32, 32)
        model.token_buckets = 0
        l0, g0 = _grads(model, images, masks)
        model.token_buckets = 4
        prepared = model.prepare(masks)
        assert prepared.context.shape[2] == bucket(masks.context.shape[2], 4)
        lc, lt = prepared.context.shape[2], prepared.targets.shape[2]
        assert lc + lt == bucket(lc + lt, 4) and (lc, lt) != masks.context.shape[2:] + masks.targets.shape[2:]
        l1, g1 = _grads(model, images, masks)
        torch.testing.assert_close(l1, l0, rtol=1e-6, atol=0)
        for a, b in zip(g1, g0):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
        assert model.prepare(prepared) is not None and shape_key(model.prepare(prepared)) == shape_key(prepared)


@pytest.mark.parametrize("varlen", ["padded", "math"])
def test_bucketed_packed_layout_equals_unbucketed(varlen):
    model = _model().configure_layout("packed", varlen)
    for step, mode in ((0, "default"), (3, "default"), (8, "reference")):
        masks = _masks(mode, step)
        images = torch.randn(4, 3, 32, 32)
        l0, g0 = _grads(model, images, masks)
        packed = pack(masks)
        b = bucket_packed(packed, 4)
        assert b.ctx_idx.numel() == bucket(packed.ctx_idx.numel(), 4) > 0
        assert b.pred_plan.src.numel() == bucket(packed.pred_plan.src.numel() + 1, 4)
        assert b.num_context == packed.num_context and b.ctx_meta.num_seqs > packed.ctx_meta.num_seqs
        assert int(b.ctx_meta.lengths.max()) <= b.ctx_meta.max_seqlen == bucket(packed.ctx_meta.max_seqlen, 1)
        assert int(b.pred_plan.cu_seqlens[-1]) == b.pred_plan.src.numel()
        pl = b.pred_plan.cu_seqlens[1:] - b.pred_plan.cu_seqlens[:-1]
        assert int(pl.max()) <= b.pred_plan.max_seqlen
        l1, g1 = _grads(model, images, b)
        torch.testing.assert_close(l1, l0, rtol=1e-6, atol=0)
        for x, y in zip(g1, g0):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-7)


def test_prepare_buckets_in_the_model_layout():
    model = _model().configure_layout("packed", "padded")
    model.token_buckets = 2
    masks = _masks("default", 2)
    p = model.prepare(masks)
    assert isinstance(p, PackedMasks) and p.ctx_idx.numel() == bucket(int(masks.context_lens.sum()), 2)
    assert model.prepare(p) is p
    model.configure_layout("auto")  # on the CPU: padded; a bucketed padded batch is not packed again
    q = model.prepare(masks)
    assert q.target_lens is not None and shape_key(model.prepare(q)) == shape_key(q)
    model.token_buckets = 0
    assert model.prepare(masks) is masks


def test_padding_fraction_counts_the_padded_rows():
    masks = _masks("default", 4)
    real_c = int(masks.context_lens.sum())
    k, b, lt = masks.targets.shape
    packed = pack(masks)
    assert buckets.padding_fraction(masks, packed) == pytest.approx(0.0, abs=1e-12)
    pb = bucket_packed(packed, 4)
    pad = pb.ctx_idx.numel() - real_c + pb.pred_plan.src.numel() - packed.pred_plan.src.numel()
    assert buckets.padding_fraction(masks, pb) == pytest.approx(pad / (pb.ctx_idx.numel() + pb.pred_plan.src.numel()))
    padded = bucket_padded(masks, 4)
    m, _, lc = padded.context.shape
    total = m * b * lc + k * m * b * (lc + padded.targets.shape[2])
    real = real_c + k * (real_c + m * b * lt)
    assert buckets.padding_fraction(masks, padded) == pytest.approx(1 - real / total)
