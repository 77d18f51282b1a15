"""Packed (variable-length) layout of a batch's masks: no padding anywhere.

``pack(masks)`` turns a ``MaskBatch`` into ``PackedMasks``: the real context indices of all
M * B context sequences concatenated, their ``VarlenMeta``, and the predictor's packed plan (one
sequence per target block and context: the context rows, then the target block's mask tokens).
It is integer bookkeeping, cheap on the CPU: the trainer packs each batch there before moving it
to the GPU, so the step itself needs no host synchronisation for it.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from ..kernels.predictor_tokens import PackedPlan, plan
from ..masks import MaskBatch
from ..models.varlen import VarlenMeta


class PackedMasks(NamedTuple):
    ctx_idx: torch.Tensor  # [Tc] patch indices; sequence m * B + b, concatenated
    ctx_meta: VarlenMeta  # cu_seqlens [M * B + 1], longest context
    targets: torch.Tensor  # [K, B, Lt] (every target block of a batch has Lt positions)
    pred_plan: PackedPlan  # the predictor's packed layout

    @property
    def batch_size(self) -> int:
        return self.targets.shape[1]

    @property
    def num_context(self) -> int:
        """Context blocks per image (M; dummy sequences of a bucketed batch not counted)."""
        k, b, _ = self.targets.shape
        return self.pred_plan.target_rows.shape[0] // (k * b)

    def to(self, device, non_blocking: bool = False) -> PackedMasks:
        meta = VarlenMeta(self.ctx_meta.cu_seqlens.to(device, non_blocking=non_blocking), self.ctx_meta.max_seqlen)
        return PackedMasks(self.ctx_idx.to(device, non_blocking=non_blocking), meta,
                           self.targets.to(device, non_blocking=non_blocking),
                           self.pred_plan.to(device, non_blocking=non_blocking))


def pack(masks: MaskBatch) -> PackedMasks:
    """The packed layout of a batch (padding removed)."""
    if masks.target_lens is not None:
        raise ValueError("packing needs target blocks of one size per batch (as both samplers draw them)")
    m, b, lc = masks.context.shape
    k, _, lt = masks.targets.shape
    flat = masks.context.reshape(m * b, lc)
    if masks.context_lens is None:
        lens = torch.full((m * b,), lc, dtype=torch.int64, device=flat.device)
        idx = flat.reshape(-1)
    else:
        lens = masks.context_lens.reshape(m * b).long()
        idx = flat[torch.arange(lc, device=flat.device)[None, :] < lens[:, None]]
    meta = VarlenMeta.from_lengths(lens)
    pred = plan(idx, meta.cu_seqlens, masks.targets.reshape(k * b, lt), k, max_context=meta.max_seqlen)
    return PackedMasks(idx, meta, masks.targets, pred)
