"""What a forward pass keeps for its backward pass, in bytes, measured on any device (the CPU too).

``kept_bytes(fn, exclude)`` runs ``fn()`` and returns the bytes of every tensor storage created
during it that is still alive afterwards, ``fn``'s result included: the activations autograd saved,
the outputs that selective checkpointing cached, the inputs a checkpoint keeps for its recompute.
Storages of ``exclude`` (parameters, inputs) are never counted. It measures behaviour, not time:
each op's outputs are tracked through weak references to their storages.

``per_token_bytes`` applies it to one transformer block at a given width, for estimates at full
scale (``benchmarks/saved_activations.py``).
"""
from __future__ import annotations

import gc

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class _Track(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.storages: dict[int, tuple[StorageWeakRef, int]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and not t.is_nested and t.device.type != "meta":
                s = t.untyped_storage()
                seen = self.storages.get(s.data_ptr())
                # a storage freed during the pass may have its address reused by a new one: track the new one
                if seen is None or seen[0].expired():
                    self.storages[s.data_ptr()] = (StorageWeakRef(s), s.nbytes())
        return out


def kept_bytes(fn, exclude=()) -> tuple[int, object]:
    """(bytes created by ``fn()`` and still alive after it, ``fn()``'s result)."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    track = _Track()
    with track:
        result = fn()
    gc.collect()
    live = sum(n for ptr, (ref, n) in track.storages.items() if ptr not in skip and not ref.expired())
    return live, result


def per_token_bytes(dim: int, heads: int, mlp_ratio: float, checkpoint, *, dtype=torch.bfloat16,
                    seqs: int = 2, length: int = 64) -> float:
    """Bytes one block keeps per token until its backward pass (its output, the next block's
    saved input, included), at width ``dim``, measured on ``seqs`` sequences of ``length`` tokens."""
    from ..models.layers import Block
    from ..perf.switches import checkpoint_mode

    blk = Block(dim, heads, mlp_ratio).to(dtype)
    blk.checkpoint = checkpoint_mode(checkpoint)
    x = torch.randn(seqs, length, dim, dtype=dtype, requires_grad=True)
    n, y = kept_bytes(lambda: blk(x), exclude=[x, *blk.parameters()])
    del y
    return n / (seqs * length)
