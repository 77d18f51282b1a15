"""Variable-length (packed) sequences: the metadata that travels with them, and attention over them.

A batch of S sequences of lengths ``L_s`` is stored as one [T, ...] tensor (T = sum L_s, no
padding) with ``cu_seqlens`` (int32, [S + 1], ``cu_seqlens[s]`` = start of sequence s) and
``max_seqlen``, as ``flash_attn_varlen_func`` takes them.

``attention_varlen(q, k, v, meta, backend)`` with q, k, v [T, H, head_dim]. Backends, in the order
``"auto"`` tries them:

- ``flash_attn``: flash-attn's ``flash_attn_varlen_func`` (FA3's ``flash_attn_interface`` or FA2's
  ``flash_attn``; FA4's ``flash_attn.cute``), CUDA, bf16/fp16;
- ``torch_varlen``: ``torch.nn.attention.varlen.varlen_attn`` (PyTorch's FlashAttention), CUDA,
  bf16/fp16;
- ``xformers``: ``memory_efficient_attention`` with a block-diagonal bias;
- ``nested``: nested jagged tensors with ``scaled_dot_product_attention`` (any device, CPU too);
- ``padded``: padding to the longest sequence, a key mask and SDPA.

``math`` (a loop of explicit per-sequence attention) is the plain reference the others are
tested against.
"""
from __future__ import annotations

import importlib
import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .attention import attention_reference

BACKENDS = ("auto", "flash_attn", "torch_varlen", "xformers", "nested", "padded", "math")


class VarlenMeta(NamedTuple):
    """cu_seqlens: int32 [S + 1]; max_seqlen: the longest sequence (a Python int)."""

    cu_seqlens: torch.Tensor
    max_seqlen: int

    @classmethod
    def from_lengths(cls, lengths: torch.Tensor) -> VarlenMeta:
        cu = torch.zeros(len(lengths) + 1, dtype=torch.int32, device=lengths.device)
        cu[1:] = torch.cumsum(lengths, 0)
        return cls(cu, int(lengths.max()) if len(lengths) else 0)

    @property
    def lengths(self) -> torch.Tensor:
        return self.cu_seqlens[1:] - self.cu_seqlens[:-1]

    @property
    def num_seqs(self) -> int:
        return self.cu_seqlens.numel() - 1


# ---------------------------------------------------------------------------------------------
# optional backends, found once

_FOUND: dict = {}


def _found(name: str, load):
    """``load()`` once per process; None when the package is missing or fails to import."""
    if name not in _FOUND:
        try:
            _FOUND[name] = load()
        except Exception:
            _FOUND[name] = None
    return _FOUND[name]


def _load_flash_attn():
    for mod in ("flash_attn_interface", "flash_attn.cute", "flash_attn"):  # FA3, FA4, FA2
        try:
            return importlib.import_module(mod).flash_attn_varlen_func
        except Exception:
            continue
    return None


def _flash_attn():
    return _found("flash_attn", _load_flash_attn)


def _xformers():
    return _found("xformers", lambda: importlib.import_module("xformers.ops"))


def _torch_varlen():
    return _found("torch_varlen", lambda: importlib.import_module("torch.nn.attention.varlen").varlen_attn)


def available(backend: str, q: torch.Tensor) -> bool:
    """Whether ``backend`` can run on tensors like ``q`` here."""
    half = q.dtype in (torch.bfloat16, torch.float16)
    if backend == "flash_attn":
        return q.is_cuda and half and _flash_attn() is not None
    if backend == "torch_varlen":
        return q.is_cuda and half and _torch_varlen() is not None
    if backend == "xformers":
        return q.is_cuda and _xformers() is not None
    return backend in ("nested", "padded", "math")


def resolve(backend: str, q: torch.Tensor, nested_ok: bool = True) -> str:
    """The backend that runs: ``auto`` picks the first available one (skipping ``nested`` where
    its jagged tensors cannot be used, as inside activation checkpointing's recompute)."""
    if backend == "auto":
        for b in ("flash_attn", "torch_varlen", "xformers", "nested"):
            if available(b, q) and (nested_ok or b != "nested"):
                return b
        return "padded"
    if backend not in BACKENDS:
        raise ValueError(f"unknown varlen attention backend {backend!r}; choose one of {BACKENDS}")
    if not available(backend, q):
        raise RuntimeError(f"varlen attention backend {backend!r} cannot run here ({q.device.type}, {q.dtype}): "
                           f"{'it is not installed; ' if backend in ('flash_attn', 'xformers') else ''}"
                           f"use model.varlen_attn=auto")
    return backend


# ---------------------------------------------------------------------------------------------
# implementations: q, k, v [T, H, hd] -> [T, H, hd]

def _flash(q, k, v, meta):
    cu = meta.cu_seqlens
    out = _flash_attn()(q, k, v, cu, cu, meta.max_seqlen, meta.max_seqlen)
    return out[0] if isinstance(out, tuple) else out


def _torch(q, k, v, meta):
    cu = meta.cu_seqlens
    return _torch_varlen()(q, k, v, cu, cu, meta.max_seqlen, meta.max_seqlen)


def _xf(q, k, v, meta):
    xops = _xformers()
    bias = xops.fmha.attn_bias.BlockDiagonalMask.from_seqlens(meta.lengths.tolist())
    return xops.memory_efficient_attention(q[None], k[None], v[None], attn_bias=bias)[0]


def _nested(q, k, v, meta):
    # jagged tensors are a prototype API and say so on every first use; the layout here is fixed
    warnings.filterwarnings("ignore", message="The PyTorch API of nested tensors is in prototype stage")
    offsets = meta.cu_seqlens.long()
    nt = [torch.nested.nested_tensor_from_jagged(t.contiguous(), offsets=offsets, max_seqlen=meta.max_seqlen)
          .transpose(1, 2) for t in (q, k, v)]  # jagged SDPA needs contiguous values
    return F.scaled_dot_product_attention(*nt).transpose(1, 2).values()


def pad_index(meta: VarlenMeta, total: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(flat positions [T] in an [S, max_seqlen] grid, bool [S, max_seqlen] validity).

    ``total``: T, the number of tokens, when the caller knows it (from a tensor's shape): then
    nothing is read back from the device."""
    lengths = meta.lengths.long()
    dev = lengths.device
    valid = torch.arange(meta.max_seqlen, device=dev)[None, :] < lengths[:, None]
    if total is None:
        total = int(meta.cu_seqlens[-1])
    seq = torch.repeat_interleave(torch.arange(lengths.numel(), device=dev), lengths, output_size=total)
    start = meta.cu_seqlens.long()[seq]
    return seq * meta.max_seqlen + torch.arange(total, device=dev) - start, valid


def _padded(q, k, v, meta):
    pos, valid = pad_index(meta, q.shape[0])
    s, m = valid.shape
    t, h, d = q.shape

    def pad(x):
        return x.new_zeros(s * m, h, d).index_copy(0, pos, x).view(s, m, h, d).transpose(1, 2)

    out = F.scaled_dot_product_attention(pad(q), pad(k), pad(v), attn_mask=valid[:, None, None, :])
    return out.transpose(1, 2).reshape(s * m, h, d).index_select(0, pos)


def attention_varlen_reference(q, k, v, meta):
    """Per-sequence explicit attention, the reference's arithmetic."""
    outs = []
    cu = meta.cu_seqlens.tolist()
    for a, b in zip(cu[:-1], cu[1:]):
        if b > a:
            outs.append(attention_reference(*(x[a:b].transpose(0, 1)[None] for x in (q, k, v)))[0].transpose(0, 1))
    return torch.cat(outs) if outs else q.new_zeros(q.shape)


_IMPLS = {"flash_attn": _flash, "torch_varlen": _torch, "xformers": _xf, "nested": _nested, "padded": _padded,
          "math": attention_varlen_reference}


def attention_varlen(q, k, v, meta: VarlenMeta, backend: str = "auto", nested_ok: bool = True):
    """Attention within each packed sequence; see the module docstring."""
    return _IMPLS[resolve(backend, q, nested_ok)](q, k, v, meta)


def describe(attn: str, layout: str, varlen_attn: str, device: torch.device, half: bool) -> str:
    """One log line: which attention runs for dense batches and for contexts of different lengths
    (packed or padded, as ``layout`` decides on ``device``; ``half``: bf16 compute there)."""
    probe = torch.empty(0, device=device, dtype=torch.bfloat16 if half else torch.float32)
    why = ""
    if layout == "auto":
        fused = [b for b in ("flash_attn", "torch_varlen", "xformers")
                 if available(b, torch.empty(0, device=device, dtype=torch.bfloat16))]
        layout = "packed" if fused else "padded"
        why = (" (model.layout=auto: a fused variable-length attention kernel runs here)" if fused else
               " (model.layout=auto: packing needs a fused variable-length attention kernel, flash-attn, PyTorch's "
               "varlen_attn or xformers on CUDA)")
    if layout == "packed":
        return (f"attention: {attn} for dense batches; contexts of different lengths packed, attention "
                f"{resolve(varlen_attn, probe)}{why}")
    return f"attention: {attn}; contexts of different lengths padded, with key masks{why}"
