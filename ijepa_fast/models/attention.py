"""Attention dispatch: one entry point, several implementations.

``impl`` names the implementation:

- ``"sdpa"``: ``torch.nn.functional.scaled_dot_product_attention`` (any device; a boolean key mask
  when sequences are padded).
- ``"math"``: the explicit ``softmax(q k^T * scale) v`` of the reference implementation, kept as
  the plain path that every other implementation is compared against.

Shapes: ``q, k, v`` are ``[B, H, L, head_dim]``; ``key_valid`` is ``None`` (every key is a real
token) or a bool ``[B, L]`` that is False at padding positions. Padding rows of the output are
computed (they attend to the real keys) but carry no information to real rows.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

IMPLS = ("sdpa", "math")


def attention_reference(q, k, v, key_valid=None):
    """Explicit attention, the reference's arithmetic: [B, H, L, hd] -> [B, H, L, hd]."""
    scale = q.shape[-1] ** -0.5
    attn = (q @ k.transpose(-2, -1)) * scale
    if key_valid is not None:
        attn = attn.masked_fill(~key_valid[:, None, None, :], float("-inf"))
    attn = attn.softmax(dim=-1)
    return attn @ v


def attention(q, k, v, key_valid=None, impl: str = "sdpa"):
    """Scaled dot-product attention over padded sequences; see the module docstring."""
    if impl == "sdpa":
        mask = None if key_valid is None else key_valid[:, None, None, :]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    if impl == "math":
        return attention_reference(q, k, v, key_valid)
    raise ValueError(f"unknown attention implementation {impl!r}; choose one of {IMPLS}")


def check_impl(impl: str) -> str:
    if impl not in IMPLS:
        raise ValueError(f"unknown attention implementation {impl!r}; choose one of {IMPLS}")
    return impl


def key_mask_from_lengths(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """[B] lengths -> bool [B, max_len], True for the first ``lengths[b]`` positions."""
    return torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]
