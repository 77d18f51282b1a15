"""Where every op chooses between its Triton kernel and its pure-torch reference, and the launch
helpers the ops share (block sizes; the cached device tables of the multi-tensor ops).

``backend`` (the engine's ``model.kernels`` option):

- ``"auto"``: Triton when it is installed and the tensors are on a CUDA device, else the reference;
- ``"triton"``: always Triton (CUDA tensors, or CPU tensors under the Triton interpreter, which
  needs ``TRITON_INTERPRET=1`` set before triton is first imported); an error says what is missing;
- ``"reference"``: always the pure-torch reference.
"""
from __future__ import annotations

import os

import torch

BACKENDS = ("auto", "triton", "reference")

_TRITON = None


def triton_version() -> str | None:
    """The installed Triton's version, or None (imported once, on first use)."""
    global _TRITON
    if _TRITON is None:
        try:
            import triton

            _TRITON = triton.__version__
        except Exception:  # not installed, or broken: the references cover every op
            _TRITON = ""
    return _TRITON or None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(backend: str, *tensors: torch.Tensor) -> bool:
    """True when the op should run its Triton kernel on these tensors."""
    if backend == "reference":
        return False
    on_cuda = all(t.is_cuda for t in tensors)
    if backend == "auto":
        return on_cuda and triton_version() is not None
    if backend != "triton":
        raise ValueError(f"unknown kernel backend {backend!r}; choose one of {BACKENDS}")
    if triton_version() is None:
        raise RuntimeError("kernels=triton but Triton is not installed (pip install triton), or use kernels=auto")
    if not on_cuda and not interpreting():
        raise RuntimeError("kernels=triton on CPU tensors needs the Triton interpreter: set TRITON_INTERPRET=1 "
                           "before triton is imported, or use kernels=auto")
    return True


def describe(backend: str, device: torch.device) -> str:
    """One line for the log: which implementation the ops will use on ``device``."""
    version = triton_version()
    if backend == "reference":
        return "kernels: pure-torch references (kernels=reference)"
    if device.type == "cuda" or (backend == "triton" and interpreting()):
        if version is None:
            return "kernels: pure-torch references (Triton is not installed; pip install triton)"
        where = "interpreter" if device.type != "cuda" else "CUDA"
        return f"kernels: Triton {version} ({where})"
    return "kernels: pure-torch references (no CUDA device)"


# ---------------------------------------------------------------------------------------------
# launch sizes, shared by every op

MAX_BLOCK_NUMEL = 1 << 20  # Triton's largest block


def next_power_of_2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def block_rows(gpu: int, interpreted: int, width: int = 1) -> int:
    """Rows per program: small on a GPU (many programs), large under the interpreter (each program
    costs about a millisecond there), and never more than Triton's largest block allows."""
    rows = interpreted if interpreting() else gpu
    return max(1, min(rows, MAX_BLOCK_NUMEL // max(width, 1)))


def token_blocks(width: int) -> tuple[int, int]:
    """(BLOCK_T rows, BLOCK_D columns) of the row-gathering ops (token gathers, predictor tokens):
    up to 256 columns per program, 32 rows on a GPU, 4096 under the interpreter."""
    block_d = min(next_power_of_2(width), 256)
    return block_rows(32, 4096, block_d), block_d


def upload(host: torch.Tensor, dev: torch.device) -> torch.Tensor:
    """A host-built table on ``dev``: on CUDA from pinned memory, asynchronously (no host synchronisation)."""
    if dev.type == "cuda":
        return host.pin_memory().to(dev, non_blocking=True)
    return host.to(dev)


def remember(cache, size: int, key, value):
    """Keep ``value`` under ``key`` in ``cache`` (an OrderedDict), evicting the least recently used
    entries beyond ``size`` (a run's own tables, used every step, are never the ones to go)."""
    cache[key] = value
    while len(cache) > size:
        cache.popitem(last=False)
    return value


def recall(cache, key):
    """``cache``'s entry for ``key`` (None when absent), marked as the most recently used."""
    hit = cache.get(key)
    if hit is not None:
        cache.move_to_end(key)
    return hit


def program_table(counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For ``counts[i]`` programs over tensor ``i`` (int64, on the host): (the tensor of each program
    as int32, the program's index within its tensor as int64), with vectorised torch ops (a ViT-H
    parameter group has ~300k programs)."""
    tensor = torch.repeat_interleave(torch.arange(len(counts), dtype=torch.int32), counts)
    starts = torch.cumsum(counts, 0) - counts
    return tensor, torch.arange(int(counts.sum()), dtype=torch.int64) - torch.repeat_interleave(starts, counts)
