"""The I-JEPA loss, value and gradient in one pass.

``loss = mean over real elements of f(pred - target)`` with f = smooth L1 (beta 1) or the square.
pred [R, L, D]; target [R // repeat, L, D]: prediction row r is compared with target row
``(r // (repeat * B)) * B + r % B`` where B = R // (K * repeat), which lets M context blocks share
one copy of the targets (``repeat`` = M; 1 when there is one context block); valid [R, L] or None
marks real rows. The forward pass also writes d loss / d pred (fp32), so the backward pass only
scales it and rounds once to pred's dtype; the reduction uses per-program partial sums and one
final sum (deterministic).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .dispatch import block_rows, interpreting, next_power_of_2, use_triton

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

KINDS = ("smooth_l1", "mse")  # the loss names, here only: the engine and its config take them from here


def _target_rows(r: int, repeat: int, num_targets: int, device):
    b = r // (num_targets * repeat)
    rows = torch.arange(r, device=device)
    return (rows // (repeat * b)) * b + rows % b


def jepa_loss_reference(pred, target, kind="smooth_l1", valid=None, repeat: int = 1, num_targets: int = 1):
    """Plain torch: the same mean as F.smooth_l1_loss / F.mse_loss over the real elements, in fp32
    (under autocast the reference's loss runs in fp32 against fp32 targets)."""
    if repeat > 1:
        target = target[_target_rows(pred.shape[0], repeat, num_targets, pred.device)]
    pred, target = pred.float(), target.float()
    if kind == "smooth_l1":
        err = F.smooth_l1_loss(pred, target, reduction="none", beta=1.0)
    elif kind == "mse":
        err = F.mse_loss(pred, target, reduction="none")
    else:
        raise ValueError(f"unknown loss {kind!r}; choose one of {KINDS}")
    if valid is None:
        return err.mean()
    w = valid.unsqueeze(-1).to(err.dtype)
    return (err * w).sum() / (w.sum() * err.shape[-1])


if triton is not None:

    @triton.jit
    def _loss_kernel(P_ptr, T_ptr, V_ptr, G_ptr, Part_ptr, Scale_ptr, NROWS, L, B, REP, D: tl.constexpr,
                     SMOOTH_L1: tl.constexpr, HAS_VALID: tl.constexpr, WRITE_GRAD: tl.constexpr,
                     BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
        pid = tl.program_id(0)
        t = pid.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)  # a token: (row, position)
        tmask = t < NROWS * L
        if HAS_VALID:
            tmask = tmask & (tl.load(V_ptr + t, mask=t < NROWS * L, other=0) != 0)
        row = t // L
        j = t % L
        trow = (row // (REP * B)) * B + row % B
        scale = tl.load(Scale_ptr)
        acc = tl.zeros([BLOCK_T], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            m2 = tmask[:, None] & (d < D)[None, :]
            p = tl.load(P_ptr + t[:, None] * D + d[None, :], mask=m2, other=0.0).to(tl.float32)
            q = tl.load(T_ptr + (trow * L + j)[:, None] * D + d[None, :], mask=m2, other=0.0).to(tl.float32)
            diff = p - q
            if SMOOTH_L1:
                ad = tl.abs(diff)
                err = tl.where(ad < 1.0, 0.5 * diff * diff, ad - 0.5)
                grad = tl.where(ad < 1.0, diff, tl.where(diff > 0, 1.0, -1.0))
            else:
                err = diff * diff
                grad = 2.0 * diff
            acc += tl.sum(tl.where(m2, err, 0.0), axis=1)
            if WRITE_GRAD:
                tl.store(G_ptr + t[:, None] * D + d[None, :], (tl.where(m2, grad, 0.0) * scale).to(
                    G_ptr.dtype.element_ty), mask=(t < NROWS * L)[:, None] & (d < D)[None, :])
        tl.store(Part_ptr + pid, tl.sum(acc, axis=0))


def jepa_loss_triton(pred, target, kind, valid, repeat, num_targets, write_grad: bool):
    r, length, d = pred.shape
    b = r // (num_targets * repeat)
    if valid is not None:  # 1 / the number of real elements, kept on the device (no host sync)
        scale = 1.0 / (valid.sum(dtype=torch.float32) * d).clamp_min(1.0)
    else:
        scale = torch.full((), 1.0 / max(r * length * d, 1), device=pred.device, dtype=torch.float32)
    pred, target = pred.contiguous(), target.contiguous()
    block_d = min(next_power_of_2(d), 2048 if interpreting() else 512)
    block_t = block_rows(16, 4096, block_d)
    nprog = max(1, triton.cdiv(r * length, block_t))
    part = torch.empty(nprog, device=pred.device, dtype=torch.float32)
    grad = torch.empty_like(pred, dtype=torch.float32) if write_grad else pred  # rounded once, in backward
    vflag = valid.to(torch.uint8).contiguous() if valid is not None else pred
    _loss_kernel[(nprog,)](pred, target, vflag, grad, part, scale, r, length, b, repeat, D=d,
                           SMOOTH_L1=kind == "smooth_l1", HAS_VALID=valid is not None, WRITE_GRAD=write_grad,
                           BLOCK_T=block_t, BLOCK_D=block_d)
    return part.sum() * scale, (grad if write_grad else None)


@torch.library.custom_op("ijepa_fast::jepa_loss", mutates_args=())
def _loss_op(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None, kind: str, repeat: int,
             num_targets: int, write_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    loss, grad = jepa_loss_triton(pred, target, kind, valid, repeat, num_targets, write_grad)
    return loss, (grad if grad is not None else pred.new_empty(0))


@_loss_op.register_fake
def _(pred, target, valid, kind, repeat, num_targets, write_grad):
    grad = pred.new_empty(pred.shape, dtype=torch.float32) if write_grad else pred.new_empty(0)
    return pred.new_empty((), dtype=torch.float32), grad


def _setup(ctx, inputs, output):
    ctx.save_for_backward(output[1])
    ctx.pred_dtype = inputs[0].dtype


def _backward(ctx, grad_loss, _grad_unused):
    (g,) = ctx.saved_tensors
    return (g * grad_loss.float()).to(ctx.pred_dtype), None, None, None, None, None, None


_loss_op.register_autograd(_backward, setup_context=_setup)


def jepa_loss(pred: torch.Tensor, target: torch.Tensor, kind: str = "smooth_l1", valid: torch.Tensor | None = None,
              *, repeat: int = 1, num_targets: int = 1, backend: str = "auto") -> torch.Tensor:
    """A scalar fp32 loss; see the module docstring. ``target`` gets no gradient."""
    if kind not in KINDS:
        raise ValueError(f"unknown loss {kind!r}; choose one of {KINDS}")
    if pred.shape[0] != target.shape[0] * repeat or pred.shape[1:] != target.shape[1:]:
        raise ValueError(f"jepa_loss: pred {tuple(pred.shape)} and target {tuple(target.shape)} with repeat={repeat}")
    if not use_triton(backend, pred, target):
        return jepa_loss_reference(pred, target.detach(), kind, valid, repeat, num_targets)
    loss, _ = _loss_op(pred, target.detach(), valid, kind, int(repeat), int(num_targets), pred.requires_grad)
    return loss
