"""Token buckets: a batch's variable token counts rounded up to a few fixed sizes, so that every
transformer block sees a small, fixed set of tensor shapes (``perf.token_buckets``; torch.compile
then compiles each shape once, with static shapes, and never again).

``bucket(n, per_octave)`` rounds ``n`` up to the next of ``per_octave`` evenly spaced sizes in
each doubling: with 4, ... 64, 80, 96, 112, 128, 160, 192, 224, 256, 320 ...; at most 1 / per_octave
of the rounded count is padding. Rounding is idempotent: a bucketed batch passes through unchanged.

The padding never changes the result:

- padded layout (``bucket_padded``): the context rows are padded to the bucket of the longest
  context, and the target rows so that context + targets, the predictor's sequence, is a bucket
  too; padded positions are masked out of attention (``context_lens`` / ``target_lens``) and out
  of the loss, exactly as the batch's own padding is;
- packed layout (``bucket_packed``): the encoder's and the predictor's total token counts are
  padded with dummy sequences (each no longer than the longest real one, their number fixed per
  bucket), and ``max_seqlen`` is rounded up to a power of two. A dummy sequence attends only to
  itself and is never read by the loss, so its gradient is exactly zero; the dummy context rows
  send their (zero) predictor gradient to a dummy predictor row.

Loss and every gradient equal the unbucketed step's (up to the summation order of the larger
tensors; tests/test_buckets.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..kernels.predictor_tokens import PackedPlan
from ..masks import MaskBatch
from ..models.varlen import VarlenMeta
from .packing import PackedMasks

PER_OCTAVE = (0, 1, 2, 4, 8, 16)  # 0: off


def _step(n: int, per_octave: int) -> int:
    """The spacing of the buckets in the doubling (2^k, 2^(k+1)] that holds n."""
    if n <= 2:
        return 1
    k = (n - 1).bit_length() - 1
    return max(1, (1 << k) // per_octave)


def bucket(n: int, per_octave: int) -> int:
    """``n`` rounded up to the next bucket size (see the module docstring); n <= 2 stays."""
    if per_octave not in PER_OCTAVE[1:]:
        raise ValueError(f"buckets per doubling must be one of {PER_OCTAVE[1:]}, got {per_octave}")
    if n <= 2:
        return n
    s = _step(n, per_octave)
    return -(-n // s) * s


def bucket_padded(masks: MaskBatch, per_octave: int) -> MaskBatch:
    """Pad the context rows to a bucket and the target rows so that (context + targets) is one."""
    m, b, lc = masks.context.shape
    k, _, lt = masks.targets.shape
    lc_b = bucket(lc, per_octave)
    lt_b = bucket(lc_b + lt, per_octave) - lc_b
    dev = masks.context.device
    ctx_lens = masks.context_lens if masks.context_lens is not None else torch.full((m, b), lc, device=dev)
    tgt_lens = masks.target_lens if masks.target_lens is not None else torch.full((k, b), lt, device=dev)
    return MaskBatch(F.pad(masks.context, (0, lc_b - lc)), F.pad(masks.targets, (0, lt_b - lt)),
                     ctx_lens, tgt_lens)  # padding indices are 0, as the sampler's


def _dummy_cu(cu: torch.Tensor, pad: int, count: int, longest: int) -> torch.Tensor:
    """cu_seqlens extended by ``count`` dummy sequences holding ``pad`` rows, none longer than
    ``longest`` (the last ones may be empty)."""
    lens = torch.zeros(count, dtype=torch.int64, device=cu.device)
    full, rest = divmod(pad, longest)
    lens[:full] = longest
    if rest:
        lens[full] = rest
    return torch.cat([cu, (cu[-1].long() + torch.cumsum(lens, 0)).to(cu.dtype)])


def bucket_packed(packed: PackedMasks, per_octave: int) -> PackedMasks:
    """Pad the packed encoder and predictor token counts to buckets with dummy sequences."""
    tc = packed.ctx_idx.numel()
    tc_b = bucket(tc, per_octave)
    pad_c = tc_b - tc
    msl_c = bucket(max(packed.ctx_meta.max_seqlen, 1), 1)
    n_c = -(-_step(tc_b, per_octave) // msl_c)  # enough for any pad of this bucket (pad < step)
    ctx_idx = F.pad(packed.ctx_idx, (0, pad_c))
    ctx_meta = VarlenMeta(_dummy_cu(packed.ctx_meta.cu_seqlens, pad_c, n_c, msl_c), msl_c)

    p = packed.pred_plan
    tp = p.src.numel()
    tp_b = bucket(tp + 1, per_octave)  # at least one dummy row: the dummy context rows' destination
    pad_p = tp_b - tp
    msl_p = bucket(max(p.max_seqlen, 1), 1)
    n_p = -(-_step(tp_b, per_octave) // msl_p)  # pad_p <= step
    plan = PackedPlan(F.pad(p.src, (0, pad_p), value=-1), F.pad(p.pos_idx, (0, pad_p)),
                      F.pad(p.dst_ctx, (0, pad_c), value=tp_b - 1), p.target_rows,
                      _dummy_cu(p.cu_seqlens, pad_p, n_p, msl_p), msl_p)
    return PackedMasks(ctx_idx, ctx_meta, packed.targets, plan)


def apply(masks, per_octave: int):
    """``masks`` (a prepared MaskBatch or PackedMasks) with its token counts bucketed."""
    if not per_octave:
        return masks
    if isinstance(masks, PackedMasks):
        return bucket_packed(masks, per_octave)
    return bucket_padded(masks, per_octave)


def shape_key(masks) -> tuple:
    """Every size a prepared batch gives the transformer blocks (one compiled graph per key)."""
    if isinstance(masks, PackedMasks):
        p = masks.pred_plan
        return ("packed", masks.ctx_idx.numel(), masks.ctx_meta.num_seqs, masks.ctx_meta.max_seqlen,
                p.src.numel(), p.cu_seqlens.numel(), p.max_seqlen)
    return ("padded", tuple(masks.context.shape), tuple(masks.targets.shape))


def padding_fraction(raw: MaskBatch, prepared) -> float:
    """The fraction of the blocks' token rows (encoder and predictor) that are padding."""
    real_c = raw.mean_tokens()[0] * raw.batch_size
    k, b, lt = raw.targets.shape
    m = raw.context.shape[0]
    real = real_c + k * (real_c + m * b * lt)  # the predictor holds K copies of each context
    if isinstance(prepared, PackedMasks):
        total = prepared.ctx_idx.numel() + prepared.pred_plan.src.numel()
    else:
        mm, bb, lc = prepared.context.shape
        kk, _, lt_b = prepared.targets.shape
        total = mm * bb * lc + kk * mm * bb * (lc + lt_b)
    return 1.0 - real / total
