"""The I-JEPA predictor: a narrow ViT that predicts target-block features from context features.

For each target block separately, the sequence is ``[context tokens ; mask tokens at the block's
positions]``; the blocks never attend to each other. Output rows are block-major: with M context
blocks and K target blocks, row ``(k * M + m) * B + b`` is target block k predicted from context
block m of image b.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..kernels.predictor_tokens import predictor_tokens, predictor_tokens_packed
from .attention import key_mask_from_lengths
from .layers import Block, rescale_residual_projections, trunc_normal_, trunc_normal_init
from .norm import LayerNorm
from .pos_embed import interpolate_pos_embed, sincos_2d
from .vit import as_pair


class VisionTransformerPredictor(nn.Module):
    def __init__(self, grid, embed_dim: int = 768, predictor_embed_dim: int = 384, depth: int = 6,
                 num_heads: int = 12, mlp_ratio: float = 4.0, qkv_bias: bool = True, norm_eps: float = 1e-6,
                 init_std: float = 0.02, attn_impl: str = "sdpa"):
        super().__init__()
        self.grid = as_pair(grid)
        self.predictor_embed = nn.Linear(embed_dim, predictor_embed_dim, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, predictor_embed_dim))
        table = sincos_2d(predictor_embed_dim, self.grid).unsqueeze(0)
        self.predictor_pos_embed = nn.Parameter(table, requires_grad=False)
        self.predictor_blocks = nn.ModuleList(
            Block(predictor_embed_dim, num_heads, mlp_ratio, qkv_bias, norm_eps, attn_impl) for _ in range(depth))
        self.predictor_norm = LayerNorm(predictor_embed_dim, eps=norm_eps)
        self.predictor_proj = nn.Linear(predictor_embed_dim, embed_dim, bias=True)
        self.init_std = init_std
        self.kernels = "auto"  # kernel backend of the fused ops (see ijepa_fast.kernels.dispatch)
        trunc_normal_(self.mask_token, init_std)
        self.apply(lambda m: trunc_normal_init(m, init_std))
        rescale_residual_projections(self.predictor_blocks)

    @property
    def stream_dtype(self) -> torch.dtype:
        """The weights' dtype: fp32 on the plain path, bf16 on the lean step's compute copy."""
        return self.predictor_norm.weight.dtype

    def forward(self, z: torch.Tensor, context: torch.Tensor, targets: torch.Tensor,
                context_lens: torch.Tensor | None = None, target_lens: torch.Tensor | None = None,
                grid: tuple[int, int] | None = None) -> torch.Tensor:
        """Predict target features.

        z: [M * B, Lc, D] context-encoder output; context: [M, B, Lc] and targets: [K, B, Lt] patch
        indices; context_lens / target_lens: optional [M, B] / [K, B] numbers of real indices (the
        rest is padding). Returns [K * M * B, Lt, D].
        """
        m, b, lc = context.shape
        k, _, lt = targets.shape
        pos = interpolate_pos_embed(self.predictor_pos_embed, self.grid, grid or self.grid)[0].detach()
        x = predictor_tokens(self.predictor_embed(z), context.reshape(m * b, lc), targets.reshape(k * b, lt),
                             self.mask_token, pos, k, backend=self.kernels)  # [K * M * B, Lc + Lt, Dp]
        x = x.to(self.stream_dtype)  # the fp32 sin-cos rows were added in fp32: one rounding (lean step)
        key_valid = self._key_valid(context_lens, target_lens, k, m, b, lc, lt)
        for blk in self.predictor_blocks:
            x = blk(x, key_valid)
        x = self.predictor_norm(x[:, lc:])
        return self.predictor_proj(x)

    def forward_packed(self, z: torch.Tensor, packed, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """Predict target features from packed context features: z [Tc, D], ``packed`` a
        PackedMasks. One packed sequence per (target block, context); returns [K * M * B, Lt, D]."""
        from .varlen import VarlenMeta

        k = packed.targets.shape[0]
        pos = interpolate_pos_embed(self.predictor_pos_embed, self.grid, grid or self.grid)[0].detach()
        p = packed.pred_plan
        x, _ = predictor_tokens_packed(self.predictor_embed(z), packed.ctx_idx, packed.ctx_meta.cu_seqlens,
                                       packed.targets.reshape(k * packed.batch_size, -1), self.mask_token, pos, k,
                                       backend=self.kernels, packed_plan=p)
        x = x.to(self.stream_dtype)
        meta = VarlenMeta(p.cu_seqlens, p.max_seqlen)
        for blk in self.predictor_blocks:
            x = blk(x, None, meta)
        x = self.predictor_norm(x[p.target_rows])  # [K * M * B, Lt, Dp]
        return self.predictor_proj(x)

    @staticmethod
    def _key_valid(context_lens, target_lens, k, m, b, lc, lt):
        """bool [K * M * B, Lc + Lt], False at padding; None when nothing is padded."""
        if context_lens is None and target_lens is None:
            return None
        ref = context_lens if context_lens is not None else target_lens
        ctx_len = context_lens if context_lens is not None else torch.full((m, b), lc, device=ref.device)
        tgt_len = target_lens if target_lens is not None else torch.full((k, b), lt, device=ref.device)
        ctx = key_mask_from_lengths(ctx_len.reshape(m * b), lc).repeat(k, 1)
        tgt = key_mask_from_lengths(tgt_len.reshape(k * b), lt).reshape(k, 1, b, lt).expand(k, m, b, lt)
        return torch.cat([ctx, tgt.reshape(k * m * b, lt)], dim=1)


def build_predictor(grid, embed_dim: int, num_heads: int, predictor_embed_dim: int = 384, depth: int = 6,
                    **kw) -> VisionTransformerPredictor:
    return VisionTransformerPredictor(grid, embed_dim=embed_dim, predictor_embed_dim=predictor_embed_dim,
                                      depth=depth, num_heads=num_heads, **kw)
