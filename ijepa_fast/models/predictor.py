"""The I-JEPA predictor: a narrow ViT that predicts target-block features from context features.

For each target block separately, the sequence is ``[context tokens ; mask tokens at the block's
positions]``; the blocks never attend to each other. Output rows are block-major: with M context
blocks and K target blocks, row ``(k * M + m) * B + b`` is target block k predicted from context
block m of image b.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .layers import Block, rescale_residual_projections, trunc_normal_, trunc_normal_init
from .pos_embed import interpolate_pos_embed, sincos_2d
from .vit import as_pair, gather_tokens


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
        self.predictor_norm = nn.LayerNorm(predictor_embed_dim, eps=norm_eps)
        self.predictor_proj = nn.Linear(predictor_embed_dim, embed_dim, bias=True)
        self.init_std = init_std
        trunc_normal_(self.mask_token, init_std)
        self.apply(lambda m: trunc_normal_init(m, init_std))
        rescale_residual_projections(self.predictor_blocks)

    def forward(self, z: torch.Tensor, context: torch.Tensor, targets: torch.Tensor,
                context_valid: torch.Tensor | None = None, target_valid: torch.Tensor | None = None,
                grid: tuple[int, int] | None = None) -> torch.Tensor:
        """Predict target features.

        z: [M * B, Lc, D] context-encoder output; context: [M, B, Lc] and targets: [K, B, Lt] patch
        indices; context_valid / target_valid: optional bool [M, B, Lc] / [K, B, Lt], False at
        padding. Returns [K * M * B, Lt, D].
        """
        m, b, lc = context.shape
        k, _, lt = targets.shape
        pos = interpolate_pos_embed(self.predictor_pos_embed, self.grid, grid or self.grid)
        pos = pos.to(z.dtype).expand(b, -1, -1)
        x = self.predictor_embed(z) + gather_tokens(pos, context)  # [M * B, Lc, Dp]
        tgt = gather_tokens(pos, targets)  # [K * B, Lt, Dp]
        tgt = tgt.reshape(k, 1, b, lt, -1).expand(k, m, b, lt, -1).reshape(k * m * b, lt, -1)
        tgt = tgt + self.mask_token.to(z.dtype)
        x = torch.cat([x.repeat(k, 1, 1), tgt], dim=1)  # [K * M * B, Lc + Lt, Dp]
        key_valid = self._key_valid(context_valid, target_valid, k, m, b, lc, lt, z.device)
        for blk in self.predictor_blocks:
            x = blk(x, key_valid)
        x = self.predictor_norm(x[:, lc:])
        return self.predictor_proj(x)

    @staticmethod
    def _key_valid(context_valid, target_valid, k, m, b, lc, lt, device):
        if context_valid is None and target_valid is None:
            return None
        if context_valid is None:
            context_valid = torch.ones(m, b, lc, dtype=torch.bool, device=device)
        if target_valid is None:
            target_valid = torch.ones(k, b, lt, dtype=torch.bool, device=device)
        ctx = context_valid.reshape(1, m * b, lc).expand(k, -1, -1).reshape(k * m * b, lc)
        tgt = target_valid.reshape(k, 1, b, lt).expand(k, m, b, lt).reshape(k * m * b, lt)
        return torch.cat([ctx, tgt], dim=1)


def build_predictor(grid, embed_dim: int, num_heads: int, predictor_embed_dim: int = 384, depth: int = 6,
                    **kw) -> VisionTransformerPredictor:
    return VisionTransformerPredictor(grid, embed_dim=embed_dim, predictor_embed_dim=predictor_embed_dim,
                                      depth=depth, num_heads=num_heads, **kw)
