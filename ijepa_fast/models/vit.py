"""The ViT encoder (context encoder and EMA target encoder), reference parameter layout.

No class token; a fixed 2-D sin-cos ``pos_embed`` stored as a frozen parameter (it is in the
state dict of the published checkpoints).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ..kernels.gather_tokens import gather_tokens as gather_tokens_op
from ..kernels.gather_tokens import gather_tokens_packed
from .attention import key_mask_from_lengths
from .layers import Block, PatchEmbed, rescale_residual_projections, trunc_normal_init
from .norm import LayerNorm
from .pos_embed import interpolate_pos_embed, sincos_2d


@dataclass(frozen=True)
class ViTSize:
    dim: int
    depth: int
    heads: int
    mlp_ratio: float


VIT_SIZES = {
    "vit_tiny": ViTSize(192, 12, 3, 4.0),
    "vit_small": ViTSize(384, 12, 6, 4.0),
    "vit_base": ViTSize(768, 12, 12, 4.0),
    "vit_large": ViTSize(1024, 24, 16, 4.0),
    "vit_huge": ViTSize(1280, 32, 16, 4.0),
    "vit_giant": ViTSize(1408, 40, 16, 48 / 11),
}


def as_pair(x) -> tuple[int, int]:
    if isinstance(x, int):
        return x, x
    x = tuple(int(v) for v in x)
    if len(x) == 1:
        return x[0], x[0]
    if len(x) != 2:
        raise ValueError(f"expected an int or (height, width), got {x}")
    return x


class VisionTransformer(nn.Module):
    def __init__(self, img_size=224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768,
                 depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 norm_eps: float = 1e-6, init_std: float = 0.02, attn_impl: str = "sdpa"):
        super().__init__()
        h, w = as_pair(img_size)
        if h % patch_size or w % patch_size:
            raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {patch_size}")
        self.grid = (h // patch_size, w // patch_size)
        self.embed_dim = self.num_features = embed_dim
        self.num_heads = num_heads
        self.patch_size = patch_size
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        num_patches = self.grid[0] * self.grid[1]
        self.pos_embed = nn.Parameter(sincos_2d(embed_dim, self.grid).unsqueeze(0), requires_grad=False)
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, norm_eps, attn_impl) for _ in range(depth))
        self.norm = LayerNorm(embed_dim, eps=norm_eps)
        self.num_patches = num_patches
        self.init_std = init_std
        self.kernels = "auto"  # kernel backend of the fused ops (see ijepa_fast.kernels.dispatch)
        self.deterministic = False  # deterministic scatter in the token gather's backward
        self.apply(lambda m: trunc_normal_init(m, init_std))
        rescale_residual_projections(self.blocks)

    @property
    def stream_dtype(self) -> torch.dtype:
        """The residual stream's dtype: the weights' (fp32 on the plain path, where autocast keeps the
        stream fp32 as the reference does; bf16 on the lean step's compute copy). The positional
        rows are added in fp32 (the sin-cos table stays fp32) and the sum rounded once to it."""
        return self.norm.weight.dtype

    def pos_for(self, grid: tuple[int, int]) -> torch.Tensor:
        """Positional table [1, gh * gw, D] for an input grid (interpolated off the native grid)."""
        return interpolate_pos_embed(self.pos_embed, self.grid, grid)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                context_lens: torch.Tensor | None = None) -> torch.Tensor:
        """Encode images.

        x: [B, C, H, W]. context: optional [M, B, L] patch indices (M context blocks); the encoder
        then sees only those tokens and returns [M * B, L, D] (block-major rows). context_lens:
        optional [M, B] numbers of real indices (the rest is padding, masked out of attention).
        Without ``context``: [B, N, D].
        """
        grid = (x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size)
        tokens = self.patch_embed(x)
        pos = self.pos_for(grid).detach()
        key_valid = None
        if context is None:
            tokens = (tokens + pos).to(self.stream_dtype)
        else:  # select the context tokens and add their positional rows in one pass
            m, b, length = context.shape
            lens = None if context_lens is None else context_lens.reshape(m * b)
            tokens = gather_tokens_op(tokens, context.reshape(m * b, length), pos[0], lens,
                                      deterministic=self.deterministic, backend=self.kernels).to(self.stream_dtype)
            key_valid = None if lens is None else key_mask_from_lengths(lens, length)
        for blk in self.blocks:
            tokens = blk(tokens, key_valid)
        return self.norm(tokens)

    def forward_packed(self, x: torch.Tensor, ctx_idx: torch.Tensor, meta) -> torch.Tensor:
        """Encode packed context sequences: ctx_idx [T] patch indices of the sequences that
        ``meta`` (a VarlenMeta, sequence s reading image s % B) delimits -> [T, D]; no padding."""
        grid = (x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size)
        pos = self.pos_for(grid)[0].detach()
        tokens = gather_tokens_packed(self.patch_embed(x), ctx_idx, meta.cu_seqlens, pos,
                                      deterministic=self.deterministic, backend=self.kernels).to(self.stream_dtype)
        for blk in self.blocks:
            tokens = blk(tokens, None, meta)
        return self.norm(tokens)


def build_encoder(name: str, img_size=224, patch_size: int = 16, **kw) -> VisionTransformer:
    """A named ViT (``vit_tiny`` ... ``vit_giant``) at any resolution and patch size."""
    if name not in VIT_SIZES:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(VIT_SIZES)}")
    s = VIT_SIZES[name]
    return VisionTransformer(img_size=img_size, patch_size=patch_size, embed_dim=s.dim, depth=s.depth,
                             num_heads=s.heads, mlp_ratio=s.mlp_ratio, **kw)
