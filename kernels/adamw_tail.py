"""The optimiser tail in one multi-tensor pass: AdamW, the EMA of the target encoder and the
refresh of the compute copies, for every parameter of a group.

Per element of a parameter ``p`` (fp32 master) with gradient ``g`` (fp32 or bf16), moments
``m``, ``v`` (fp32), optional compute copy ``c`` (bf16 or fp32), optional EMA target ``t`` (fp32)
and its compute copy ``tc``, in fp32 arithmetic:

    g  = g * scale                                   (optional device scalar: clipping)
    m  = lerp(m, g, 1 - beta1);  v = v * beta2 + (1 - beta2) * g * g
    p  = p * (1 - lr * wd) - (lr / bc1) * m / (sqrt(v) / sqrt(bc2) + eps)     (torch.optim.AdamW)
    c  = round(p);  t = momentum * t + (1 - momentum) * p;  tc = round(t)

``bc1 = 1 - beta1 ** step``, ``bc2 = 1 - beta2 ** step``, with ``step`` each parameter's own step
count (a 0-d tensor, advanced here as torch advances it), computed in float64 on the device.
A parameter without a gradient is not stepped (as in torch); its target still takes the EMA.
``lr``, ``weight_decay`` and ``momentum`` are Python numbers or 0-d device tensors (float64 for
the same rounding as the numbers): the kernels read them from device memory either way, so a step
whose values live in tensors updated in place between steps launches identical kernels every step
(what a CUDA graph replays).
``found_inf`` (a device scalar): when nonzero nothing is written and the step counts stay, so a
non-finite step is skipped on the device without the host reading anything.

Design: the pointer table of ``ema.py``, with seven pointers per tensor (p, g, m, v, c, t, tc);
one launch per combination of dtypes and of which tensors are present (a plain group: one launch).
The block tables depend on the tensors' sizes only (built once, vectorised); the pointer
table is cached by the tensors' addresses; on CUDA a new table goes up from pinned memory
without a host synchronisation. Rounding to bf16 is done on the bits (round to nearest even), so
the compute copy equals ``p.to(torch.bfloat16)`` exactly, in the interpreter as on a GPU.
"""
from __future__ import annotations

from collections import OrderedDict

import torch

from .dispatch import block_rows, program_table, recall, remember, upload, use_triton

try:
    import triton
    import triton.language as tl
except ImportError:  # the reference covers every use
    triton = None


def _coefficients(steps: list[torch.Tensor], lr, betas) -> tuple[torch.Tensor, torch.Tensor]:
    """(lr / bc1, sqrt(bc2)) per parameter, from the (already advanced) step counts, in float64
    (``lr``: a number or a 0-d device tensor)."""
    s = torch.stack([x.reshape(()) for x in steps]).double()
    bc1 = 1.0 - torch.pow(float(betas[0]), s)
    bc2 = 1.0 - torch.pow(float(betas[1]), s)
    if isinstance(lr, torch.Tensor):
        lr = lr.to(s.device, torch.float64).reshape(())
    return (lr / bc1).float(), bc2.sqrt().float()


def _scalar(value, dev: torch.device) -> torch.Tensor:
    """A number or a 0-d tensor as a one-element fp32 device tensor (a number rounded once from
    float64, as a kernel argument would be)."""
    if isinstance(value, torch.Tensor):
        return value.to(dev, torch.float64).reshape(1).float()
    return torch.full((1,), float(value), dtype=torch.float32, device=dev)


def _decay(lr, weight_decay, dev: torch.device) -> torch.Tensor:
    """1 - lr * weight_decay, computed in float64 and rounded once, as a one-element fp32 tensor."""
    if not isinstance(lr, torch.Tensor) and not isinstance(weight_decay, torch.Tensor):
        return _scalar(1.0 - float(lr) * float(weight_decay), dev)
    return (1.0 - _f64(lr, dev) * _f64(weight_decay, dev)).reshape(1).float()


def _f64(value, dev: torch.device) -> torch.Tensor:
    """A number or a 0-d tensor as a 0-d float64 device tensor (a number by a fill: no host-to-device
    copy, which a CUDA graph capture would refuse)."""
    if isinstance(value, torch.Tensor):
        return value.to(dev, torch.float64).reshape(())
    return torch.full((), float(value), dtype=torch.float64, device=dev)


def _advance(steps, found_inf) -> None:
    if steps:
        torch._foreach_add_(steps, 1.0)


def _undo(steps, found_inf) -> None:
    if steps and found_inf is not None:
        torch._foreach_sub_(steps, [found_inf.to(steps[0].device, torch.float32).reshape(())] * len(steps))


def _entries(params, grads, exp_avgs, exp_avg_sqs, steps, computes, targets, target_computes):
    n = len(params)
    computes = list(computes) if computes is not None else [None] * n
    targets = list(targets) if targets is not None else [None] * n
    target_computes = list(target_computes) if target_computes is not None else [None] * n
    for name, xs in (("grads", grads), ("exp_avgs", exp_avgs), ("exp_avg_sqs", exp_avg_sqs), ("steps", steps),
                     ("computes", computes), ("targets", targets), ("target_computes", target_computes)):
        if len(xs) != n:
            raise ValueError(f"adamw_tail: {n} params but {len(xs)} {name}")
    out = []
    for i in range(n):
        p, g = params[i], grads[i]
        if p.dtype != torch.float32:
            raise TypeError(f"adamw_tail: the master weights must be fp32, not {p.dtype}")
        for x in (g, exp_avgs[i] if g is not None else None, exp_avg_sqs[i] if g is not None else None,
                  computes[i], targets[i], target_computes[i]):
            if x is not None and x.shape != p.shape:
                raise ValueError(f"adamw_tail: a tensor of shape {tuple(x.shape)} paired with {tuple(p.shape)}")
        if g is None and targets[i] is None:
            continue
        out.append((p, g, exp_avgs[i], exp_avg_sqs[i], steps[i], computes[i], targets[i], target_computes[i]))
    return out


def adamw_tail_reference(params, grads, exp_avgs, exp_avg_sqs, steps, *, lr, weight_decay, betas,
                         eps: float, computes=None, targets=None, target_computes=None, momentum=1.0,
                         grad_scale: torch.Tensor | None = None, found_inf: torch.Tensor | None = None) -> None:
    """The plain path, torch.optim.AdamW's foreach arithmetic tensor by tensor; a ``found_inf``
    skip keeps the old values with ``torch.where`` (no host synchronisation)."""
    entries = _entries(params, grads, exp_avgs, exp_avg_sqs, steps, computes, targets, target_computes)
    beta1, beta2 = float(betas[0]), float(betas[1])
    with torch.no_grad():
        adam = [e for e in entries if e[1] is not None]
        stepped = [e[4] for e in adam]
        _advance(stepped, found_inf)
        if adam:
            step_size, bc2s = _coefficients(stepped, lr, betas)
        j = 0
        dev = entries[0][0].device
        tensor_hyper = any(isinstance(x, torch.Tensor) for x in (lr, weight_decay, momentum))
        decay = _decay(lr, weight_decay, dev).reshape(()) if tensor_hyper else None
        mom = _scalar(momentum, dev).reshape(()) if tensor_hyper else None
        rest = _scalar(1.0 - _f64(momentum, dev), dev).reshape(()) if tensor_hyper else None
        for p, g, m, v, _, c, t, tc in entries:
            keep = None if found_inf is None else found_inf.to(p.device).reshape(()) != 0

            def put(dst, new, keep=keep):
                dst.copy_(new if keep is None else torch.where(keep, dst, new.to(dst.dtype)))

            new_p = p
            if g is not None:
                g = g.float()
                if grad_scale is not None:
                    g = g * grad_scale.to(p.device).float()
                new_m = m.lerp(g, 1 - beta1)
                new_v = (v * beta2).addcmul_(g, g, value=1 - beta2)
                if tensor_hyper:
                    new_p = p * decay
                else:
                    new_p = p * (1 - lr * weight_decay) if weight_decay != 0 else p.clone()
                denom = (new_v.sqrt() / bc2s[j]).add_(eps)
                new_p.add_(new_m * -step_size[j] / denom)
                j += 1
                put(m, new_m)
                put(v, new_v)
            if t is not None:
                if tensor_hyper:
                    new_t = (t * mom).add_(new_p * rest)
                else:
                    new_t = (t * momentum).add_(new_p, alpha=1 - momentum)
                put(t, new_t)
                if tc is not None:
                    put(tc, new_t.to(tc.dtype))
            if g is not None:
                put(p, new_p)
                if c is not None:
                    put(c, new_p.to(c.dtype))
        _undo(stepped, found_inf)


if triton is not None:

    @triton.jit
    def _round(x, DTYPE: tl.constexpr):
        """fp32 -> DTYPE; bf16 by round-to-nearest-even on the bits (the interpreter truncates)."""
        if DTYPE == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            r = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).to(tl.uint16)
            r = tl.where(x == x, r, 0x7FC0)  # NaN stays NaN
            return r.to(tl.bfloat16, bitcast=True)
        else:
            return x.to(DTYPE)

    @triton.jit
    def _adamw_tail_kernel(Ptr_table, Meta, Step_size, Bc2_sqrt, Block_tensor, Block_index, Scale, Found,
                           Decay, Momentum, decay, momentum, beta1, beta2, eps,
                           G_DTYPE: tl.constexpr, C_DTYPE: tl.constexpr, T_DTYPE: tl.constexpr,
                           TC_DTYPE: tl.constexpr, ADAM: tl.constexpr, HAS_C: tl.constexpr, HAS_T: tl.constexpr,
                           HAS_TC: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_FOUND: tl.constexpr,
                           HYPER_IN_MEMORY: tl.constexpr, BLOCK_SIZE: tl.constexpr):
        pid = tl.program_id(0)
        ti = tl.load(Block_tensor + pid)
        bi = tl.load(Block_index + pid)
        n = tl.load(Meta + 2 * ti)
        if HAS_FOUND:  # a skipped step: every tensor counts as empty, nothing is read or written
            n = tl.where(tl.load(Found) == 0.0, n, 0)
        offs = bi.to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
        mask = offs < n
        row = Ptr_table + 7 * ti
        p_ptr = tl.load(row).to(tl.pointer_type(tl.float32))
        p = tl.load(p_ptr + offs, mask=mask, other=0.0)
        if ADAM:
            j = tl.load(Meta + 2 * ti + 1)
            g_ptr = tl.load(row + 1).to(tl.pointer_type(G_DTYPE))
            m_ptr = tl.load(row + 2).to(tl.pointer_type(tl.float32))
            v_ptr = tl.load(row + 3).to(tl.pointer_type(tl.float32))
            g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            if HAS_SCALE:
                g = g * tl.load(Scale)
            m = tl.load(m_ptr + offs, mask=mask, other=0.0)
            v = tl.load(v_ptr + offs, mask=mask, other=0.0)
            w = 1.0 - beta1
            m = tl.where(w < 0.5, m + w * (g - m), g - (g - m) * (1.0 - w))  # torch's lerp
            v = v * beta2
            v = v + ((1.0 - beta2) * g) * g
            if HYPER_IN_MEMORY:
                p = p * tl.load(Decay)
            else:
                p = p * decay
            denom = tl.div_rn(tl.sqrt_rn(v), tl.load(Bc2_sqrt + j)) + eps
            p = p + tl.div_rn(-tl.load(Step_size + j) * m, denom)
            tl.store(m_ptr + offs, m, mask=mask)
            tl.store(v_ptr + offs, v, mask=mask)
            tl.store(p_ptr + offs, p, mask=mask)
            if HAS_C:
                c_ptr = tl.load(row + 4).to(tl.pointer_type(C_DTYPE))
                tl.store(c_ptr + offs, _round(p, C_DTYPE), mask=mask)
        if HAS_T:
            t_ptr = tl.load(row + 5).to(tl.pointer_type(T_DTYPE))
            t = tl.load(t_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            if HYPER_IN_MEMORY:
                momentum = tl.load(Momentum)
            t = t * momentum + (1.0 - momentum) * p
            tl.store(t_ptr + offs, _round(t, T_DTYPE), mask=mask)
            if HAS_TC:
                tc_ptr = tl.load(row + 6).to(tl.pointer_type(TC_DTYPE))
                tl.store(tc_ptr + offs, _round(t, TC_DTYPE), mask=mask)


_TL_DTYPES = {}
_CACHE: OrderedDict = OrderedDict()  # pointer tables, by address (least recently used evicted first)
_BLOCKS: OrderedDict = OrderedDict()  # block tables, by size
_CACHE_SIZE, _BLOCKS_SIZE = 64, 32


def _tl_dtype(dtype):
    if dtype is None:
        return tl.float32  # absent: never dereferenced
    if not _TL_DTYPES:
        _TL_DTYPES.update({torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16})
    if dtype not in _TL_DTYPES:
        raise TypeError(f"adamw_tail kernel: unsupported dtype {dtype}")
    return _TL_DTYPES[dtype]


BUILDS = {"blocks": 0, "pointers": 0}  # how many tables were built (tests check that steps reuse them)


def _block_tables(sizes: tuple, block: int, dev: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(tensor of each block, index of the block in its tensor), built once per set of sizes with
    vectorised torch ops (a ViT-H group has ~300k blocks) and cached: they do not depend on addresses."""
    key = (block, str(dev), sizes)
    hit = recall(_BLOCKS, key)
    if hit is None:
        block_tensor, block_index = program_table((torch.tensor(sizes, dtype=torch.int64) + block - 1) // block)
        hit = remember(_BLOCKS, _BLOCKS_SIZE, key,
                       (upload(block_tensor, dev), upload(block_index.to(torch.int32), dev)))
        BUILDS["blocks"] += 1
    return hit


def _tables(rows, coef_rows, block: int, dev: torch.device):
    """(pointer table, [size, coefficient row] table, block tensor, block index). The pointer table
    (seven addresses per tensor) is cached by address: with the gradients kept from step to step
    (``FusedTail.zero_grad``) every step finds it; when addresses change only it is rebuilt."""
    ptrs = tuple(x.data_ptr() if x is not None else 0 for r in rows for x in r[:4] + r[5:])
    sizes = tuple(r[0].numel() for r in rows)
    key = ("pointers", str(dev), ptrs, sizes, tuple(coef_rows))
    hit = recall(_CACHE, key)
    if hit is None:
        meta = [v for n, j in zip(sizes, coef_rows) for v in (n, j)]
        hit = remember(_CACHE, _CACHE_SIZE, key, (upload(torch.tensor(ptrs, dtype=torch.int64), dev),
                                                 upload(torch.tensor(meta, dtype=torch.int64), dev)))
        BUILDS["pointers"] += 1
    return hit + _block_tables(sizes, block, dev)


def adamw_tail_triton(entries, coef, *, lr, weight_decay, betas, eps, momentum, grad_scale, found_inf) -> None:
    step_size, bc2s = coef if coef is not None else (None, None)
    groups: dict = {}
    j = 0
    for e in entries:
        p, g, _, _, _, c, t, tc = e
        if p.numel() == 0:
            j += g is not None
            continue
        if not all(x.is_contiguous() for x in (p, g, e[2], e[3], c, t, tc) if x is not None):
            raise ValueError("adamw_tail kernel needs contiguous tensors")
        key = (g is not None,) + tuple(x.dtype if x is not None else None for x in (g, c, t, tc))
        rows, coef_rows = groups.setdefault(key, ([], []))
        rows.append(e)
        coef_rows.append(j if g is not None else 0)
        j += g is not None
    dev = entries[0][0].device
    dummy = step_size if step_size is not None else torch.zeros(1, device=dev)
    # under the interpreter one program per tensor, no wider than the largest tensor (numpy work
    # grows with the block, not with the elements present)
    block = block_rows(2048, triton.next_power_of_2(max(e[0].numel() for e in entries)))
    # numbers as launch arguments; tensors read from device memory (the same launch every step)
    in_memory = any(isinstance(x, torch.Tensor) for x in (lr, weight_decay, momentum))
    decay_t = _decay(lr, weight_decay, dev) if in_memory else dummy
    mom_t = _scalar(momentum, dev) if in_memory else dummy
    decay = 0.0 if in_memory else 1.0 - lr * weight_decay
    mom = 0.0 if in_memory else float(momentum)
    for (adam, gd, cd, td, tcd), (rows, coef_rows) in groups.items():
        ptrs, meta, block_tensor, block_index = _tables(rows, coef_rows, block, dev)
        _adamw_tail_kernel[(block_tensor.numel(),)](
            ptrs, meta, step_size if adam else dummy, bc2s if adam else dummy, block_tensor, block_index,
            grad_scale if grad_scale is not None else dummy, found_inf if found_inf is not None else dummy,
            decay_t, mom_t, float(decay), mom, float(betas[0]), float(betas[1]), float(eps),
            G_DTYPE=_tl_dtype(gd), C_DTYPE=_tl_dtype(cd), T_DTYPE=_tl_dtype(td), TC_DTYPE=_tl_dtype(tcd), ADAM=adam,
            HAS_C=cd is not None and adam, HAS_T=td is not None, HAS_TC=tcd is not None and td is not None,
            HAS_SCALE=grad_scale is not None and adam, HAS_FOUND=found_inf is not None,
            HYPER_IN_MEMORY=in_memory, BLOCK_SIZE=block,
            num_warps=8)


def adamw_tail_(params, grads, exp_avgs, exp_avg_sqs, steps, *, lr, weight_decay, betas, eps: float,
                computes=None, targets=None, target_computes=None, momentum=1.0,
                grad_scale: torch.Tensor | None = None, found_inf: torch.Tensor | None = None,
                backend: str = "auto") -> None:
    """In place, one AdamW step of a parameter group (torch.optim.AdamW's arithmetic), the EMA of
    the targets from the updated masters, and the compute copies; lists aligned by parameter
    (``None`` where a parameter has no gradient, compute copy or target). ``steps``: the
    parameters' 0-d float step counts, advanced by one (unless ``found_inf`` is nonzero).
    ``grad_scale``: a device scalar multiplying every gradient (clipping); ``found_inf``: a device
    scalar, nonzero to skip the whole update on the device. ``lr``, ``weight_decay``, ``momentum``:
    numbers or 0-d device tensors (read on the device, never on the host)."""
    params, grads = list(params), list(grads)
    exp_avgs, exp_avg_sqs, steps = list(exp_avgs), list(exp_avg_sqs), list(steps)
    if found_inf is not None:
        found_inf = found_inf.reshape(1).float()
    if grad_scale is not None:
        grad_scale = grad_scale.reshape(1).float()
    entries = _entries(params, grads, exp_avgs, exp_avg_sqs, steps, computes, targets, target_computes)
    if not entries:
        return
    tensors = [x for e in entries for x in e[:4] + e[5:] if x is not None]
    if not use_triton(backend, *tensors):
        adamw_tail_reference(params, grads, exp_avgs, exp_avg_sqs, steps, lr=lr, weight_decay=weight_decay,
                             betas=betas, eps=eps, computes=computes, targets=targets,
                             target_computes=target_computes, momentum=momentum, grad_scale=grad_scale,
                             found_inf=found_inf)
        return
    with torch.no_grad():
        stepped = [e[4] for e in entries if e[1] is not None]
        _advance(stepped, found_inf)
        coef = _coefficients(stepped, lr, betas) if stepped else None
        adamw_tail_triton(entries, coef, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps, momentum=momentum,
                          grad_scale=grad_scale, found_inf=found_inf)
        _undo(stepped, found_inf)
