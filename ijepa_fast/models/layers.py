"""Transformer building blocks with the reference's parameter names.

The submodules are registered in the reference's order, so that constructing a model consumes
the global torch RNG exactly as the reference does and the same seed gives the same weights.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.utils.checkpoint

from .attention import attention, check_impl
from .norm import LayerNorm
from .varlen import VarlenMeta, attention_varlen


class PatchEmbed(nn.Module):
    """Image [B, C, H, W] -> patch tokens [B, (H/p) * (W/p), D] (row-major)."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, _, h, w = x.shape
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {p}")
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, impl: str = "sdpa"):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.impl = check_impl(impl)
        self.varlen_impl = "auto"  # backend for packed sequences (see models.varlen)
        self.nested_ok = True  # False inside activation checkpointing (jagged tensors cannot be recomputed)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, key_valid: torch.Tensor | None = None,
                meta: VarlenMeta | None = None) -> torch.Tensor:
        """x: [B, N, D] (key_valid: optional bool [B, N]) or, with ``meta``, packed [T, D]."""
        if meta is not None:
            t, c = x.shape
            # qkv features are laid out [3, heads, head_dim], as in the published checkpoints
            q, k, v = self.qkv(x).reshape(t, 3, self.num_heads, c // self.num_heads).unbind(1)
            return self.proj(attention_varlen(q, k, v, meta, self.varlen_impl, self.nested_ok).reshape(t, c))
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        out = attention(qkv[0], qkv[1], qkv[2], key_valid, impl=self.impl)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool = True,
                 norm_eps: float = 1e-6, attn_impl: str = "sdpa"):
        super().__init__()
        self.norm1 = LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, impl=attn_impl)
        self.norm2 = LayerNorm(dim, eps=norm_eps)
        self.mlp = MLP(dim, int(dim * mlp_ratio))
        # activation checkpointing: False, "full" (or True: recompute the whole block in the backward
        # pass) or "selective" (keep the matmul and attention outputs, recompute the rest)
        self.checkpoint = False

    def forward(self, x: torch.Tensor, key_valid: torch.Tensor | None = None,
                meta: VarlenMeta | None = None) -> torch.Tensor:
        if self.checkpoint and torch.is_grad_enabled():
            kw = {"context_fn": selective_contexts} if self.checkpoint == "selective" else {}
            # no recompute metadata check: it cannot size the nested tensors of jagged attention
            return torch.utils.checkpoint.checkpoint(self._forward, x, key_valid, meta, use_reentrant=False,
                                                     determinism_check="none", **kw)
        return self._forward(x, key_valid, meta)

    def _forward(self, x, key_valid, meta):
        x = x + self.attn(self.norm1(x), key_valid, meta)
        return x + self.mlp(self.norm2(x))


_MATMULS = ("mm", "addmm", "bmm", "baddbmm")
_ATTENTION = ("attention", "attn", "flash")  # SDPA's kernels, flash-attn's, xformers', PyTorch's varlen


def save_in_selective(op) -> bool:
    """Whether selective checkpointing keeps an op's output: matmuls and attention forwards (the
    costly ops); layer norms, GELU, adds and casts are recomputed in the backward pass."""
    name = str(op)
    base = name.split(".")[1] if name.startswith("aten.") else name
    if base in _MATMULS:
        return True
    return "backward" not in name and any(k in name for k in _ATTENTION)


def _policy(ctx, op, *args, **kwargs):
    from torch.utils.checkpoint import CheckpointPolicy

    return CheckpointPolicy.MUST_SAVE if save_in_selective(op) else CheckpointPolicy.PREFER_RECOMPUTE


def selective_contexts():
    """The context pair of ``torch.utils.checkpoint``'s selective activation checkpointing."""
    return create_selective_checkpoint_contexts()(_policy)


def create_selective_checkpoint_contexts():
    """torch's ``create_selective_checkpoint_contexts`` (torch 2.4 and later), or a clear error."""
    fn = getattr(torch.utils.checkpoint, "create_selective_checkpoint_contexts", None)
    if fn is None:
        raise RuntimeError(f"perf.activation_checkpointing=selective needs torch.utils.checkpoint."
                           f"create_selective_checkpoint_contexts (torch 2.4 or later; this is torch "
                           f"{torch.__version__}): use perf.activation_checkpointing=full")
    return fn


def trunc_normal_(tensor: torch.Tensor, std: float = 0.02, a: float = -2.0, b: float = 2.0) -> torch.Tensor:
    """Truncated normal by the inverse-CDF method (one uniform draw per element, as the reference).

    torch.nn.init.trunc_normal_ switched to rejection sampling in recent releases, which consumes
    the RNG differently; this keeps initial weights identical to the reference for a given seed.
    """
    def cdf(x: float) -> float:
        return (1.0 + math.erf(x / math.sqrt(2.0))) / 2.0

    with torch.no_grad():
        lo, hi = cdf(a / std), cdf(b / std)
        tensor.uniform_(2 * lo - 1, 2 * hi - 1)
        tensor.erfinv_()
        tensor.mul_(std * math.sqrt(2.0))
        return tensor.clamp_(min=a, max=b)


def trunc_normal_init(module: nn.Module, std: float = 0.02) -> None:
    """The reference's per-module init: trunc-normal weights, zero biases, LayerNorm (1, 0)."""
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        trunc_normal_(module.weight, std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def rescale_residual_projections(blocks: nn.ModuleList) -> None:
    """Divide attn.proj and mlp.fc2 weights of block i (1-based) by sqrt(2 i)."""
    with torch.no_grad():
        for i, blk in enumerate(blocks, start=1):
            blk.attn.proj.weight.div_(math.sqrt(2.0 * i))
            blk.mlp.fc2.weight.div_(math.sqrt(2.0 * i))


def reinit_linear_and_norm(model: nn.Module, std: float = 0.02) -> None:
    """The released training script's second init pass over every Linear and LayerNorm.

    It draws fresh trunc-normal weights for every Linear (undoing the depth rescaling of the
    constructor) and leaves Conv2d and free parameters such as the mask token alone.
    """
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.LayerNorm)):
                trunc_normal_init(m, std)
